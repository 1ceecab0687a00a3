"""Profiler: per-layer times keep the order of the layers' FLOPs; sizes and edges are exact."""

import json

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf import profile as profile_cli
from dapple_tf import profiler
from planner import graph_txt
from planner.profile import Profile

v1 = tf.compat.v1
pytestmark = pytest.mark.timeout(120)

D = 128
FLOP_FACTORS = (1, 8, 64)


def widening_matmuls(features):
    """layer_k multiplies [B, D] by [D, f_k * D] and folds the result back to [B, D]: f_k x FLOPs."""
    h = features["x"]
    for k, factor in enumerate(FLOP_FACTORS):
        with v1.variable_scope(f"layer_{k}"):
            w = v1.get_variable(
                "w", [D, factor * D], initializer=v1.random_normal_initializer(0, 0.05)
            )
            wide = tf.matmul(h, w)
            h = tf.reduce_sum(tf.reshape(wide, [-1, factor, D]), axis=1)
    with v1.name_scope("loss"):
        return tf.reduce_mean(tf.square(h))


WIDENING_SPEC = {"x": ((D,), tf.float32)}


def keeps_order(values):
    return all(a < b for a, b in zip(values, values[1:]))


def test_measured_times_keep_the_flop_order_of_the_layers():
    for attempt in range(
        3
    ):  # a shared 2-core machine can stall one step; re-measure before failing
        m = profiler.measure(
            widening_matmuls, WIDENING_SPEC, 128, warmup_steps=2, measured_steps=5 + 4 * attempt
        )
        layers = m.profile.layers[:3]
        forward = [l.forward_ms for l in layers]
        backward = [l.backward_ms for l in layers]
        if keeps_order(forward) and keeps_order(backward):
            break
    print(profiler.format_table(m.profile))
    assert [l.name for l in m.profile.layers] == ["layer_0", "layer_1", "layer_2", "loss"]
    assert keeps_order(forward), forward
    assert keeps_order(backward), backward
    # The 64x layer dwarfs the 1x one; the margin leaves room for per-op overhead and noise.
    assert forward[2] > 4 * forward[0] and backward[2] > 4 * backward[0]
    assert m.unattributed_ms <= 0.05 * (sum(forward) + sum(backward)), m.unattributed_ops


B = 6


def branching_model(features):
    """layer_0 feeds layer_1 and loss; layer_1 also emits int64 ids to loss; one variable is
    created outside every scope and one op sits between scopes."""
    x = features["x"]
    with v1.name_scope("layer_0"):
        w0 = v1.get_variable("w0", [12, 20])  # name_scope: the variable is top-level 'w0'
        b0 = v1.get_variable("layer_0/b", [20], initializer=v1.zeros_initializer())
        h0 = tf.nn.relu(tf.matmul(x, w0) + b0)
    h0_copy = tf.identity(h0, name="between")  # unscoped: joins its consumer, layer_1
    with v1.variable_scope("layer_1"):
        w1 = v1.get_variable("w", [20, 5], dtype=tf.float64)
        h1 = tf.matmul(tf.cast(h0_copy, tf.float64), w1)
        ids = tf.argmax(h1, axis=1)  # int64 [B]
    with v1.name_scope("loss"):
        picked = tf.gather(h0, ids, axis=1, batch_dims=1)  # float32 [B]
        return tf.reduce_mean(picked) + tf.cast(tf.reduce_mean(h1), tf.float32)


BRANCHING_SPEC = {"x": ((12,), tf.float32)}


@pytest.fixture(scope="module")
def branching_measurement():
    return profiler.measure(branching_model, BRANCHING_SPEC, B, warmup_steps=1, measured_steps=2)


def test_activation_bytes_are_those_of_tensors_consumed_by_later_layers(branching_measurement):
    layers = {l.name: l for l in branching_measurement.profile.layers}
    assert list(layers) == ["layer_0", "layer_1", "loss"]
    # layer_0: its relu output [B, 20] float32, once although layer_1 and loss both read it.
    assert layers["layer_0"].activation_bytes == B * 20 * 4
    # layer_1: h1 [B, 5] float64 and ids [B] int64, both read by loss.
    assert layers["layer_1"].activation_bytes == B * 5 * 8 + B * 8
    assert layers["loss"].activation_bytes == 0


def test_parameter_bytes_count_each_layers_variables_including_unscoped_ones(branching_measurement):
    layers = {l.name: l for l in branching_measurement.profile.layers}
    assert layers["layer_0"].parameter_bytes == (12 * 20 + 20) * 4
    assert layers["layer_1"].parameter_bytes == 20 * 5 * 8
    assert layers["loss"].parameter_bytes == 0


def test_edges_are_the_layer_pairs_a_tensor_crosses(branching_measurement):
    assert branching_measurement.profile.edges == ((0, 1), (0, 2), (1, 2))


def test_every_layer_has_forward_and_backward_time(branching_measurement):
    for layer in branching_measurement.profile.layers:
        assert layer.forward_ms > 0, layer
    for layer in branching_measurement.profile.layers[:2]:
        assert layer.backward_ms > 0, layer


def test_ops_are_assigned_to_layers_by_scope_consumer_and_gradient_origin():
    template = profiler.build_template(branching_model, BRANCHING_SPEC, B)
    layers = profiler.find_layers(template)
    assert layers.names == ("layer_0", "layer_1", "loss")
    assert layers.forward_layer["x"] == 0  # placeholder: its consumer's layer
    assert layers.forward_layer["w0"] == 0  # top-level variable: its reader's layer
    assert layers.forward_layer["between"] == 1  # unscoped op: its consumer's layer
    assert layers.gradient_scope == "gradients"
    assert layers.layer_of_node("gradients/layer_0/MatMul_grad/MatMul") == (0, True)
    assert layers.layer_of_node("layer_1/MatMul") == (1, False)
    # Gradient sums TF leaves outside any op scope feed the backward of the producer's layer.
    sums = [op.name for op in template.backward_ops if op.type == "AddN"]
    assert sums, "the model was meant to make TF sum the two gradients of layer_0's output"
    assert all(layers.backward_layer[name] == 0 for name in sums), sums


def test_grappler_renamed_nodes_map_to_the_op_they_replace():
    template = profiler.build_template(branching_model, BRANCHING_SPEC, B)
    layers = profiler.find_layers(template)
    addn = next(op.name for op in template.backward_ops if op.type == "AddN")
    base = addn.split("/")[-1]
    renamed = f"gradients/ArithmeticOptimizer/SimplifyAggregation_Mul_{base}"
    assert layers.layer_of_node(renamed) == (layers.backward_layer[addn], True)
    assert layers.layer_of_node("loss/ArithmeticOptimizer/ReplaceMulWithSquare_mul") == (2, False)
    assert layers.layer_of_node(
        "ConstantFolding/gradients/layer_0/MatMul_grad/MatMul-folded-1"
    ) == (0, True)
    assert layers.layer_of_node("ConstantFolding/loss/truediv_recip") == (2, False)
    assert layers.layer_of_node("_SOURCE") is None


def test_profile_json_round_trips(branching_measurement, tmp_path):
    prof = branching_measurement.profile
    path = tmp_path / "p.json"
    prof.save_json(path)
    assert Profile.from_json(path.read_text(), str(path)) == prof
    assert json.loads(path.read_text())["layers"][0]["name"] == "layer_0"


class _FakeModel:
    model_fn = staticmethod(branching_model)
    feature_spec = BRANCHING_SPEC
    layer_names = ("layer_0", "layer_1", "loss")

    @staticmethod
    def synthetic_batch(batch_size, rng):
        return {"x": rng.standard_normal((batch_size, 12)).astype(np.float32)}


def test_cli_writes_a_profile_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "m.json"
    asked = []

    def get_model(name, preset):
        asked.append((name, preset))
        return _FakeModel()

    txt = tmp_path / "m.txt"
    rc = profile_cli.main(
        [
            "--model",
            "fake",
            "--preset",
            "tiny",
            "--batch-size",
            str(B),
            "--out",
            str(out),
            "--graph-txt",
            str(txt),
            "--measured-steps",
            "2",
            "--warmup-steps",
            "1",
        ],
        get_model=get_model,
    )
    assert rc == 0 and asked == [("fake", "tiny")]
    prof = Profile.from_json(out.read_text())
    assert prof.layer_names == _FakeModel.layer_names and prof.batch_size == B
    printed = capsys.readouterr().out
    assert "layer_1" in printed and "total" in printed
    # The planner reads the graph.txt back to the same layers, costs and edges.
    again = graph_txt.load_profile(txt, batch_size=B)
    assert again.layer_names == prof.layer_names and again.edges == prof.edges
    for a, b in zip(again.layers, prof.layers):
        assert (a.activation_bytes, a.parameter_bytes) == (b.activation_bytes, b.parameter_bytes)
        assert a.forward_ms == pytest.approx(b.forward_ms, abs=1e-3)
        assert a.backward_ms == pytest.approx(b.backward_ms, abs=1e-3)


def test_profile_of_tiny_bert_names_its_layers_and_counts_all_its_parameters():
    models = pytest.importorskip("models")
    spec = models.get_model("bert", "tiny")
    m = profiler.measure(
        spec.model_fn,
        spec.feature_spec,
        2,
        warmup_steps=0,
        measured_steps=1,
        batch_fn=spec.synthetic_batch,
    )
    assert m.profile.layer_names == tuple(spec.layer_names)
    with tf.Graph().as_default():
        spec.model_fn(spec.placeholders(2))
        expected = sum(v.shape.num_elements() * v.dtype.size for v in v1.trainable_variables())
    assert sum(l.parameter_bytes for l in m.profile.layers) == expected
    assert m.unattributed_ms <= 0.05 * sum(l.forward_ms + l.backward_ms for l in m.profile.layers)
