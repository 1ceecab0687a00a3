"""Layer-by-layer gradients: `tf.gradients` runs once per distinct layer structure, the gradient
ops of repeated layers are imported under their own names, and training still equals
single-device training (gradient sums across layers: skip connections, a tied embedding whose
sparse and dense parts meet inside one stage)."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.layer_gradients import LayerGradientCache
from graph_rewrite.partition import partition
from graph_rewrite.stage_graph import build_stage_graphs
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
DEEP_MLP = functools.partial(models.mlp_fn, depth=8)


def stage_graphs(model_fn, feature_spec, replicas, cache=None):
    template = build_template(model_fn, feature_spec)
    plan = even_plan(template.layers, replicas, 8, 4, "1f1b")
    specs = partition(template, plan)
    return specs, build_stage_graphs(template, specs, [2] * len(specs), layer_cache=cache)


def test_repeated_layers_are_differentiated_once():
    cache = LayerGradientCache()
    specs, graphs = stage_graphs(DEEP_MLP, models.MLP.feature_spec, [1, 1], cache)
    assert all(g.gradient_by_layers for g in graphs)
    # layer_0 (reads the 8-wide features), layer_1..layer_7 (16 -> 16), loss
    assert len(cache) == 3


def test_gradient_ops_of_a_repeated_layer_name_that_layer():
    specs, graphs = stage_graphs(DEEP_MLP, models.MLP.feature_spec, [1])
    layers = set(specs[0].layers)
    backward = [n.name for n in graphs[0].backward_function.function.node_def]
    named = {}
    for name in backward:
        parts = set(name.split("/")) & layers
        assert len(parts) <= 1, name
        for part in parts:
            named.setdefault(part, []).append(name)
    assert set(named) == layers
    assert all(any(n.startswith("gradients/") for n in named[part]) for part in layers)


def test_a_stage_with_a_while_loop_is_differentiated_at_once():
    _, graphs = stage_graphs(models.rnn_fn, models.RNN.feature_spec, [1, 1])
    assert [g.gradient_by_layers for g in graphs] == [False, False]


def train_both(case, plan, optimizer_fn, steps=3):
    gbs = plan.global_batch_size
    pipelined = Trainer(
        case.model_fn, case.feature_spec, optimizer_fn, plan, gbs, seed=7, optimize_graph=False
    )
    single = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer_fn, gbs, seed=7, optimize_graph=False
    )
    rng = np.random.default_rng(2)
    for _ in range(steps):
        batch = case.make_batch(rng, gbs)
        np.testing.assert_allclose(
            pipelined.train_step(batch), single.train_step(batch), rtol=1e-5, atol=1e-6
        )
    want = single.get_weights()
    for name, value in pipelined.get_weights().items():
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    return pipelined


@pytest.mark.parametrize(
    "case, replicas",
    [
        (models.SKIP, [1]),  # the skip from layer a to layer d inside one stage
        (models.SKIP, [2]),  # ... on two replicas
        (models.TRANSFORMER, [1]),  # tied table: sparse (lookup) + dense (output) in one stage
        (models.TRANSFORMER, [1, 1]),
        (models.SPARSE, [1]),
    ],
)
def test_layer_by_layer_training_equals_single_device(case, replicas):
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, replicas, 8, 2, "1f1b")
    adam = functools.partial(v1.train.AdamOptimizer, 0.01)  # sparse and dense updates differ
    pipelined = train_both(case, plan, adam)
    assert all(g.gradient_by_layers for g in pipelined.rewritten.stage_graphs)
    if case is models.TRANSFORMER and len(replicas) == 1:
        # as tf.gradients sums a sparse and a dense gradient: dense
        assert pipelined.rewritten.stage_graphs[0].variable_grads["embedding/table"].dense


def identity_fn(features):
    """Layer `b` passes its input on: its input gradient is the gradient it receives."""
    with layer("a"):
        h = models._dense(features["x"], 8, "dense", tf.tanh)
    with layer("b"):
        h = tf.identity(h)
    with layer("c"):
        h = models._dense(h, 8, "dense", tf.tanh)
    with layer("loss"):
        return models._xent(models._dense(h, 4, "logits"), features["y"])


def test_a_layer_passing_its_gradient_through_trains_like_single_device():
    case = models.ModelCase("identity", identity_fn, models.MLP.feature_spec, models.MLP.make_batch)
    plan = even_plan(build_template(identity_fn, case.feature_spec).layers, [1], 8, 2, "1f1b")
    pipelined = train_both(case, plan, functools.partial(v1.train.GradientDescentOptimizer, 0.1))
    assert pipelined.rewritten.stage_graphs[0].gradient_by_layers
