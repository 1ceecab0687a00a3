"""Stacked weight gradients (`stack_weight_gradients=True`, graph_rewrite/stacked_gradients.py):
the weight gradients that are sums over rows are computed once per step over the stacked rows
of all micro-batches, and training still equals single-device training; gradients that are not
such sums keep the per-micro-batch path.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from equivalence import assert_same_training
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.backward_split import split_backward
from graph_rewrite.graphdefs import GradRef
from graph_rewrite.stacked_gradients import plan_stacking
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
GLOBAL_BATCH = 24
STEPS = 3
SEED = 5
OPTIMIZERS = {
    "momentum": lambda: v1.train.MomentumOptimizer(0.1, momentum=0.9),
    "adam": lambda: v1.train.AdamOptimizer(0.01),
}


def regularized_fn(features):
    """An MLP whose last kernel also gets an L2 term: that gradient reads the loss seed, not
    only rows, so it must not be stacked."""
    h = features["x"]
    with layer("hidden"):
        h = models._dense(h, 8, "dense", tf.nn.relu)
    with layer("loss"):
        w = v1.get_variable("kernel", [8, 4], initializer=v1.glorot_uniform_initializer())
        return models._xent(tf.matmul(h, w), features["y"]) + 0.01 * tf.reduce_sum(tf.square(w))


def tied_dense_fn(features):
    """One 8x8 kernel used by layers `a` and `c` (stages 0 and 1 of a 1:1 plan) and twice
    within `c`: its gradient is the sum of three stacked matmuls from two stages."""
    with layer("a"):
        shared = v1.get_variable("shared", [8, 8], initializer=v1.glorot_uniform_initializer())
        h = tf.tanh(tf.matmul(features["x"], shared))
    with layer("b"):
        h = models._dense(h, 8, "dense", tf.tanh)
    with layer("c"):
        h = tf.tanh(tf.matmul(tf.tanh(tf.matmul(h, shared)), shared))
    with layer("loss"):
        return models._xent(models._dense(h, 4, "logits"), features["y"])


REGULARIZED = models.ModelCase(
    "regularized", regularized_fn, models.MLP.feature_spec, models.MLP.make_batch
)
TIED_DENSE = models.ModelCase(
    "tied_dense", tied_dense_fn, models.MLP.feature_spec, models.MLP.make_batch
)
CASES = {**models.ALL, "regularized": REGULARIZED, "tied_dense": TIED_DENSE}


def batches(case):
    rng = np.random.default_rng(11)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def single_device_run(model, optimizer):
    case = CASES[model]
    trainer = SingleDeviceTrainer(
        case.model_fn,
        case.feature_spec,
        OPTIMIZERS[optimizer],
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    losses = [trainer.train_step(b) for b in batches(case)]
    final = trainer.get_weights()
    trainer.close()
    return losses, final


def stacked_trainer(
    model,
    replicas,
    num_micro_batches,
    optimizer="momentum",
    schedule="1f1b",
    optimize_graph=False,
    stack=True,
):
    case = CASES[model]
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, replicas, GLOBAL_BATCH, num_micro_batches, schedule)
    return Trainer(
        case.model_fn,
        case.feature_spec,
        OPTIMIZERS[optimizer],
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=optimize_graph,
        stack_weight_gradients=stack,
    )


def assert_trains_like_single_device(trainer, model, optimizer):
    expected_losses, expected = single_device_run(model, optimizer)
    losses = [trainer.train_step(b) for b in batches(CASES[model])]
    assert_same_training(losses, trainer.get_weights(), expected_losses, expected)


def stacked_variables(trainer):
    return {v for stage in trainer.rewritten.stage_graphs for v in stage.stacked_gradients}


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize(
    "model,replicas,schedule",
    [
        ("mlp", [1, 1], "1f1b"),
        ("mlp", [2, 1], "gpipe"),  # replicas: each replica stacks its own rows
        ("transformer", [1, 1], "1f1b"),  # tied embedding; only layer-norm gains stack
        ("skip", [1, 1, 1], "1f1b"),  # skip connection from stage 0 to stage 2
        ("sparse", [1, 1], "1f1b"),  # IndexedSlices embedding gradient
        ("rnn", [1, 1], "1f1b"),  # while loops: only the logits bias stacks
    ],
)
def test_stacked_weight_gradients_train_like_single_device(model, replicas, schedule, optimizer):
    trainer = stacked_trainer(model, replicas, 4, optimizer, schedule)
    try:
        assert stacked_variables(trainer), "nothing was stacked"
        assert_trains_like_single_device(trainer, model, optimizer)
    finally:
        trainer.close()


def test_every_dense_layer_of_an_mlp_is_stacked():
    trainer = stacked_trainer("mlp", [1, 1], 4)
    try:
        dense = {v for v in trainer.template.variables if v.endswith(("kernel", "bias"))}
        assert stacked_variables(trainer) == dense
    finally:
        trainer.close()


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_a_kernel_tied_across_stages_is_stacked_in_both_and_trains_like_single_device(optimizer):
    trainer = stacked_trainer("tied_dense", [1, 1], 4, optimizer)
    try:
        for stage in trainer.rewritten.stage_graphs:
            assert "a/shared" in stage.stacked_gradients, stage.spec.layers
        assert_trains_like_single_device(trainer, "tied_dense", optimizer)
    finally:
        trainer.close()


def test_gradients_that_are_not_row_sums_keep_the_per_micro_batch_path():
    trainer = stacked_trainer("regularized", [1, 1], 4)
    try:
        assert "loss/kernel" not in stacked_variables(trainer)  # reads the loss seed
        assert "hidden/dense/kernel" in stacked_variables(trainer)
        assert "loss/kernel" in trainer.rewritten.stage_graphs[1].variable_grads
        assert_trains_like_single_device(trainer, "regularized", "momentum")
    finally:
        trainer.close()


def test_embedding_gradient_stays_sparse_and_per_micro_batch():
    trainer = stacked_trainer("sparse", [1, 1], 4)
    try:
        assert "embedding/table" not in stacked_variables(trainer)
        assert trainer.rewritten.stage_graphs[0].variable_grads["embedding/table"].is_sparse
    finally:
        trainer.close()


def matmuls_of_a_traced_step(trainer, batch):
    _, metadata = trainer.traced_step(batch)
    return [
        n.node_name
        for d in metadata.step_stats.dev_stats
        for n in d.node_stats
        if n.timeline_label.split("(")[0].endswith("MatMul")
    ]  # also oneDNN's _Mkl*MatMul


@pytest.mark.parametrize("optimize_graph", [False, True])
def test_one_stage_runs_one_weight_gradient_matmul_per_kernel_per_step(optimize_graph):
    """MLP (6 tanh layers + logits: 7 kernels), one stage, M = 4: per step 4 x 7 forward matmuls,
    4 x 6 input-gradient matmuls are not needed (the stage's input is a feature) and 7
    weight-gradient matmuls over the stacked rows, instead of 4 x 7 without stacking."""
    batch = batches(models.MLP)[0]
    counts = {}
    for stack in (False, True):
        trainer = stacked_trainer("mlp", [1], 4, optimize_graph=optimize_graph, stack=stack)
        try:
            counts[stack] = matmuls_of_a_traced_step(trainer, batch)
        finally:
            trainer.close()
    stacked = [n for n in counts[True] if "/weight_gradients/" in n]
    assert len(stacked) == 7 + 6  # 7 kernel gradients + 6 input gradients, stacked
    assert all(n.startswith("dapple/accumulate/s0r0/weight_gradients/call/") for n in stacked)
    assert not [n for n in counts[True] if "/bwd/" in n]
    assert len([n for n in counts[False] if "/bwd/" in n]) == 4 * (7 + 6)
    assert len(counts[True]) == 4 * 7 + 7 + 6


def test_a_pipelined_first_stage_computes_activation_gradients_per_micro_batch():
    """1:1 MLP, M = 4: stage 0 sends no input gradient, yet its activation gradients (the
    input-gradient matmuls of its later layers, TanhGrad) run in each micro-batch's backward,
    between the forwards; the once-per-step call holds only the weight-gradient matmuls, one
    per kernel. (A single stage stacks its whole backward: the test above.)"""
    batch = batches(models.MLP)[0]
    trainer = stacked_trainer("mlp", [1, 1], 4)
    try:
        kernels = [v for v in trainer.rewritten.stage_graphs[0].stacked_gradients if "kernel" in v]
        matmuls = matmuls_of_a_traced_step(trainer, batch)
        stacked = [n for n in matmuls if n.startswith("dapple/accumulate/s0r0/weight_gradients/")]
        per_micro_batch = [n for n in matmuls if "/s0r0/bwd/" in n]
        assert len(kernels) >= 2
        assert len(stacked) == len(kernels)
        assert len(per_micro_batch) == 4 * (len(kernels) - 1)
        stage = trainer.rewritten.stage_graphs[0]
        assert "TanhGrad" not in {n.op for n in stage.weight_gradient_function.function.node_def}
        assert "TanhGrad" in {n.op for n in stage.backward_function.function.node_def}
    finally:
        trainer.close()


def test_split_backward_keeps_weight_gradients_out_of_the_input_part():
    """tf.gradients groups MatMul's two gradients under control dependencies; the split follows
    data edges only, so the input gradient does not need the weight gradient."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [4, 3], name="x")
        w = v1.placeholder(tf.float32, [3, 2], name="w")
        g = v1.placeholder(tf.float32, [4, 2], name="g")
        grad_x, grad_w = tf.gradients(tf.matmul(x, w), [x, w], g)
    split = split_backward(graph.as_graph_def(), [grad_x.name], [grad_w.name])
    assert grad_x.op.name in split.input_part
    assert grad_w.op.name in split.weight_part
    assert not split.input_part & split.weight_part
    assert "x" not in split.input_part and "g" in split.input_part


def test_plan_stacking_takes_only_gradients_that_are_sums_over_rows():
    """A backward with row inputs x, g (4 rows) and three weight gradients: x^T g and the column
    sums of g are sums over rows; the column means of g (divided by the row count) are not, and
    neither is a gradient that reshapes the rows away."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [4, 3], name="x")
        g = v1.placeholder(tf.float32, [4, 2], name="g")
        kernel_grad = tf.matmul(x, g, transpose_a=True, name="kernel_grad")
        bias_grad = tf.reduce_sum(g, axis=0, name="bias_grad")
        mean_grad = tf.reduce_mean(g, axis=0, name="mean_grad")
        flat_grad = tf.reduce_sum(tf.reshape(g, [2, 4]), axis=0, name="flat_grad")
    backward = graph.as_graph_def()
    for k in reversed([k for k, n in enumerate(backward.node) if n.op == "Placeholder"]):
        del backward.node[k]  # inputs are function arguments

    def spec_of(name):
        tensor = graph.get_tensor_by_name(name)
        return tf.TensorSpec(tensor.shape, tensor.dtype)

    grads = {
        v: GradRef(dense=t.name)
        for v, t in [
            ("kernel", kernel_grad),
            ("bias", bias_grad),
            ("mean", mean_grad),
            ("flat", flat_grad),
        ]
    }
    stacking = plan_stacking(backward, {}, grads, 4, spec_of, set(), set())
    assert set(stacking.variables) == {"kernel", "bias"}
    assert set(stacking.row_inputs) == {"x:0", "g:0"}
    assert {n.name for n in stacking.input_graph_def.node} >= {"mean_grad", "flat_grad"}
    assert not {"kernel_grad", "bias_grad"} & {n.name for n in stacking.input_graph_def.node}
