"""Transposed forward weights (graph_rewrite/transposed_weights.py): forward matmuls of
micro-batched CPU stages read their weight transposed, computed once per step per slot, and
training still equals single-device training.
"""

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf import compat
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import build_template
from graph_rewrite.transposed_weights import prefers_transposed_weights, transpose_weight_reads
from planner.plan_format import even_plan

v1 = tf.compat.v1
GLOBAL_BATCH = 24
STEPS = 3
SEED = 5


def forward_graph_def():
    """x @ w (rewired), x @ w with transpose_b (kept), x @ p with p not a variable (kept),
    float64 x @ d (kept)."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [4, 3], name="x")
        w = v1.get_variable("w", [3, 3], use_resource=True)
        d = v1.get_variable("d", [3, 3], tf.float64, use_resource=True)
        p = v1.placeholder(tf.float32, [3, 3], name="p")
        tf.matmul(x, w, name="plain")
        tf.matmul(x, w, transpose_b=True, name="already_transposed")
        tf.matmul(x, p, name="not_a_variable")
        tf.matmul(tf.cast(x, tf.float64), d, name="double")
    return graph.as_graph_def()


def test_a_forward_matmul_reading_a_variable_reads_its_transpose():
    graph_def = forward_graph_def()
    inputs = transpose_weight_reads(graph_def, ["w", "d"])
    assert inputs == {"dapple_transposed/w:0": "w"}
    node = {n.name: n for n in graph_def.node}
    assert list(node["plain"].input) == ["x", "dapple_transposed/w:0"]
    assert node["plain"].attr["transpose_b"].b


@pytest.mark.parametrize("name", ["already_transposed", "not_a_variable", "double"])
def test_other_matmuls_are_left_alone(name):
    before = {n.name: n for n in forward_graph_def().node}[name]
    graph_def = forward_graph_def()
    transpose_weight_reads(graph_def, ["w", "d"])
    assert {n.name: n for n in graph_def.node}[name] == before


def test_the_pass_applies_to_cpu_stages_with_onednn_and_small_micro_batches(monkeypatch):
    monkeypatch.setattr(compat, "onednn_enabled", lambda: True)
    assert prefers_transposed_weights("/job:localhost/replica:0/task:0/device:CPU:1", 64)
    assert not prefers_transposed_weights("/device:CPU:0", 512)
    assert not prefers_transposed_weights("/device:GPU:0", 64)
    monkeypatch.setattr(compat, "onednn_enabled", lambda: False)
    assert not prefers_transposed_weights("/device:CPU:0", 64)


def batches(case):
    rng = np.random.default_rng(11)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


def optimizer():
    return v1.train.MomentumOptimizer(0.1, momentum=0.9)


@pytest.mark.parametrize(
    "model,replicas",
    [("mlp", [1, 1]), ("mlp", [2, 1]), ("transformer", [1, 1]), ("skip", [1, 1, 1])],
)
def test_transposed_weights_train_like_single_device(monkeypatch, model, replicas):
    monkeypatch.setattr(compat, "onednn_enabled", lambda: True)
    case = models.ALL[model]
    plan = even_plan(
        build_template(case.model_fn, case.feature_spec).layers, replicas, GLOBAL_BATCH, 4, "1f1b"
    )
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    single = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer, GLOBAL_BATCH, seed=SEED, optimize_graph=False
    )
    try:
        assert any(stage.transposed_weights for stage in trainer.rewritten.stage_graphs)
        for batch in batches(case):
            np.testing.assert_allclose(
                trainer.train_step(batch), single.train_step(batch), rtol=1e-5, atol=1e-6
            )
        expected = single.get_weights()
        final = trainer.get_weights()
        for name, value in expected.items():
            np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    finally:
        trainer.close()
        single.close()


def test_each_weight_is_transposed_once_per_step_per_slot(monkeypatch):
    """MLP (7 kernels) on one stage, M = 4: 7 transposes run per step, not 4 x 7, and every
    forward matmul of a kernel reads its transpose."""
    monkeypatch.setattr(compat, "onednn_enabled", lambda: True)
    case = models.MLP
    plan = even_plan(
        build_template(case.model_fn, case.feature_spec).layers, [1], GLOBAL_BATCH, 4, "1f1b"
    )
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        num_devices=1,
        optimize_graph=False,
    )
    try:
        (stage,) = trainer.rewritten.stage_graphs
        kernels = {v for v in trainer.template.variables if v.endswith("kernel")}
        assert set(stage.transposed_weights.values()) == kernels
        _, metadata = trainer.traced_step(batches(case)[0])
        ran = [n.node_name for d in metadata.step_stats.dev_stats for n in d.node_stats]
        transposes = [
            n for n in ran if n.startswith("dapple/transposed/s0r0/") and n.endswith("kernel")
        ]
        assert sorted(transposes) == sorted(f"dapple/transposed/s0r0/{v}" for v in kernels)
    finally:
        trainer.close()


def test_a_stage_of_512_rows_per_call_is_left_alone(monkeypatch):
    monkeypatch.setattr(compat, "onednn_enabled", lambda: True)
    case = models.MLP
    plan = even_plan(build_template(case.model_fn, case.feature_spec).layers, [1], 1024, 1, "1f1b")
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        1024,
        seed=SEED,
        num_devices=1,
        optimize_graph=False,
    )
    try:
        assert not trainer.rewritten.stage_graphs[0].transposed_weights
    finally:
        trainer.close()
