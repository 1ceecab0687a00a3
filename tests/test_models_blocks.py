"""The building blocks compute what they claim: the fused LSTM is the textbook cell and ignores
padding, XLNet's relative shift and two-stream masking, and padding never changes a loss."""

import numpy as np
import pytest
import tensorflow as tf

import models
from models.testing import session_config
from models import layers as L
from models.xlnet import rel_shift

tf1 = tf.compat.v1


def _run(graph, fetches, feed=None):
    with graph.as_default():
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=graph, config=session_config()) as s:
        s.run(init)
        return s.run(fetches, feed)


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_lstm_equals_the_unrolled_cell_in_values_and_gradients(reverse):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4], np.int32)
    g = tf.Graph()
    with g.as_default():
        xs = tf.constant(x)
        with tf1.variable_scope("a"):
            fused = L.lstm(xs, lengths, 5, "lstm", reverse=reverse)
        with tf1.variable_scope("a", reuse=True):
            unrolled = L.lstm(xs, lengths, 5, "lstm", reverse=reverse, unrolled=True)
        w = tf1.trainable_variables()
        fetch = [
            fused,
            unrolled,
            tf.gradients(tf.reduce_sum(fused**2), w + [xs]),
            tf.gradients(tf.reduce_sum(unrolled**2), w + [xs]),
        ]
    f, u, gf, gu = _run(g, fetch)
    # The unrolled cell runs over padding too; only valid positions are compared, and the
    # fused op's outputs must be zero beyond each length.
    valid = (np.arange(6)[None, :] < lengths[:, None])[:, :, None]
    np.testing.assert_allclose(f, u * valid, rtol=1e-5, atol=1e-6)
    assert np.all(f[~np.broadcast_to(valid, f.shape)] == 0)
    for a, b in zip(gf, gu):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lstm_outputs_at_valid_positions_ignore_what_the_padding_holds():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    lengths = np.array([3, 5], np.int32)
    noisy = x.copy()
    noisy[0, 3:] = 100.0
    g = tf.Graph()
    with g.as_default():
        inp = tf1.placeholder(tf.float32, [None, 5, 3])
        fw = L.lstm(inp, lengths, 4, "fw")
        bw = L.lstm(inp, lengths, 4, "bw", reverse=True)
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=g, config=session_config()) as s:
        s.run(init)
        clean_out = s.run([fw, bw], {inp: x})
        noisy_out = s.run([fw, bw], {inp: noisy})
    for a, b in zip(clean_out, noisy_out):
        np.testing.assert_array_equal(a, b)


def test_rel_shift_picks_the_score_of_distance_i_minus_j():
    t = 5
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((2, 3, t, 2 * t)).astype(np.float32)  # against T … −T+1
    g = tf.Graph()
    with g.as_default():
        out = rel_shift(tf.constant(scores), t)
    with tf1.Session(graph=g, config=session_config()) as s:
        shifted = s.run(out)
    distances = list(range(t, -t, -1))
    for i in range(t):
        for j in range(t):
            np.testing.assert_array_equal(
                shifted[:, :, i, j], scores[:, :, i, distances.index(i - j)]
            )


class _Model:
    def __init__(self, name, **overrides):
        self.spec = models.get_model(name, "tiny", **overrides)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.features = self.spec.placeholders()
            self.loss = self.spec.model_fn(self.features)
            init = tf1.global_variables_initializer()
        self.session = tf1.Session(graph=self.graph, config=session_config())
        self.session.run(init)

    def loss_of(self, batch):
        return self.session.run(self.loss, {self.features[k]: v for k, v in batch.items()})


def test_xlnet_query_stream_predicts_a_token_without_seeing_it():
    m = _Model("xlnet")
    batch = m.spec.synthetic_batch(1, np.random.default_rng(3))
    targets = np.flatnonzero(batch["target_weights"][0])
    p = targets[0]
    only_p = dict(batch, target_weights=np.zeros_like(batch["target_weights"]))
    only_p["target_weights"][0, p] = 1.0
    base = m.loss_of(only_p)
    changed_self = dict(only_p, input_ids=only_p["input_ids"].copy())
    changed_self["input_ids"][0, p] = (changed_self["input_ids"][0, p] + 7) % 128
    assert m.loss_of(changed_self) == pytest.approx(base, rel=1e-6, abs=1e-7)
    # ...but it does see a token its factorisation order puts before it.
    visible = np.flatnonzero(
        (only_p["perm_mask"][0, p] == 0) & (only_p["input_mask"][0] == 1) & (np.arange(16) != p)
    )
    changed_other = dict(only_p, input_ids=only_p["input_ids"].copy())
    seen = visible[0]
    changed_other["input_ids"][0, seen] = (changed_other["input_ids"][0, seen] + 7) % 128
    assert abs(m.loss_of(changed_other) - base) > 1e-6
    m.session.close()


def test_bert_loss_ignores_tokens_at_padded_positions():
    m = _Model("bert")
    batch = m.spec.synthetic_batch(4, np.random.default_rng(4))
    assert (batch["input_mask"] == 0).any()
    noisy = dict(batch, input_ids=np.where(batch["input_mask"] == 1, batch["input_ids"], 77))
    assert m.loss_of(noisy) == pytest.approx(m.loss_of(batch), rel=1e-6)
    m.session.close()


def test_gnmt_loss_ignores_tokens_beyond_the_source_and_target_lengths():
    m = _Model("gnmt")
    batch = m.spec.synthetic_batch(4, np.random.default_rng(5))
    pos = np.arange(10)[None, :]
    noisy = dict(batch)
    noisy["source_ids"] = np.where(pos < batch["source_length"][:, None], batch["source_ids"], 9)
    for key in ("target_input_ids", "target_output_ids"):
        noisy[key] = np.where(pos < batch["target_length"][:, None], batch[key], 11)
    assert (noisy["source_ids"] != batch["source_ids"]).any()
    assert m.loss_of(noisy) == pytest.approx(m.loss_of(batch), rel=1e-6)
    m.session.close()
