"""The partition, place, clone, accumulate and allreduce passes, each on its own (boundary,
schedule, stage functions, variables and layer gradients have their own test files)."""

import numpy as np
import pytest
import rewrite_models as models
import tensorflow as tf

from graph_rewrite import rewrite
from graph_rewrite.accumulate import SlotAccumulator, sum_gradients
from graph_rewrite.allreduce import LocalGradientSync
from graph_rewrite.partition import partition
from graph_rewrite.place import Slot, all_slots, slot_devices, variable_devices
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1


def template_and_plan(case, replicas, gbs=8, num_micro_batches=2):
    template = build_template(case.model_fn, case.feature_spec)
    return template, even_plan(template.layers, replicas, gbs, num_micro_batches)


# ---- partition ---------------------------------------------------------------------------------
def test_partition_puts_every_op_in_the_stage_of_its_layer_exactly_once():
    template, plan = template_and_plan(models.SKIP, [1, 1, 1, 1])
    specs = partition(template, plan)
    stage_of_layer = plan.stage_of_layer()
    seen = [op for spec in specs for op in spec.ops]
    assert sorted(seen) == sorted(template.layer_of_op)
    for spec in specs:
        assert {stage_of_layer[template.layer_of_op[op]] for op in spec.ops} == {spec.index}
    assert [spec.has_loss for spec in specs] == [False, False, False, True]


def test_partition_sends_a_skip_connection_straight_to_its_consumer_stage():
    template, plan = template_and_plan(models.SKIP, [1, 1, 1, 1])
    specs = partition(template, plan)
    skipped = [t for t, stage in specs[3].input_source.items() if stage == 0]
    assert skipped, specs[3].input_source
    for t in skipped:
        assert 3 in specs[0].output_consumers[t]
        assert t not in specs[2].inputs  # not relayed through the stages in between
        assert t not in specs[1].outputs and t not in specs[2].outputs
    # every input of a stage is an output of the stage it comes from, and nothing flows back
    for spec in specs:
        for t, source in spec.input_source.items():
            assert source < spec.index and spec.index in specs[source].output_consumers[t]


def test_partition_lists_each_stages_variables_and_features():
    template, plan = template_and_plan(models.TRANSFORMER, [1, 1])
    specs = partition(template, plan)
    assert "embedding/table" in specs[0].variables and "embedding/table" in specs[1].variables
    for spec in specs:
        assert set(spec.variables) <= set(template.variables)
    assert set(specs[0].features) | set(specs[1].features) == set(template.features)


def test_partition_refuses_a_plan_that_skips_a_layer():
    template, _ = template_and_plan(models.MLP, [1, 1])
    broken = even_plan(template.layers[:-1], [1, 1], 8, 2)
    with pytest.raises(Exception, match="skips layers"):
        partition(template, broken)


# ---- place ------------------------------------------------------------------------------------
def test_place_maps_replica_k_of_stage_s_to_the_plans_kth_device_of_s():
    _, plan = template_and_plan(models.MLP, [2, 1])
    devices = slot_devices(plan, lambda d: f"/CPU:{d}")
    assert devices == {Slot(0, 0): "/CPU:0", Slot(0, 1): "/CPU:1", Slot(1, 0): "/CPU:2"}
    assert all_slots(plan) == [Slot(0, 0), Slot(0, 1), Slot(1, 0)]


def test_place_puts_a_tied_variable_on_the_first_local_stage_that_reads_it():
    template, plan = template_and_plan(models.TRANSFORMER, [2, 1])
    specs = partition(template, plan)
    devices = slot_devices(plan, lambda d: f"/CPU:{d}")
    everywhere = variable_devices(specs, all_slots(plan), devices)
    assert everywhere["embedding/table"] == "/CPU:0"  # stage 0, replica 0
    assert set(everywhere) == set(template.variables)
    only_last = variable_devices(specs, [Slot(1, 0)], devices)  # a rank holding stage 1 only
    assert only_last["embedding/table"] == "/CPU:2"
    assert set(only_last) == set(specs[1].variables)


# ---- clone ------------------------------------------------------------------------------------
def test_clone_calls_each_stage_once_per_micro_batch_and_slot_on_its_device_sharing_variables():
    template, plan = template_and_plan(models.MLP, [2, 1], gbs=8, num_micro_batches=2)
    built = rewrite(
        template,
        plan,
        lambda: v1.train.GradientDescentOptimizer(0.1),
        device_name=lambda d: f"/device:CPU:{d}",
    )
    ops = {op.name: op for op in built.graph.get_operations()}
    for slot, device in built.device_of_slot.items():
        for i in range(plan.num_micro_batches):
            for part in ("fwd", "bwd"):
                call = ops[f"dapple/mb{i}/{slot.tag}/{part}"]
                assert call.type in ("StatefulPartitionedCall", "PartitionedCall")
                assert call.device == device
    calls = [n for n in ops if n.endswith(("/fwd", "/bwd")) and n.startswith("dapple/mb")]
    assert len(calls) == 2 * plan.num_micro_batches * len(built.device_of_slot)
    handles = sorted(
        op.name for op in ops.values() if op.type == "VarHandleOp" and op.name in template.variables
    )
    assert handles == sorted(template.variables)  # one variable each, never cloned


# ---- accumulate -------------------------------------------------------------------------------
def test_accumulator_keeps_the_newest_dense_running_sum_and_concatenates_sparse_rows():
    with tf.Graph().as_default(), v1.Session() as session:
        acc = SlotAccumulator("dapple/accumulate/s0r0")
        acc.update("w", tf.constant([1.0, 2.0]))
        acc.update("w", tf.constant([4.0, 6.0]))  # the backward returns the new running sum
        for rows, values in (([0, 2], [[1.0], [2.0]]), ([2], [[5.0]])):
            acc.update(
                "table",
                tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([3, 1])),
            )
        result = acc.result()
        assert isinstance(result["table"], tf.IndexedSlices)
        w, indices, values = session.run(
            [result["w"], result["table"].indices, result["table"].values]
        )
    np.testing.assert_array_equal(w, [4.0, 6.0])
    assert indices.tolist() == [0, 2, 2] and values.ravel().tolist() == [1.0, 2.0, 5.0]


def test_sum_of_dense_and_sparse_gradients_is_dense_and_exact():
    with tf.Graph().as_default(), v1.Session() as session:
        sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([1]), tf.constant([2, 2]))
        total = sum_gradients([tf.ones([2, 2]), sparse, None], "sum")
        assert not isinstance(total, tf.IndexedSlices)
        np.testing.assert_array_equal(session.run(total), [[1.0, 1.0], [2.0, 2.0]])


# ---- allreduce --------------------------------------------------------------------------------
def test_local_sync_sums_replicas_then_tied_stages_on_the_variables_device():
    sync = LocalGradientSync()
    with tf.Graph().as_default(), v1.Session() as session:
        by_replica = {
            0: {"w": tf.constant(1.0), "b": tf.constant(10.0)},
            1: {"w": tf.constant(2.0), "b": tf.constant(20.0)},
        }
        stage0 = sync.sum_replicas(0, by_replica, {"w": "/CPU:0", "b": "/CPU:0"})
        assert stage0["w"].device.endswith("CPU:0")
        alone = tf.constant(5.0)
        total = sync.sum_stages(
            {0: stage0, 1: {"w": tf.constant(100.0), "v": alone}},
            {"w": "/CPU:0", "b": "/CPU:0", "v": "/CPU:1"},
        )
        assert total["v"] is alone  # read by one stage only: nothing to sum
        assert session.run({k: total[k] for k in ("w", "b")}) == {"w": 103.0, "b": 30.0}
