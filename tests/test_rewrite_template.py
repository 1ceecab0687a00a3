"""Template analysis and partition: layers, op membership, boundary tensors, plan checks."""

import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.layers import layer
from graph_rewrite.partition import PartitionError, partition
from graph_rewrite.template import TemplateError, build_template
from planner.plan_format import Plan, PlanError, Stage, even_plan

v1 = tf.compat.v1
SPEC = {"x": ((4,), tf.float32)}


def test_layers_are_top_level_name_scopes_in_creation_order():
    template = build_template(models.MLP.model_fn, models.MLP.feature_spec)
    assert template.layers == (
        "layer_0",
        "layer_1",
        "layer_2",
        "layer_3",
        "layer_4",
        "layer_5",
        "loss",
    )


def test_reentering_a_layer_adds_to_the_same_layer():
    def model_fn(features):
        with layer("a"):
            h = features["x"] * 2.0
        with layer("b"):
            h = h + 1.0
        with layer("a"):
            h = h * 3.0
        return tf.reduce_mean(h)

    template = build_template(model_fn, SPEC)
    assert template.layers == ("a", "b")
    assert any(op.startswith("a/") for op in template.ops_of_layer["a"])


def test_unscoped_ops_join_the_layer_of_their_nearest_consumer_and_loss_the_last_layer():
    def model_fn(features):
        scale = tf.constant(2.0, name="scale")  # unscoped, consumed by layer 'b'
        with tf.name_scope("a"):
            h = features["x"] + 1.0
        with tf.name_scope("b"):
            h = h * scale
        return tf.reduce_mean(h, name="mean_loss")  # unscoped loss

    template = build_template(model_fn, SPEC)
    assert template.layer_of_op["scale"] == "b"
    assert template.layer_of_op["mean_loss"] == "b"


def test_variables_are_inputs_and_each_layer_lists_what_it_reads():
    template = build_template(models.TRANSFORMER.model_fn, models.TRANSFORMER.feature_spec)
    assert "embedding/table" in template.variables
    assert "embedding/table" not in template.layer_of_op
    assert "embedding/table" in template.variables_of_layer["embedding"]
    assert "embedding/table" in template.variables_of_layer["output"]  # tied


def test_edges_and_batch_dependence_of_crossing_tensors():
    template = build_template(models.SKIP.model_fn, models.SKIP.feature_spec)
    edges = {(e.tensor, e.producer, e.consumer) for e in template.edges}
    assert ("a/Tanh:0", "a", "d") in edges  # skip connection
    assert "a/Tanh:0" in template.batch_tensors
    assert "a/Sum:0" not in template.batch_tensors  # depends on a variable only


def test_initializers_and_unused_ops_are_not_layer_members():
    def model_fn(features):
        with tf.name_scope("a"):
            unused = tf.square(features["x"], name="unused")  # noqa: F841
            w = v1.get_variable("w", [4])
            return tf.reduce_mean(features["x"] * w)

    template = build_template(model_fn, SPEC)
    assert "a/unused" not in template.layer_of_op
    assert not any("Initializer" in op or "Assign" in op for op in template.layer_of_op)


def test_a_reference_variable_is_rejected():
    def model_fn(features):
        with tf.name_scope("a"):
            w = v1.get_variable("w", [4], use_resource=False)
            return tf.reduce_mean(features["x"] * w)

    with pytest.raises(TemplateError, match="resource"):
        build_template(model_fn, SPEC)


@pytest.mark.parametrize(
    "layers,problem",
    [
        (["layer_0", "layer_1", "bogus"], "unknown layers \\['bogus'\\]"),
        (["layer_0", "layer_1"], "skips layers"),
        (
            ["layer_1", "layer_0", "layer_2", "layer_3", "layer_4", "layer_5", "loss"],
            "out of model order",
        ),
    ],
)
def test_a_plan_not_covering_the_model_layers_in_order_is_rejected_listing_them(layers, problem):
    template = build_template(models.MLP.model_fn, models.MLP.feature_spec)
    plan = Plan(8, 1, "gpipe", (Stage(tuple(layers), (0,)),))
    with pytest.raises(PlanError, match=problem) as error:
        partition(template, plan)
    assert "layer_0, layer_1, layer_2, layer_3, layer_4, layer_5, loss" in str(error.value)


def test_partition_sends_skip_connections_directly_to_the_consuming_stage():
    template = build_template(models.SKIP.model_fn, models.SKIP.feature_spec)
    specs = partition(template, even_plan(template.layers, [1, 1, 1, 1], 8, 2))
    # layers a | b | c | d, loss
    assert specs[0].output_consumers["a/Tanh:0"] == (1, 3)
    assert specs[3].input_source == {"a/Tanh:0": 0, "a/Sum:0": 0, "c/Tanh:0": 2}
    assert specs[3].has_loss and specs[3].features == ("y",)


def test_a_time_major_tensor_crossing_stages_is_rejected_with_its_name():
    def model_fn(features):
        with tf.name_scope("a"):
            h = tf.transpose(tf.reshape(features["x"], [-1, 2, 2]), [1, 0, 2])
        with tf.name_scope("b"):
            return tf.reduce_mean(h)

    template = build_template(model_fn, SPEC)
    with pytest.raises(
        PartitionError,
        match=r"a/transpose:0 \(shape \(2, None, 2\), \[2, 7, 2\] "
        r"with a batch of 7 rows\) .*from layer 'a' \(stage 0\) "
        r"to layer 'b' \(stage 1\).*neither be split by rows",
    ):
        partition(template, even_plan(template.layers, [1, 1], 8, 1))


def test_a_flattened_batch_time_tensor_crossing_stages_is_split_at_k_times_the_rows():
    def model_fn(features):
        with tf.name_scope("a"):
            h = tf.reshape(features["x"], [-1, 2])  # [batch * 2, 2]
        with tf.name_scope("b"):
            return tf.reduce_mean(h)

    template = build_template(model_fn, SPEC)
    assert template.row_factor == {"a/Reshape:0": 2}
    assert template.not_batch_major == {}
    specs = partition(template, even_plan(template.layers, [1, 1], 8, 1))
    assert specs[1].inputs == ("a/Reshape:0",)


def test_a_batch_size_scalar_crossing_stages_is_recomputed_for_the_receiving_clones_rows():
    def model_fn(features):
        with tf.name_scope("a"):
            h = features["x"] * 2.0
            rows = tf.shape(h)[0] * 2
        with tf.name_scope("b"):
            return tf.reduce_mean(tf.reshape(h, [rows, -1]))

    template = build_template(model_fn, SPEC)
    assert template.not_batch_major == {"a/mul_1:0": ()}
    # 16 rows, 2 micro-batches of 8; stage b has 2 replicas: 4 rows per clone
    specs = partition(template, Plan(16, 2, "1f1b", (Stage(("a",), (0,)), Stage(("b",), (1, 2)))))
    assert specs[1].inputs == ("a/mul:0",)
    assert specs[1].derived_inputs == {"a/mul_1:0": 8}
    assert specs[0].outputs == ("a/mul:0",)


def test_a_scalar_computed_from_batch_values_crossing_stages_is_refused_naming_both_layers():
    def model_fn(features):
        with tf.name_scope("a"):
            h = features["x"] * 2.0
            total = tf.reduce_sum(h)
        with tf.name_scope("b"):
            return tf.reduce_mean(h) / total

    template = build_template(model_fn, SPEC)
    with pytest.raises(
        PartitionError,
        match=r"a/Sum:0 \(shape \(\)"
        r".*from layer 'a' \(stage 0\) to layer 'b' "
        r"\(stage 1\).*nor recomputed",
    ):
        partition(template, even_plan(template.layers, [1, 1], 8, 1))
