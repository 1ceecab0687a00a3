"""Layer rules (`layers=`): users' own scopes name the layers, one analysis for the profiler and
the rewriter."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import tf1_bert
from dapple_tf import profiler
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.graphdefs import renamed_scopes
from graph_rewrite.template import TemplateError, build_template, layer_rule
from planner.plan_format import even_plan
from planner.profile import ProfileError

v1 = tf.compat.v1
BERT = functools.partial(tf1_bert.bert_classifier, dropout_rate=0.0)
BERT_LAYERS = (
    "bert/embeddings",
    "bert/encoder/layer_0",
    "bert/encoder/layer_1",
    "bert/pooler",
    "cls",
)


def nested_model(features):
    """Layers two scopes deep (`model/block_<k>`), with parent-scope ops between them."""
    h = features["x"]
    with v1.variable_scope("model"):
        scale = tf.sqrt(tf.constant(4.0))  # model/Sqrt: parent scope
        for k in range(3):
            with v1.variable_scope(f"block_{k}"):
                w = v1.get_variable("w", [4, 4], initializer=v1.glorot_uniform_initializer())
                h = tf.tanh(tf.matmul(h, w)) / scale
            h = h + 1.0  # model/add_<k>: parent scope
    with v1.variable_scope("head"):
        return tf.reduce_mean(tf.square(h - features["y"]))


NESTED_SPEC = {"x": ((4,), tf.float32), "y": ((4,), tf.float32)}
NESTED_RULE = r"model/block_\d|head"


def test_a_regex_rule_names_layers_by_scope_path_in_creation_order():
    template = build_template(BERT, tf1_bert.FEATURE_SPEC, layers=tf1_bert.LAYERS)
    assert template.layers == BERT_LAYERS
    assert (
        template.layer_of_op["bert/encoder/layer_1/attention/self/query/MatMul"]
        == "bert/encoder/layer_1"
    )
    assert (
        template.layer_of_op[
            "cls/SparseSoftmaxCrossEntropyWithLogits/SparseSoftmaxCrossEntropyWithLogits"
        ]
        == "cls"
    )


def test_parent_scope_ops_join_the_layer_of_their_nearest_consumer():
    template = build_template(BERT, tf1_bert.FEATURE_SPEC, layers=tf1_bert.LAYERS)
    # batch size and attention mask, made in bert/encoder, first read by layer_0
    assert template.layer_of_op["bert/encoder/Shape"] == "bert/encoder/layer_0"
    assert template.layer_of_op["bert/encoder/mul"] == "bert/encoder/layer_0"
    # the reshape back to [batch, seq, hidden] after the last layer feeds the pooler
    reshape_back = [
        op
        for op, layer in template.layer_of_op.items()
        if op.startswith("bert/encoder/Reshape") and layer == "bert/pooler"
    ]
    assert reshape_back


def test_an_op_belongs_to_the_outermost_matching_scope_path():
    rule = layer_rule(r"a|a/b")
    assert rule("a/b/c") == "a"
    assert rule("a") is None  # an op's own name is not a scope path
    assert layer_rule(r"a/b")("a/b/c/d") == "a/b"
    assert layer_rule(r"x\d")("x12/op") is None  # fullmatch, not search


def test_a_list_of_rules_and_a_function_are_accepted():
    by_list = build_template(nested_model, NESTED_SPEC, layers=[r"model/block_\d", "head"])
    by_function = build_template(
        nested_model,
        NESTED_SPEC,
        layers=lambda op: (
            "/".join(op.split("/")[:2])
            if op.startswith("model/block_")
            else ("head" if op.startswith("head/") else None)
        ),
    )
    expected = ("model/block_0", "model/block_1", "model/block_2", "head")
    assert by_list.layers == expected
    assert by_function.layers == expected


def test_the_default_rule_is_top_level_name_scopes():
    assert build_template(nested_model, NESTED_SPEC).layers == ("model", "head")


def test_a_rule_that_matches_nothing_is_an_error_listing_the_scope_paths():
    with pytest.raises(TemplateError, match=r"matched no scope path.*model/block_0"):
        build_template(nested_model, NESTED_SPEC, layers=r"encoder/layer_\d+")


def test_an_invalid_regular_expression_is_an_error():
    with pytest.raises(TemplateError, match="not a regular expression"):
        build_template(nested_model, NESTED_SPEC, layers=r"layer_(\d")


def test_the_profiler_finds_the_layers_the_rewriter_finds():
    template = build_template(nested_model, NESTED_SPEC, layers=NESTED_RULE)
    layer_map = profiler.find_layers(
        profiler.build_template(nested_model, NESTED_SPEC, 4), NESTED_RULE
    )
    assert layer_map.names == template.layers
    for op, layer in template.layer_of_op.items():
        assert layer_map.names[layer_map.forward_layer[op]] == layer, op


def test_the_profiler_attributes_backward_and_grappler_ops_of_nested_layers():
    profiled = profiler.build_template(BERT, tf1_bert.FEATURE_SPEC, 4)
    layer_map = profiler.find_layers(profiled, tf1_bert.LAYERS)
    assert layer_map.names == BERT_LAYERS
    layer_1 = BERT_LAYERS.index("bert/encoder/layer_1")
    grad = [
        op.name
        for op in profiled.backward_ops
        if "bert/encoder/layer_1/intermediate/dense/MatMul_grad" in op.name
    ][0]
    assert layer_map.backward_layer[grad] == layer_1
    assert layer_map.layer_of_node(
        "bert/encoder/layer_1/ArithmeticOptimizer/AddOpsRewrite_add"
    ) == (layer_1, False)


def test_a_profile_with_a_layer_rule_counts_every_parameter_in_its_layer():
    m = profiler.measure(
        BERT,
        tf1_bert.FEATURE_SPEC,
        4,
        warmup_steps=0,
        measured_steps=1,
        layers=tf1_bert.LAYERS,
        batch_fn=lambda n, rng: tf1_bert.make_batch(rng, n),
    )
    assert m.profile.layer_names == BERT_LAYERS
    template = build_template(BERT, tf1_bert.FEATURE_SPEC, layers=tf1_bert.LAYERS)
    for name, cost in zip(BERT_LAYERS, m.profile.layers):
        owned = [v for v in template.variables if v.startswith(name + "/")]
        assert cost.parameter_bytes == sum(
            4 * int(np.prod(template.variables[v].shape)) for v in owned
        ), name


def test_the_profiler_reports_a_rule_matching_nothing():
    profiled = profiler.build_template(nested_model, NESTED_SPEC, 4)
    with pytest.raises(ProfileError, match="matched no scope path"):
        profiler.find_layers(profiled, r"nothing")


def test_renamed_scopes_replaces_layer_names_spanning_several_scopes():
    mapping = {"enc/layer_0": "enc/layer_1"}
    assert (
        renamed_scopes("gradients/enc/layer_0/MatMul_grad", mapping)
        == "gradients/enc/layer_1/MatMul_grad"
    )
    assert renamed_scopes("enc/layer_00/x", mapping) == "enc/layer_00/x"


@pytest.mark.parametrize(
    "stages,schedule,micro_batches", [([1, 1, 1, 1], "1f1b", 4), ([2, 2], "gpipe", 2)]
)
def test_training_with_a_layer_rule_equals_single_device_training(stages, schedule, micro_batches):
    def optimizer():
        return v1.train.AdamOptimizer(0.01)

    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.standard_normal((8, 4)).astype(np.float32),
            "y": rng.standard_normal((8, 4)).astype(np.float32),
        }
        for _ in range(3)
    ]
    reference = SingleDeviceTrainer(
        nested_model, NESTED_SPEC, optimizer, 8, seed=3, layers=NESTED_RULE, optimize_graph=False
    )
    expected = [reference.train_step(b) for b in batches]
    expected_weights = reference.get_weights()
    reference.close()
    layers = build_template(nested_model, NESTED_SPEC, layers=NESTED_RULE).layers
    plan = even_plan(layers, stages, 8, micro_batches, schedule)
    trainer = Trainer(
        nested_model,
        NESTED_SPEC,
        optimizer,
        plan,
        8,
        seed=3,
        layers=NESTED_RULE,
        optimize_graph=False,
    )
    try:
        assert [trainer.train_step(b) for b in batches] == pytest.approx(expected, rel=1e-5)
        weights = trainer.get_weights()
        for name, value in expected_weights.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    finally:
        trainer.close()
