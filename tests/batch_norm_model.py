"""A model with batch norm in three layers, for tests/test_batch_norm.py and the multi-rank
checks (tests/multirank/trainer_checks.py): tf.nn.moments batch norm (moving statistics updated
with `v1.assign` and with `assign_moving_average`'s AssignSub form), optionally a
FusedBatchNormV3 one. `chunks` makes the single-device reference of pipelined training with
micro-batches: each clone's rows normalised by their own statistics, the moving statistics
updated from the whole batch's.
"""

import functools

import numpy as np
import tensorflow as tf
from tensorflow.python.training import moving_averages

from dapple_tf.layers import layer

v1 = tf.compat.v1
WIDTH = 6
SPEC = {"x": ((WIDTH,), tf.float32), "y": ((1,), tf.float32)}
DECAY = 0.9
LAYERS = ("layer_0", "layer_1", "layer_2", "loss")


def moments_batch_norm(x, chunks):
    """Normalise each of `chunks` equal row chunks of x by its own tf.nn.moments; update the
    moving statistics from x's (assign, and assign_moving_average's AssignSub form)."""
    gamma = v1.get_variable("gamma", [WIDTH], initializer=v1.ones_initializer())
    beta = v1.get_variable("beta", [WIDTH], initializer=v1.zeros_initializer())
    moving_mean = v1.get_variable(
        "moving_mean", [WIDTH], initializer=v1.zeros_initializer(), trainable=False
    )
    moving_variance = v1.get_variable(
        "moving_variance", [WIDTH], initializer=v1.ones_initializer(), trainable=False
    )
    outs = []
    for part in tf.split(x, chunks) if chunks > 1 else [x]:
        mean, variance = tf.nn.moments(part, [0])
        outs.append(tf.nn.batch_normalization(part, mean, variance, beta, gamma, 1e-3))
    if chunks > 1:
        mean, variance = tf.nn.moments(x, [0])
    v1.add_to_collection(
        v1.GraphKeys.UPDATE_OPS,
        v1.assign(moving_mean, DECAY * moving_mean + (1 - DECAY) * mean),
    )
    v1.add_to_collection(
        v1.GraphKeys.UPDATE_OPS,
        moving_averages.assign_moving_average(moving_variance, variance, DECAY, zero_debias=False),
    )
    return tf.concat(outs, 0) if chunks > 1 else outs[0]


def fused_batch_norm(x, chunks):
    """FusedBatchNormV3 over x as [rows, 2, 1, 3] (3 channels, 2 values per row each); the
    moving variance takes its Bessel-corrected batch variance, as TF1's batch norm does."""
    gamma = v1.get_variable("gamma", [3], initializer=v1.ones_initializer())
    beta = v1.get_variable("beta", [3], initializer=v1.zeros_initializer())
    moving_mean = v1.get_variable(
        "moving_mean", [3], initializer=v1.zeros_initializer(), trainable=False
    )
    moving_variance = v1.get_variable(
        "moving_variance", [3], initializer=v1.ones_initializer(), trainable=False
    )
    images = tf.reshape(x, [-1, 2, 1, 3])
    outs = []
    for part in tf.split(images, chunks) if chunks > 1 else [images]:
        y, mean, variance = v1.nn.fused_batch_norm(part, gamma, beta, epsilon=1e-3)
        outs.append(y)
    if chunks > 1:
        _, mean, variance = v1.nn.fused_batch_norm(images, gamma, beta, epsilon=1e-3)
    for moving, value in ((moving_mean, mean), (moving_variance, variance)):
        v1.add_to_collection(
            v1.GraphKeys.UPDATE_OPS,
            moving_averages.assign_moving_average(moving, value, DECAY, zero_debias=False),
        )
    y = tf.concat(outs, 0) if chunks > 1 else outs[0]
    return tf.reshape(y, [-1, WIDTH])


def bn_model(features, chunks=(1, 1, 1), fused=False):
    """layer_0: batch norm of the features, dense; layer_1: batch norm, dense; layer_2: batch
    norm (fused if `fused`), dense; loss. `chunks`: per layer, how many row chunks normalise
    separately (1: the whole batch)."""
    h = features["x"]
    for k in range(3):
        with layer(f"layer_{k}"):
            norm = fused_batch_norm if fused and k == 2 else moments_batch_norm
            h = norm(h, chunks[k])
            width = 1 if k == 2 else WIDTH
            kernel = v1.get_variable("kernel", [WIDTH, width])
            h = tf.matmul(h, kernel)
            if k < 2:
                h = tf.tanh(h)
    with layer("loss"):
        return tf.reduce_mean(tf.square(h - features["y"]))


def make_batch(rng, rows):
    """Features far from zero mean and unit variance, so that the statistics matter."""
    return {
        "x": (rng.standard_normal((rows, WIDTH)) * 2.0 + 3.0).astype(np.float32),
        "y": rng.standard_normal((rows, 1)).astype(np.float32),
    }


def ghost_chunks(plan) -> tuple[int, ...]:
    """Per batch-norm layer: how many clones split the global batch's rows in `plan` (the
    `chunks` of the single-device reference of that plan)."""
    stage_of_layer = plan.stage_of_layer()
    return tuple(
        plan.num_micro_batches * plan.stages[stage_of_layer[f"layer_{k}"]].num_replicas
        for k in range(3)
    )


def model(chunks=(1, 1, 1), fused=False):
    return functools.partial(bn_model, chunks=tuple(chunks), fused=fused)
