"""What the profiler measures for the "runtime" cost model (issue #14): bytes kept for the
backward pass, optimizer slot bytes, and times at two batch sizes fitted as fixed + per-row."""

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf import profiler
from planner.profile import Profile

v1 = tf.compat.v1
pytestmark = pytest.mark.timeout(180)


def two_layer_model(features):
    with v1.variable_scope("a"):
        w1 = v1.get_variable("w", [8, 4])
        y = tf.nn.relu(tf.matmul(features["x"], w1))
    with v1.variable_scope("b"):
        w2 = v1.get_variable("w", [4, 3])
        return tf.reduce_sum(tf.matmul(y, w2))


SPEC = {"x": ((8,), tf.float32)}


def template_and_layers(batch_size=5):
    template = profiler.build_template(two_layer_model, SPEC, batch_size)
    return template, profiler.find_layers(template)


def test_saved_bytes_are_every_forward_tensor_the_gradient_ops_read():
    template, layers = template_and_layers(batch_size=5)
    saved = dict(zip(layers.names, profiler.saved_tensor_bytes(template, layers)))
    # a: x (read by MatMul's gradient; the placeholder joins its consumer's layer) and the relu
    # output (read by ReluGrad, and by b's MatMul gradient); b: nothing of its own is read
    # (reduce_sum's gradient needs only the shape), the weights are parameters, not saved
    assert saved == {"a": 5 * 8 * 4 + 5 * 4 * 4, "b": 0}


def reshaping_model(features):
    with v1.variable_scope("a"):
        w1 = v1.get_variable("w", [8, 4])
        y = tf.nn.relu(tf.matmul(features["x"], w1))
    with v1.variable_scope("b"):
        w2 = v1.get_variable("w", [4, 3])
        h = tf.reshape(tf.identity(y), [-1, 4])  # y's buffer: MatMul's gradient reads h
        return tf.reduce_sum(tf.matmul(h, w2))


def test_a_tensor_read_directly_and_through_a_reshape_is_saved_once():
    template = profiler.build_template(reshaping_model, SPEC, 5)
    layers = profiler.find_layers(template)
    saved = dict(zip(layers.names, profiler.saved_tensor_bytes(template, layers)))
    # ReluGrad reads y, b's MatMul gradient reads reshape(identity(y)): one buffer, a's
    assert saved == {"a": 5 * 8 * 4 + 5 * 4 * 4, "b": 0}


def test_saved_bytes_exceed_the_layer_output_when_the_backward_reads_inner_tensors():
    template, layers = template_and_layers(batch_size=5)
    saved = profiler.saved_tensor_bytes(template, layers)
    activation, _, _ = profiler.layer_sizes(template, layers)
    assert saved[0] > activation[0] == 5 * 4 * 4


@pytest.mark.parametrize(
    "optimizer_fn, slots_per_weight",
    [
        (lambda: v1.train.AdamOptimizer(0.1), 2),
        (lambda: v1.train.MomentumOptimizer(0.1, 0.9), 1),
        (lambda: v1.train.GradientDescentOptimizer(0.1), 0),
    ],
)
def test_optimizer_slot_bytes_are_the_slots_the_optimizer_creates(optimizer_fn, slots_per_weight):
    template, layers = template_and_layers()
    slots = profiler.optimizer_slot_bytes(template, layers, optimizer_fn)
    assert slots == [slots_per_weight * 8 * 4 * 4, slots_per_weight * 4 * 3 * 4]


def heavy_model(features):
    with v1.variable_scope("small"):
        h = tf.identity(features["x"]) * 2.0
    with v1.variable_scope("heavy"):
        w = v1.get_variable("w", [256, 256])
        for _ in range(4):
            h = tf.tanh(tf.matmul(h, w))
    with v1.variable_scope("loss"):
        return tf.reduce_mean(h)


def test_runtime_profile_fits_each_layer_and_keeps_every_field():
    profile = profiler.profile_for_runtime(
        heavy_model,
        {"x": ((256,), tf.float32)},
        [4, 64],
        optimizer_fn=lambda: v1.train.AdamOptimizer(0.1),
        measured_steps=2,
    )
    assert profile.batch_size == 64 and profile.layer_names == ("small", "heavy", "loss")
    for layer in profile.layers:
        assert layer.has_fit and layer.forward_fixed_ms >= 0 and layer.forward_per_row_ms >= 0
        assert layer.apply_ms is not None and layer.apply_ms >= 0
    heavy = profile.layers[1]
    assert heavy.forward_per_row_ms > 0
    assert heavy.optimizer_slot_bytes == 2 * heavy.parameter_bytes == 2 * 256 * 256 * 4
    assert heavy.saved_bytes >= 4 * 64 * 256 * 4  # the input and output of each tanh
    assert Profile.from_json(profile.to_json()).layers == profile.layers
    profile.validate()


class _HeavyModel:
    model_fn = staticmethod(heavy_model)
    feature_spec = {"x": ((256,), tf.float32)}
    layer_names = ("small", "heavy", "loss")

    @staticmethod
    def default_optimizer():
        return v1.train.MomentumOptimizer(0.1, 0.9)

    @staticmethod
    def synthetic_batch(batch_size, rng):
        return {"x": rng.standard_normal((batch_size, 256)).astype(np.float32)}


def test_cli_writes_the_runtime_profile_and_graph_txt_keeps_every_field(tmp_path):
    from dapple_tf import profile as profile_cli
    from planner import graph_txt
    from planner.profile import MEASURED_FIELDS

    out, txt = tmp_path / "m.json", tmp_path / "m.txt"
    rc = profile_cli.main(
        [
            "--model",
            "heavy",
            "--batch-size",
            "1",
            "--out",
            str(out),
            "--graph-txt",
            str(txt),
            "--fit-batch-sizes",
            "2,16",
            "--measured-steps",
            "1",
            "--warmup-steps",
            "1",
        ],
        get_model=lambda name, preset: _HeavyModel(),
    )
    assert rc == 0
    prof = Profile.from_json(out.read_text())
    assert prof.batch_size == 16 and all(layer.has_fit for layer in prof.layers)
    assert prof.layers[1].optimizer_slot_bytes == prof.layers[1].parameter_bytes  # momentum: 1
    again = graph_txt.load_profile(txt, batch_size=16)
    for a, b in zip(again.layers, prof.layers):
        for field in MEASURED_FIELDS:
            assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-3), field


def test_workspace_counts_the_temporaries_a_layers_ops_allocate_beyond_their_outputs():
    def conv_model(features):
        with v1.variable_scope("conv"):
            w = v1.get_variable("w", [3, 3, 4, 8], tf.float64)
            h = tf.nn.conv2d(features["x"], w, [1, 1, 1, 1], "SAME")
        with v1.variable_scope("loss"):
            return tf.reduce_mean(h)

    # float64: TensorFlow's own (Eigen) convolution, whatever TF_ENABLE_ONEDNN_OPTS says;
    # oneDNN's float32 convolution keeps its scratch to about 12 KB here
    profile = profiler.profile_for_runtime(
        conv_model, {"x": ((16, 16, 4), tf.float64)}, [2, 8], measured_steps=1
    )
    conv = profile.layers[0]
    # the backward im2col buffers exceed the output (8 rows x 16 x 16 x 8 doubles)
    assert conv.workspace_bytes > 8 * 16 * 16 * 8 * 8
