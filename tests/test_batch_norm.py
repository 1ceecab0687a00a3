"""Batch norm in the pipelined Trainer (issue #13 item 5; docs/tf1-models.md, Batch norm).

UPDATE_OPS run once per step on the statistics of the whole global batch; each micro-batch
clone normalises with its own statistics. So:
  - M = 1 and one replica per stage: everything (losses, weights, moving statistics) equals
    SingleDeviceTrainer on the global batch;
  - any M and replicas: everything equals a single-device reference that normalises each clone's
    rows (M x replicas equal chunks of the batch, per layer) by their own statistics and updates
    the moving statistics from the whole batch's (`ghost` chunks below);
  - the moving statistics of a batch norm on the features equal SingleDeviceTrainer's for any
    plan (its input does not depend on how earlier layers normalised);
  - an update that is not a recognised moving-statistics update is refused, naming it.
Model: tests/batch_norm_model.py, with tf.nn.moments batch norm (`v1.assign` and
`assign_moving_average` updates) and FusedBatchNormV3 (its variance output is
Bessel-corrected). Two ranks: tests/test_trainer_multirank.py.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from batch_norm_model import LAYERS, SPEC, bn_model, ghost_chunks, make_batch, model
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import TemplateError, build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
GLOBAL_BATCH = 32
STEPS = 3
SEED = 5


def optimizer():
    return v1.train.MomentumOptimizer(0.05, momentum=0.9)


def batches():
    rng = np.random.default_rng(3)
    return [make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def reference_run(chunks, fused):
    trainer = SingleDeviceTrainer(
        model(chunks, fused),
        SPEC,
        optimizer,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    try:
        initial = trainer.get_weights()
        losses = [trainer.train_step(b) for b in batches()]
        return initial, losses, trainer.get_weights()
    finally:
        trainer.close()


def pipelined_run(replicas, schedule, num_micro_batches, fused, stack=False, check=None):
    plan = even_plan(LAYERS, replicas, GLOBAL_BATCH, num_micro_batches, schedule)
    trainer = Trainer(
        model(fused=fused),
        SPEC,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
        stack_weight_gradients=stack,
    )
    try:
        if check:
            check(trainer)
        initial = trainer.get_weights()
        losses = [trainer.train_step(b) for b in batches()]
        return plan, initial, losses, trainer.get_weights()
    finally:
        trainer.close()


def assert_same_training(got, expected, names=None):
    _, initial, losses, final = got
    expected_initial, expected_losses, expected_final = expected
    for name, value in expected_initial.items():
        np.testing.assert_array_equal(initial[name], value, err_msg=f"initial {name}")
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert sorted(final) == sorted(expected_final)
    for name in names or expected_final:
        np.testing.assert_allclose(
            final[name], expected_final[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


MOVING = [f"layer_{k}/{s}" for k in range(3) for s in ("moving_mean", "moving_variance")]


def test_the_single_device_reference_updates_moving_statistics():
    _, _, final = reference_run((1, 1, 1), False)
    assert not np.allclose(final["layer_0/moving_mean"], 0.0)
    assert not np.allclose(final["layer_2/moving_variance"], 1.0)


def test_the_template_holds_the_moving_statistics_as_non_trainable_variables():
    template = build_template(bn_model, SPEC)
    assert len(template.moving_updates) == 6
    for name in MOVING:
        assert not template.variables[name].trainable
    assert {s.kind for s in template.statistics.values()} == {"mean", "variance"}


@pytest.mark.parametrize("fused", [False, True], ids=["moments", "fused"])
@pytest.mark.parametrize(
    "replicas,schedule", [([1, 1], "1f1b"), ([1, 1, 1, 1], "gpipe"), ([1, 1, 1, 1], "1f1b")]
)
def test_one_micro_batch_one_replica_trains_exactly_like_single_device(replicas, schedule, fused):
    got = pipelined_run(replicas, schedule, 1, fused)
    assert_same_training(got, reference_run((1, 1, 1), fused))


@pytest.mark.parametrize("fused", [False, True], ids=["moments", "fused"])
@pytest.mark.parametrize(
    "replicas,schedule,num_micro_batches",
    [([2, 1], "gpipe", 4), ([1, 1, 2, 1], "1f1b", 4), ([1, 2], "1f1b", 1)],
)
def test_micro_batches_normalise_alone_and_moving_statistics_see_the_global_batch(
    replicas, schedule, num_micro_batches, fused
):
    got = pipelined_run(replicas, schedule, num_micro_batches, fused)
    chunks = ghost_chunks(got[0])
    assert max(chunks) > 1
    assert_same_training(got, reference_run(chunks, fused))


@pytest.mark.parametrize(
    "replicas,kernels",
    [
        ([1], {"layer_2/kernel"}),  # one stage stacks whole backwards: not through a batch norm
        ([2, 1], {"layer_0/kernel", "layer_1/kernel", "layer_2/kernel"}),
    ],
)
def test_stacked_weight_gradients_keep_a_beta_gradient_the_input_gradient_reads_per_micro_batch(
    replicas, kernels
):
    """`stack_weight_gradients=True`: beta's gradient (a sum over rows) also feeds the input
    gradient through the batch mean, so it stays per micro-batch. On a pipeline, activation
    gradients are computed per micro-batch, so every kernel is stacked, batch norms or not."""

    def check(trainer):
        stacked = {v for s in trainer.rewritten.stage_graphs for v in s.stacked_gradients}
        assert {v for v in stacked if v.endswith("kernel")} == kernels
        assert not {v for v in stacked if v.endswith("/beta")}

    got = pipelined_run(replicas, "1f1b", 4, False, stack=True, check=check)
    assert_same_training(got, reference_run(ghost_chunks(got[0]), False))


@pytest.mark.parametrize("fused", [False, True], ids=["moments", "fused"])
def test_zb_h1_keeps_a_beta_gradient_the_input_gradient_reads_in_i(fused):
    """zb-h1 (W actions, tests/test_zero_bubble.py): the kernels' gradients are deferred to W;
    beta's (a sum over rows that also feeds the input gradient) stays in the I call, but on the
    first stage, which sends no input gradient and defers its whole backward."""

    def check(trainer):
        stages = trainer.rewritten.stage_graphs
        deferred = {
            v for s in stages if s.deferred_weights for v in s.deferred_weights.variable_grads
        }
        kept = {v for s in stages for v in s.variable_grads}
        assert {v for v in deferred if v.endswith("kernel")} == {
            "layer_0/kernel",
            "layer_1/kernel",
            "layer_2/kernel",
        }
        assert {"layer_1/beta", "layer_2/beta"} <= kept
        assert stages[0].variable_grads == {}  # a first stage sends no input gradient

    got = pipelined_run([1, 2, 1], "zb-h1", 4, fused, check=check)
    assert_same_training(got, reference_run(ghost_chunks(got[0]), fused))


@pytest.mark.parametrize("replicas,schedule", [([2, 1], "1f1b"), ([1, 1, 1, 1], "gpipe")])
def test_moving_statistics_of_the_features_equal_single_device_for_any_micro_batches(
    replicas, schedule
):
    """The first batch norm reads the features: the same rows however the batch is split, so
    its moving statistics equal plain single-device training's after every step (the deeper
    ones summarise activations normalised per micro-batch, which differ by design)."""
    _, _, _, final = pipelined_run(replicas, schedule, 4, False)
    _, _, expected = reference_run((1, 1, 1), False)
    for name in ("layer_0/moving_mean", "layer_0/moving_variance"):
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(final["layer_1/kernel"], expected["layer_1/kernel"], rtol=1e-4)


def _refused(model_fn, match):
    plan = even_plan(("bn", "loss"), [1, 1], 8, 2, "1f1b")
    with pytest.raises(TemplateError, match=match):
        Trainer(
            model_fn,
            {"x": ((4,), tf.float32)},
            lambda: v1.train.GradientDescentOptimizer(0.1),
            plan,
            8,
            optimize_graph=False,
        )


def _moving(name="moving"):
    return v1.get_variable(name, [4], initializer=v1.zeros_initializer(), trainable=False)


def _loss_of(x):
    with layer("loss"):
        return tf.reduce_mean(tf.square(x))


def test_an_update_reading_rows_instead_of_a_statistic_is_refused_naming_it():
    def model(features):
        with layer("bn"):
            x = features["x"] * v1.get_variable("scale", [4])
            moving = _moving()
            v1.add_to_collection(
                v1.GraphKeys.UPDATE_OPS, v1.assign(moving, 0.9 * moving + 0.1 * x[0])
            )
        return _loss_of(x)

    _refused(
        model,
        r"update bn/AssignVariableOp of bn/moving: bn/strided_slice \(StridedSlice\) reads bn/mul:0",
    )


def test_an_update_reading_a_sum_over_rows_is_refused():
    def model(features):
        with layer("bn"):
            x = features["x"] * v1.get_variable("scale", [4])
            moving = _moving()
            total = tf.reduce_sum(x, 0)  # grows with the rows: not a per-feature statistic
            v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, v1.assign(moving, total))
        return _loss_of(x)

    _refused(model, r"bn/Sum \(Sum\) reads bn/mul:0, .*not a per-feature statistic")


def test_an_update_op_that_is_not_an_assign_is_refused_naming_it():
    def model(features):
        with layer("bn"):
            x = features["x"] * v1.get_variable("scale", [4])
            v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, tf.reduce_mean(x, name="not_an_update"))
        return _loss_of(x)

    _refused(model, r"UPDATE_OPS holds bn/not_an_update \(Mean\)")


def test_moving_statistics_are_checkpointed_and_restore_into_single_device(tmp_path):
    plan = even_plan(LAYERS, [1, 1], GLOBAL_BATCH, 2, "1f1b")
    trainer = Trainer(bn_model, SPEC, optimizer, plan, GLOBAL_BATCH, seed=SEED)
    try:
        trainer.train_step(batches()[0])
        saved = trainer.get_weights()
        path = trainer.save(tmp_path / "ckpt")
    finally:
        trainer.close()
    reference = SingleDeviceTrainer(bn_model, SPEC, optimizer, GLOBAL_BATCH, seed=SEED + 1)
    try:
        reference.restore(path)
        restored = reference.get_weights()
    finally:
        reference.close()
    assert not np.allclose(saved["layer_1/moving_mean"], 0.0)  # updated by the step
    for name in MOVING:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
