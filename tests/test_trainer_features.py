"""Trainer features, one fact per test, each checked against the single-device build."""

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import build_template
from planner.plan_format import PlanError, even_plan

v1 = tf.compat.v1
SEED = 11


def sgd():
    return v1.train.GradientDescentOptimizer(0.2)


def momentum():
    return v1.train.MomentumOptimizer(0.1, momentum=0.9)


def adam():
    return v1.train.AdamOptimizer(0.01)


def make_plan(case, replicas, gbs, num_micro_batches, schedule="1f1b"):
    layers = build_template(case.model_fn, case.feature_spec).layers
    return even_plan(layers, replicas, gbs, num_micro_batches, schedule)


def train_both(case, plan, optimizer_fn, steps=3, clip_norm=None, optimize_graph=True):
    """(pipelined trainer, single-device trainer, pipelined losses, single losses).
    optimize_graph=False (Grappler off) keeps the first step of the bigger models fast."""
    gbs = plan.global_batch_size
    pipelined = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer_fn,
        plan,
        gbs,
        seed=SEED,
        clip_norm=clip_norm,
        optimize_graph=optimize_graph,
    )
    single = SingleDeviceTrainer(
        case.model_fn,
        case.feature_spec,
        optimizer_fn,
        gbs,
        seed=SEED,
        clip_norm=clip_norm,
        optimize_graph=optimize_graph,
    )
    rng = np.random.default_rng(5)
    got, want = [], []
    for _ in range(steps):
        batch = case.make_batch(rng, gbs)
        got.append(pipelined.train_step(batch))
        want.append(single.train_step(batch))
    return pipelined, single, got, want


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    wa, wb = a.get_weights(), b.get_weights()
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=rtol, atol=atol, err_msg=name)


def test_tied_embedding_gets_the_sum_of_both_stages_gradients():
    case = models.TRANSFORMER
    plan = make_plan(case, [1, 1], 8, 2)
    pipelined, single, got, want = train_both(case, plan, sgd, steps=2, optimize_graph=False)
    specs = pipelined.rewritten.stage_graphs
    assert "embedding/table" in specs[0].variable_grads  # lookup in stage 0
    assert "embedding/table" in specs[1].variable_grads  # output projection in stage 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)


@pytest.mark.parametrize("replicas", [[1, 1, 1, 1], [3, 1], [2, 2], [1, 2]])
def test_skip_connection_and_batch_independent_tensor_cross_stages(replicas):
    case = models.SKIP
    plan = make_plan(case, replicas, 12, 2)
    pipelined, single, got, want = train_both(case, plan, momentum)
    if len(replicas) == 4:  # the skip tensor goes from stage 0 straight to stage 3
        names = {op.name for op in pipelined.graph.get_operations()}
        assert "dapple/mb0/s0_to_s3/send" in names and "dapple/mb0/s3_to_s0/recv" in names
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)


def test_embedding_gradient_stays_sparse_and_matches_single_device():
    case = models.SPARSE
    plan = make_plan(case, [2, 1], 8, 2)
    pipelined, single, got, want = train_both(case, plan, adam)
    assert isinstance(pipelined.rewritten.gradients["embedding/table"], tf.IndexedSlices)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)


def test_while_loop_rnn_stage_is_cloned_with_its_while_op():
    case = models.RNN
    plan = make_plan(case, [1, 1], 8, 2, "gpipe")
    pipelined, single, got, want = train_both(case, plan, sgd, steps=2, optimize_graph=False)
    forward = pipelined.rewritten.stage_graphs[0].forward_function
    assert {n.op for n in forward.function.node_def} & {"While", "StatelessWhile"}
    call = pipelined.graph.get_operation_by_name("dapple/mb1/s0r0/fwd")
    assert call.get_attr("f").name == forward.name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)
    _, metadata = pipelined.traced_step(case.make_batch(np.random.default_rng(1), 8))
    ran = {n.node_name for d in metadata.step_stats.dev_stats for n in d.node_stats}
    assert any(n.startswith("dapple/mb1/s0r0/fwd/rnn_0/while") for n in ran), sorted(ran)[:20]


@pytest.mark.parametrize("optimizer_fn,slot", [(adam, "Adam"), (momentum, "Momentum")])
def test_optimizer_slots_are_created_once_and_updated_once_per_step(optimizer_fn, slot):
    case = models.MLP
    plan = make_plan(case, [2, 2], 16, 4)
    pipelined, single, got, want = train_both(case, plan, optimizer_fn, steps=4)
    weights = pipelined.get_weights()
    model_vars = [v for v in pipelined.rewritten.variables]
    slots = [n for n in weights if n.split("/")[-1].startswith(slot)]
    expected_per_var = 2 if slot == "Adam" else 1
    assert len(slots) == expected_per_var * len(model_vars)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)


def test_global_step_advances_by_one_per_step():
    case = models.MLP
    trainer = Trainer(
        case.model_fn, case.feature_spec, sgd, make_plan(case, [1, 1, 1], 12, 3), 12, seed=SEED
    )
    rng = np.random.default_rng(0)
    assert trainer.global_step == 0
    for step in range(1, 4):
        trainer.train_step(case.make_batch(rng, 12))
        assert trainer.global_step == step


def test_clipping_uses_the_global_norm_of_the_whole_model():
    case = models.MLP
    plan = make_plan(case, [1, 1, 1, 1], 16, 4)
    pipelined, single, got, want = train_both(case, plan, sgd, steps=3, clip_norm=0.05)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_same_weights(pipelined, single)
    unclipped = SingleDeviceTrainer(case.model_fn, case.feature_spec, sgd, 16, seed=SEED)
    rng = np.random.default_rng(5)
    for _ in range(3):
        unclipped.train_step(case.make_batch(rng, 16))
    kernel = "layer_0/dense/kernel"
    assert not np.allclose(
        unclipped.get_weights()[kernel], pipelined.get_weights()[kernel], rtol=1e-3
    )  # the clip was active


def test_returned_loss_is_the_mean_over_the_global_batch():
    def model_fn(features):
        with layer("a"):
            h = features["x"] * v1.get_variable("w", [], initializer=v1.ones_initializer())
        with layer("b"):
            return tf.reduce_mean(h)

    spec = {"x": ((), tf.float32)}
    plan = even_plan(("a", "b"), [1, 3], 24, 2)
    trainer = Trainer(model_fn, spec, sgd, plan, 24)
    x = np.arange(24, dtype=np.float32) ** 2
    assert trainer.train_step({"x": x}) == pytest.approx(float(np.mean(x)), rel=1e-6)


@pytest.mark.parametrize("direction", ["pipelined_to_single", "single_to_pipelined"])
def test_checkpoints_restore_across_pipelined_and_single_device_builds(direction, tmp_path):
    case = models.MLP
    plan = make_plan(case, [2, 1], 8, 2)
    pipelined = Trainer(case.model_fn, case.feature_spec, adam, plan, 8, seed=SEED)
    single = SingleDeviceTrainer(case.model_fn, case.feature_spec, adam, 8, seed=SEED + 1)
    source, target = (
        (pipelined, single) if direction == "pipelined_to_single" else (single, pipelined)
    )
    rng = np.random.default_rng(1)
    for _ in range(2):
        source.train_step(case.make_batch(rng, 8))
    path = str(tmp_path / "ckpt")
    source.save(path)
    target.restore(path)
    assert target.global_step == 2
    assert_same_weights(source, target, rtol=0, atol=0)
    # Training continues identically from the restored state.
    batch = case.make_batch(rng, 8)
    assert target.train_step(batch) == pytest.approx(source.train_step(batch), rel=1e-5)


def test_too_few_devices_is_an_error_saying_how_many_the_plan_needs():
    case = models.MLP
    plan = make_plan(case, [4, 4, 1], 8, 1)
    with pytest.raises(PlanError, match="needs 9 devices, but only 8"):
        Trainer(case.model_fn, case.feature_spec, sgd, plan, 8, num_devices=8)


def test_plan_for_another_global_batch_is_rejected():
    case = models.MLP
    with pytest.raises(PlanError, match="global batch size 8"):
        Trainer(case.model_fn, case.feature_spec, sgd, make_plan(case, [1, 1], 8, 1), 16)


def test_plan_json_path_is_accepted(tmp_path):
    case = models.MLP
    plan = make_plan(case, [1, 1], 8, 2)
    plan.save(tmp_path / "plan.json")
    trainer = Trainer(case.model_fn, case.feature_spec, sgd, str(tmp_path / "plan.json"), 8)
    assert trainer.plan == plan


def test_set_weights_rejects_unknown_names():
    case = models.MLP
    trainer = Trainer(case.model_fn, case.feature_spec, sgd, make_plan(case, [1, 1], 8, 1), 8)
    with pytest.raises(KeyError, match="nope"):
        trainer.set_weights({"nope": np.zeros(1)})


def test_run_metadata_traces_one_training_step_with_every_stage_device():
    case = models.MLP
    trainer = Trainer(case.model_fn, case.feature_spec, sgd, make_plan(case, [1, 2], 8, 2), 8)
    metadata = trainer.run_metadata(case.make_batch(np.random.default_rng(0), 8))
    assert {d.device for d in metadata.step_stats.dev_stats} >= set(
        trainer.rewritten.device_of_slot.values()
    )
    assert trainer.global_step == 1
