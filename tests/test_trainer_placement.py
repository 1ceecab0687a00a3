"""Placement: every op of a stage clone runs on its slot's device (graph and a real step), and
1F1B holds less live activation memory on stage 0 than GPipe (measured from the allocator
records of a real step)."""

import functools
import re

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.memory import peak_live_bytes
from dapple_tf.trainer import Trainer
from graph_rewrite.place import Slot
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

CLONE = re.compile(r"^dapple/mb\d+/s(\d+)r(\d+)/")
BOUNDARY = re.compile(r"^dapple/mb\d+/s(\d+)_to_s(\d+)/(send|recv)(?:_r(\d+))?$")
# Ops TensorFlow's placer puts with the resource they access (the variable's device), whatever
# device the clone asked for. Everything else of a clone must run on the clone's device.
# Nodes the runtime adds when it partitions the graph (cross-device control-edge and _Send/_Recv
# helpers, named '<dst op>/_<n>'): transfer machinery, not clone ops.
RUNTIME_INSERTED = re.compile(r"/_\d+$")
RESOURCE_ACCESS_OPS = {"ReadVariableOp", "ResourceGather", "VariableShape", "VarHandleOp"}


def sgd():
    return tf.compat.v1.train.GradientDescentOptimizer(0.1)


@functools.lru_cache(maxsize=None)
def trainer_for(model, replicas, num_micro_batches, schedule="1f1b"):
    case = models.ALL[model]
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, list(replicas), 12, num_micro_batches, schedule)
    return Trainer(case.model_fn, case.feature_spec, sgd, plan, 12, seed=3)


def expected_device(trainer, name):
    match = CLONE.match(name)
    if match:
        return trainer.rewritten.device_of_slot[Slot(int(match[1]), int(match[2]))]
    match = BOUNDARY.match(name)
    if match:
        a, b, kind, replica = int(match[1]), int(match[2]), match[3], int(match[4] or 0)
        return trainer.rewritten.device_of_slot[Slot(a if kind == "send" else b, replica)]
    return None


@pytest.mark.parametrize(
    "model,replicas", [("transformer", (1, 1, 1)), ("sparse", (2, 1)), ("rnn", (1, 2))]
)
def test_every_clone_and_boundary_op_is_assigned_its_slots_device(model, replicas):
    trainer = trainer_for(model, replicas, 2)
    checked = 0
    for op in trainer.graph.get_operations():
        device = expected_device(trainer, op.name)
        if device is not None:
            assert op.device == device, f"{op.name} ({op.type}) on {op.device!r}, want {device}"
            checked += 1
    # each clone is one call of its stage's forward or backward function
    calls = {
        op.name for op in trainer.graph.get_operations() if op.type == "StatefulPartitionedCall"
    }
    assert calls == {
        f"dapple/mb{i}/{slot.tag}/{part}"
        for i in range(2)
        for slot in trainer.rewritten.local_slots
        for part in ("fwd", "bwd")
    }
    assert checked > len(calls)  # the calls and the boundary ops


@pytest.mark.parametrize(
    "model,replicas", [("transformer", (1, 1, 1)), ("sparse", (2, 1)), ("rnn", (1, 2))]
)
def test_every_clone_op_of_a_real_step_ran_on_its_slots_device(model, replicas):
    trainer = trainer_for(model, replicas, 2)
    case = models.ALL[model]
    _, metadata = trainer.traced_step(case.make_batch(np.random.default_rng(0), 12))
    misplaced, checked = [], 0
    for dev in metadata.step_stats.dev_stats:
        for node in dev.node_stats:
            want = expected_device(trainer, node.node_name)
            if want is None or RUNTIME_INSERTED.search(node.node_name):
                continue
            op_type = (
                node.timeline_label.split(" = ")[1].split("(")[0]
                if " = " in node.timeline_label
                else ""
            )
            checked += 1
            if dev.device != want and op_type not in RESOURCE_ACCESS_OPS:
                misplaced.append((node.node_name, op_type, dev.device, want))
    assert checked > 100
    assert not misplaced, misplaced[:10]


def test_1f1b_holds_less_live_activation_memory_on_stage_0_than_gpipe():
    fn = functools.partial(models.mlp_fn, depth=7, width=256)
    spec = models.MLP.feature_spec
    layers = build_template(fn, spec).layers
    batch = models.MLP.make_batch(np.random.default_rng(0), 256)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        plan = even_plan(layers, [1, 1, 1, 1], 256, 8, schedule)
        trainer = Trainer(fn, spec, sgd, plan, 256, seed=1)
        trainer.train_step(batch)
        _, metadata = trainer.traced_step(batch)
        device = trainer.rewritten.device_of_slot[Slot(0, 0)]
        peaks[schedule] = peak_live_bytes(metadata, device, re.compile(r"^dapple/mb\d+/s0r0/"))
        trainer.close()
    print(
        f"\nstage 0 peak live activation memory, 4 stages, M=8: "
        f"gpipe {peaks['gpipe']} bytes, 1f1b {peaks['1f1b']} bytes"
    )
    assert 0 < peaks["1f1b"] < peaks["gpipe"]
