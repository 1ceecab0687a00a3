"""Stage graphs: `tf.gradients` runs once per distinct stage structure; a stage that repeats an
earlier one takes its gradient graph renamed to its own ops and variables, and trains the same."""

import functools

import numpy as np
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.partition import partition
from graph_rewrite.stage_graph import build_stage_graphs
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

DEEP_MLP = functools.partial(models.mlp_fn, depth=8)


def stage_graphs(model_fn, replicas, rows=2):
    template = build_template(model_fn, models.MLP.feature_spec)
    plan = even_plan(template.layers, replicas, 8, 4, "1f1b")
    specs = partition(template, plan)
    return specs, build_stage_graphs(template, specs, [rows] * len(specs))


def test_repeated_stages_reuse_the_first_ones_gradient_graph():
    # stage 0: layer_0 on the 8-wide features; stages 1-3: two 16-wide tanh layers each;
    # stage 4: layer_7 and the loss
    specs, graphs = stage_graphs(DEEP_MLP, [1] * 5)
    assert [s.layers for s in specs][1:4] == [
        ("layer_1", "layer_2"),
        ("layer_3", "layer_4"),
        ("layer_5", "layer_6"),
    ]
    assert [g.gradient_twin for g in graphs] == [None, None, 1, 1, None]


def test_a_renamed_stage_names_its_own_ops_variables_and_tensors():
    specs, graphs = stage_graphs(DEEP_MLP, [1] * 5)
    twin = graphs[2]
    nodes = [
        n.name for g in (twin.forward_function, twin.backward_function) for n in g.function.node_def
    ]
    scopes = {part for n in nodes for part in n.split("/")}
    assert {"layer_3", "layer_4"} <= scopes  # forward and gradient ops
    assert not scopes & {"layer_1", "layer_2"}  # none keeps the first stage's names
    assert set(twin.variable_grads) == set(specs[2].variables)
    assert set(twin.input_grads) == set(specs[2].inputs)
    assert set(twin.grad_inputs) == set(specs[2].outputs)
    assert set(twin.forward_function.outputs) >= set(specs[2].outputs)
    assert twin.forward_function.name != graphs[1].forward_function.name


def test_stages_that_differ_are_differentiated_on_their_own():
    _, graphs = stage_graphs(DEEP_MLP, [1, 1])  # 8-wide input vs the loss stage
    assert [g.gradient_twin for g in graphs] == [None, None]


def test_training_with_renamed_stages_equals_single_device_training():
    template = build_template(DEEP_MLP, models.MLP.feature_spec)
    plan = even_plan(template.layers, [1] * 5, 16, 4, "1f1b")
    adam = functools.partial(tf.compat.v1.train.AdamOptimizer, 0.01)
    pipelined = Trainer(
        DEEP_MLP, models.MLP.feature_spec, adam, plan, 16, seed=3, optimize_graph=False
    )
    assert pipelined.rewritten.stage_graphs[3].gradient_twin == 1
    single = SingleDeviceTrainer(
        DEEP_MLP, models.MLP.feature_spec, adam, 16, seed=3, optimize_graph=False
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = models.MLP.make_batch(rng, 16)
        np.testing.assert_allclose(
            pipelined.train_step(batch), single.train_step(batch), rtol=1e-5, atol=1e-6
        )
    want = single.get_weights()
    for name, value in pipelined.get_weights().items():
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
