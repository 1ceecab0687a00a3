"""A small BERT classifier written the way TF1 users wrote BERT (our own code, in the style of the
public release's `modeling.py`): one `bert` variable scope holding `embeddings`, `encoder` with
`layer_<k>` (self-attention and feed-forward), `pooler`; a `cls` classifier; `get_shape_list`
with `tf.shape` for the batch size, the attention mask built from it in the `encoder` scope,
2-D `[batch * seq, hidden]` tensors between encoder layers, dropout.

Nothing here knows about dapple: the tests name its layers with the rule `LAYERS`.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1

LAYERS = r"bert/embeddings|bert/encoder/layer_\d+|bert/pooler|cls"


def get_shape_list(tensor):
    """Static dimensions where known, else scalars of `tf.shape` (as BERT's helper)."""
    static = tensor.shape.as_list()
    dynamic = tf.shape(tensor)
    return [dim if dim is not None else dynamic[k] for k, dim in enumerate(static)]


def dense(x, units, name, activation=None, stddev=0.02):
    with v1.variable_scope(name):
        kernel = v1.get_variable(
            "kernel",
            [x.shape[-1], units],
            initializer=v1.truncated_normal_initializer(stddev=stddev),
        )
        bias = v1.get_variable("bias", [units], initializer=v1.zeros_initializer())
        y = tf.matmul(x, kernel) + bias
        return activation(y) if activation is not None else y


def layer_norm(x, name="LayerNorm"):
    with v1.variable_scope(name):
        gamma = v1.get_variable("gamma", [x.shape[-1]], initializer=v1.ones_initializer())
        beta = v1.get_variable("beta", [x.shape[-1]], initializer=v1.zeros_initializer())
        mean, variance = tf.nn.moments(x, [-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + 1e-12) * gamma + beta


def gelu(x):
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def dropout(x, rate):
    return x if rate == 0.0 else tf.nn.dropout(x, rate=rate)


def reshape_to_matrix(x):
    return tf.reshape(x, [-1, x.shape[-1]])


def attention_mask(input_ids, input_mask):
    batch_size, seq_length = get_shape_list(input_ids)
    to_mask = tf.cast(tf.reshape(input_mask, [batch_size, 1, seq_length]), tf.float32)
    ones = tf.ones([batch_size, seq_length, 1], tf.float32)
    return ones * to_mask


def attention(x, mask, batch_size, seq_length, heads, dropout_rate):
    width = x.shape[-1] // heads

    def split_heads(t):
        t = tf.reshape(t, [batch_size, seq_length, heads, width])
        return tf.transpose(t, [0, 2, 1, 3])

    with v1.variable_scope("self"):
        q = split_heads(dense(x, heads * width, "query"))
        k = split_heads(dense(x, heads * width, "key"))
        v = split_heads(dense(x, heads * width, "value"))
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(width))
        scores += (1.0 - tf.expand_dims(mask, 1)) * -10000.0
        probs = dropout(tf.nn.softmax(scores), dropout_rate)
        context = tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3])
        return tf.reshape(context, [batch_size * seq_length, heads * width])


def bert_classifier(
    features,
    *,
    hidden=16,
    layers=2,
    heads=2,
    intermediate=32,
    vocab=50,
    max_positions=16,
    classes=3,
    dropout_rate=0.1,
):
    input_ids, input_mask = features["input_ids"], features["input_mask"]
    with v1.variable_scope("bert"):
        with v1.variable_scope("embeddings"):
            batch_size, seq_length = get_shape_list(input_ids)
            table = v1.get_variable(
                "word_embeddings",
                [vocab, hidden],
                initializer=v1.truncated_normal_initializer(stddev=0.02),
            )
            x = tf.gather(table, input_ids)
            positions = v1.get_variable(
                "position_embeddings",
                [max_positions, hidden],
                initializer=v1.truncated_normal_initializer(stddev=0.02),
            )
            x += tf.expand_dims(tf.slice(positions, [0, 0], [seq_length, -1]), 0)
            x = dropout(layer_norm(x), dropout_rate)
        with v1.variable_scope("encoder"):
            shape = get_shape_list(x)
            batch_size, seq_length = shape[0], shape[1]
            mask = attention_mask(input_ids, input_mask)
            h = reshape_to_matrix(x)
            for k in range(layers):
                with v1.variable_scope(f"layer_{k}"):
                    with v1.variable_scope("attention"):
                        a = attention(h, mask, batch_size, seq_length, heads, dropout_rate)
                        with v1.variable_scope("output"):
                            a = dropout(dense(a, hidden, "dense"), dropout_rate)
                            a = layer_norm(a + h)
                    with v1.variable_scope("intermediate"):
                        m = dense(a, intermediate, "dense", activation=gelu)
                    with v1.variable_scope("output"):
                        m = dropout(dense(m, hidden, "dense"), dropout_rate)
                        h = layer_norm(m + a)
            sequence_output = tf.reshape(h, [batch_size, seq_length, hidden])
        with v1.variable_scope("pooler"):
            first = tf.squeeze(sequence_output[:, 0:1, :], axis=1)
            pooled = dense(first, hidden, "dense", activation=tf.tanh)
    with v1.variable_scope("cls"):
        logits = dense(dropout(pooled, dropout_rate), classes, "output")
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=features["label"], logits=logits
        )
        return tf.reduce_mean(losses)


SEQ = 8
FEATURE_SPEC = {
    "input_ids": ((SEQ,), tf.int32),
    "input_mask": ((SEQ,), tf.int32),
    "label": ((), tf.int32),
}


def make_batch(rng: np.random.Generator, rows: int, vocab: int = 50, classes: int = 3) -> dict:
    lengths = rng.integers(2, SEQ + 1, size=rows)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(1, vocab, size=(rows, SEQ)) * mask).astype(np.int32),
        "input_mask": mask,
        "label": rng.integers(0, classes, size=rows).astype(np.int32),
    }
