"""Small models for the rewriter and trainer tests (plain tf ops, resource variables).

Each case: `model_fn(features) -> mean loss`, `feature_spec`, and `make_batch(rng, rows)`.
Layers are top-level name scopes (opened with `dapple_tf.layer`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from dapple_tf.layers import layer

v1 = tf.compat.v1


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    model_fn: Callable
    feature_spec: dict
    make_batch: Callable[[np.random.Generator, int], dict]


def _dense(x, units, name, activation=None):
    w = v1.get_variable(
        f"{name}/kernel", [x.shape[-1], units], initializer=v1.glorot_uniform_initializer()
    )
    b = v1.get_variable(f"{name}/bias", [units], initializer=v1.random_normal_initializer(0, 0.1))
    y = tf.matmul(x, w) + b
    return activation(y) if activation else y


def _xent(logits, labels):
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


def _classification_batch(shape, classes, dtype=np.float32):
    def make(rng, rows):
        return {
            "x": rng.standard_normal((rows,) + shape).astype(dtype),
            "y": rng.integers(0, classes, size=(rows,)).astype(np.int32),
        }

    return make


# ---- deep MLP -------------------------------------------------------------------------------
def mlp_fn(features, depth=6, width=16, classes=4):
    h = features["x"]
    for i in range(depth):
        with layer(f"layer_{i}"):
            h = _dense(h, width, "dense", tf.tanh)
    with layer("loss"):
        return _xent(_dense(h, classes, "logits"), features["y"])


MLP = ModelCase(
    "mlp", mlp_fn, {"x": ((8,), tf.float32), "y": ((), tf.int32)}, _classification_batch((8,), 4)
)


# ---- transformer blocks with a tied embedding -------------------------------------------------
VOCAB, SEQ, DIM = 11, 6, 8


def _layer_norm(x, name):
    gain = v1.get_variable(f"{name}/gain", [DIM], initializer=v1.ones_initializer())
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-5) * gain


def _project(x, name):
    w = v1.get_variable(name, [DIM, DIM], initializer=v1.glorot_uniform_initializer())
    return tf.reshape(tf.matmul(tf.reshape(x, [-1, DIM]), w), [-1, SEQ, DIM])


def transformer_fn(features, num_blocks=2):
    with layer("embedding"):
        table = v1.get_variable(
            "table", [VOCAB, DIM], initializer=v1.random_normal_initializer(0, 0.5)
        )
        position = v1.get_variable(
            "position", [SEQ, DIM], initializer=v1.random_normal_initializer(0, 0.1)
        )
        h = tf.nn.embedding_lookup(table, features["tokens"]) + position
    for i in range(num_blocks):
        with layer(f"block_{i}"):
            q, k, v = (_project(h, n) for n in ("q", "k", "v"))
            attention = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(DIM))
            h = _layer_norm(h + _project(tf.matmul(attention, v), "o"), "ln_1")
            ffn = tf.nn.relu(_project(h, "ffn_in"))
            h = _layer_norm(h + _project(ffn, "ffn_out"), "ln_2")
    with layer("output"):
        logits = tf.matmul(tf.reshape(h, [-1, DIM]), table, transpose_b=True)  # tied weights
        return _xent(logits, tf.reshape(features["targets"], [-1]))


def _token_batch(rng, rows):
    return {
        "tokens": rng.integers(0, VOCAB, size=(rows, SEQ)).astype(np.int32),
        "targets": rng.integers(0, VOCAB, size=(rows, SEQ)).astype(np.int32),
    }


TRANSFORMER = ModelCase(
    "transformer",
    transformer_fn,
    {"tokens": ((SEQ,), tf.int32), "targets": ((SEQ,), tf.int32)},
    _token_batch,
)


# ---- while-loop RNN -------------------------------------------------------------------------
STEPS, INPUT, HIDDEN = 5, 3, 6


def _rnn(inputs, name, return_sequence):
    """tanh RNN over axis 1 with tf.compat.v1.while_loop; time-major only inside the layer."""
    w = v1.get_variable(
        f"{name}/w",
        [inputs.shape[-1] + HIDDEN, HIDDEN],
        initializer=v1.glorot_uniform_initializer(),
    )
    time_major = tf.transpose(inputs, [1, 0, 2])
    outputs = tf.TensorArray(tf.float32, size=STEPS)

    def body(t, state, outputs):
        state = tf.tanh(tf.matmul(tf.concat([time_major[t], state], axis=1), w))
        return t + 1, state, outputs.write(t, state)

    _, state, outputs = v1.while_loop(
        lambda t, *_: t < STEPS, body, [0, tf.zeros([tf.shape(inputs)[0], HIDDEN]), outputs]
    )
    return tf.transpose(outputs.stack(), [1, 0, 2]) if return_sequence else state


def rnn_fn(features):
    with layer("input_proj"):
        w = v1.get_variable("w", [INPUT, INPUT], initializer=v1.glorot_uniform_initializer())
        h = tf.reshape(tf.matmul(tf.reshape(features["x"], [-1, INPUT]), w), [-1, STEPS, INPUT])
    with layer("rnn_0"):
        h = _rnn(h, "cell", return_sequence=True)
    with layer("rnn_1"):
        h = _rnn(h, "cell", return_sequence=False)
    with layer("loss"):
        return _xent(_dense(h, 4, "logits"), features["y"])


RNN = ModelCase(
    "rnn",
    rnn_fn,
    {"x": ((STEPS, INPUT), tf.float32), "y": ((), tf.int32)},
    _classification_batch((STEPS, INPUT), 4),
)


# ---- skip connection + batch-independent tensor crossing stages -------------------------------
def skip_fn(features):
    with layer("a"):
        first = _dense(features["x"], 8, "dense", tf.tanh)
        # Depends only on a variable: crosses stages whole, not split by rows.
        table_scale = tf.reduce_sum(
            tf.square(
                v1.get_variable("scale", [8], initializer=v1.random_normal_initializer(0, 0.3))
            )
        )
    with layer("b"):
        h = _dense(first, 8, "dense", tf.tanh)
    with layer("c"):
        h = _dense(h, 8, "dense", tf.tanh)
    with layer("d"):
        h = _dense(h + first * table_scale, 8, "dense", tf.tanh)  # skip from a
    with layer("loss"):
        return _xent(_dense(h, 4, "logits"), features["y"])


SKIP = ModelCase(
    "skip", skip_fn, {"x": ((8,), tf.float32), "y": ((), tf.int32)}, _classification_batch((8,), 4)
)


# ---- sparse gradients from an embedding lookup ------------------------------------------------
def sparse_fn(features):
    with layer("embedding"):
        table = v1.get_variable(
            "table", [VOCAB, DIM], initializer=v1.random_normal_initializer(0, 0.5)
        )
        h = tf.reduce_mean(tf.nn.embedding_lookup(table, features["tokens"]), axis=1)
    with layer("hidden"):
        h = _dense(h, DIM, "dense", tf.tanh)
    with layer("loss"):
        return _xent(_dense(h, 4, "logits"), features["y"])


def _sparse_batch(rng, rows):
    return {
        "tokens": rng.integers(0, VOCAB, size=(rows, SEQ)).astype(np.int32),
        "y": rng.integers(0, 4, size=(rows,)).astype(np.int32),
    }


SPARSE = ModelCase(
    "sparse", sparse_fn, {"tokens": ((SEQ,), tf.int32), "y": ((), tf.int32)}, _sparse_batch
)

ALL = {case.name: case for case in (MLP, TRANSFORMER, RNN, SKIP, SPARSE)}
