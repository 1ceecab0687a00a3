"""Models shared by the benchmark scripts (run from the repository root: `python bench/x.py`)."""

import tensorflow as tf

from dapple_tf.layers import layer

v1 = tf.compat.v1


def mlp_fn(features, depth, width, classes=10):
    """`depth` equal dense+tanh layers; the last one also computes the loss."""
    h = features["x"]
    for i in range(depth):
        with layer(f"layer_{i}"):
            w = v1.get_variable("kernel", [h.shape[-1], width])
            b = v1.get_variable("bias", [width], initializer=v1.zeros_initializer())
            h = tf.tanh(tf.matmul(h, w) + b)
            if i == depth - 1:
                logits = tf.matmul(h, v1.get_variable("logits", [width, classes]))
                return tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=features["y"], logits=logits
                    )
                )


def relu_mlp_fn(features, depth=8, width=1024, classes=10):
    """Issue #17's MLP: `depth` dense+ReLU layers of `width` units, then a softmax layer (`loss`)."""
    h = features["x"]
    for i in range(depth):
        with layer(f"layer_{i}"):
            w = v1.get_variable("kernel", [h.shape[-1], width])
            b = v1.get_variable("bias", [width], initializer=v1.zeros_initializer())
            h = tf.nn.relu(tf.matmul(h, w) + b)
    with layer("loss"):
        w = v1.get_variable("kernel", [width, classes])
        b = v1.get_variable("bias", [classes], initializer=v1.zeros_initializer())
        logits = tf.matmul(h, w) + b
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=features["y"], logits=logits)
        )
