"""Building blocks written from `tf` ops and `tf.compat.v1.get_variable` (no Keras).

Every model opens its layers with `layer_scope(name)`: a top-level variable scope (and thus name
scope) whose name is the layer name the planner and the graph rewriter see. All variables are
resource variables. Initial values come from stateless random ops seeded from the variable's full
name, so the same model starts from the same weights in any graph, whatever else the graph
holds, in which order the ops were created and whatever the graph-level seed (the pipelined and
the single-device builds therefore agree without copying weights).

All functions keep the batch dimension dynamic and treat rows independently (no batch norm).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1


@contextlib.contextmanager
def layer_scope(name: str):
    """Open the layer `name`: variables are named `name/...`, ops live under the top-level name
    scope `name/` even inside other scopes (the same rule as `dapple_tf.layer`)."""
    with (
        tf1.variable_scope(name, use_resource=True, auxiliary_name_scope=False) as scope,
        tf.name_scope(name + "/"),
    ):
        yield scope


def _seed_of(name: str, salt: int) -> int:
    return (zlib.crc32(name.encode()) ^ (salt * 0x9E3779B1)) & 0x7FFFFFFF


def variable(
    name: str,
    shape,
    initializer: str = "normal",
    stddev: float = 0.02,
    fan_in: int | None = None,
    value: float = 0.0,
    seed: int = 0,
    dtype=tf.float32,
) -> tf.Variable:
    """A resource variable under the current variable scope, initialised deterministically.

    initializer: "normal" (truncated normal, `stddev`), "he" (truncated normal with stddev
    sqrt(2 / fan_in)), "glorot" (uniform in ±sqrt(6 / (fan_in + fan_out))) or "constant"
    (`value`). The random ones are stateless random ops seeded from the variable's full name
    and `seed`: neither the graph-level seed nor the graph's other ops change them.
    """
    shape = [int(d) for d in shape]
    full_name = f"{tf1.get_variable_scope().name}/{name}"
    op_seed = [_seed_of(full_name, seed), _seed_of(full_name, seed + 1)]
    if initializer in ("he", "glorot"):
        fan = fan_in if fan_in is not None else int(np.prod(shape[:-1]))
    if initializer == "normal":

        def init(shape, dtype, partition_info=None):
            return stddev * tf.random.stateless_truncated_normal(shape, op_seed, dtype=dtype)
    elif initializer == "he":

        def init(shape, dtype, partition_info=None):
            return math.sqrt(2.0 / max(fan, 1)) * tf.random.stateless_truncated_normal(
                shape, op_seed, dtype=dtype
            )
    elif initializer == "glorot":
        limit = math.sqrt(6.0 / max(fan + shape[-1], 1))

        def init(shape, dtype, partition_info=None):
            return tf.random.stateless_uniform(shape, op_seed, -limit, limit, dtype=dtype)
    elif initializer == "constant":
        init = tf1.constant_initializer(value)
    else:
        raise ValueError(f"unknown initializer '{initializer}' for variable {full_name}")
    return tf1.get_variable(name, shape=shape, dtype=dtype, initializer=init, use_resource=True)


# ---- dense / norm / activations ----------------------------------------------------------------


def dense(
    x: tf.Tensor,
    units: int,
    name: str,
    activation=None,
    use_bias: bool = True,
    initializer: str = "normal",
    stddev: float = 0.02,
) -> tf.Tensor:
    """x[..., in] @ W[in, units] + b, for any number of leading dimensions."""
    in_dim = int(x.shape[-1])
    with tf1.variable_scope(name):
        w = variable("kernel", [in_dim, units], initializer=initializer, stddev=stddev)
        inner = x.shape[1:-1].as_list()
        if x.shape.rank == 2:
            y = tf.matmul(x, w)
        elif all(d is not None for d in inner):
            # Fewer ops than tensordot: fold the (static) inner dimensions into the rows.
            y = tf.reshape(tf.matmul(tf.reshape(x, [-1, in_dim]), w), [-1] + inner + [units])
        else:
            y = tf.tensordot(x, w, axes=[[x.shape.rank - 1], [0]])
        if use_bias:
            y = y + variable("bias", [units], initializer="constant")
        return activation(y) if activation is not None else y


def layer_norm(
    x: tf.Tensor, name: str = "layer_norm", axes=(-1,), epsilon: float = 1e-6, affine: bool = True
):
    """Normalise each row over `axes` (default: the last), then (if `affine`) apply a learned
    scale and shift over the last axis. Per example, so micro-batches give the same result as
    the full batch."""
    rank = x.shape.rank
    axes = [a % rank for a in axes]
    with tf1.variable_scope(name):
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        centered = x - mean
        var = tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True)
        y = centered * tf.math.rsqrt(var + epsilon)
        if not affine:
            return y
        gamma = variable("gamma", [int(x.shape[-1])], initializer="constant", value=1.0)
        beta = variable("beta", [int(x.shape[-1])], initializer="constant", value=0.0)
        return y * gamma + beta


def gelu(x: tf.Tensor) -> tf.Tensor:
    return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))


def dropout(x: tf.Tensor, rate: float) -> tf.Tensor:
    """Dropout when rate > 0 (never in tests: tiny presets use rate 0 and are deterministic)."""
    return tf.nn.dropout(x, rate=rate) if rate > 0 else x


# ---- convolutions --------------------------------------------------------------------------


def conv2d(
    x: tf.Tensor,
    filters: int,
    kernel,
    name: str,
    stride: int = 1,
    use_bias: bool = True,
    activation=None,
    padding: str = "SAME",
) -> tf.Tensor:
    """NHWC convolution. `kernel` is an int or (kh, kw)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    in_ch = int(x.shape[-1])
    with tf1.variable_scope(name):
        w = variable("kernel", [kh, kw, in_ch, filters], initializer="he", fan_in=kh * kw * in_ch)
        y = tf.nn.conv2d(x, w, strides=[1, stride, stride, 1], padding=padding)
        if use_bias:
            y = y + variable("bias", [filters], initializer="constant")
        return activation(y) if activation is not None else y


def separable_conv2d(x: tf.Tensor, filters: int, kernel: int, name: str, stride: int = 1):
    """Depthwise kernel×kernel then pointwise 1×1, no bias (as in NASNet/AmoebaNet cells)."""
    in_ch = int(x.shape[-1])
    with tf1.variable_scope(name):
        dw = variable(
            "depthwise_kernel", [kernel, kernel, in_ch, 1], initializer="he", fan_in=kernel * kernel
        )
        pw = variable("pointwise_kernel", [1, 1, in_ch, filters], initializer="he", fan_in=in_ch)
        return tf.nn.separable_conv2d(x, dw, pw, strides=[1, stride, stride, 1], padding="SAME")


def max_pool(x, size=2, stride=2, padding="VALID"):
    return tf.nn.max_pool2d(x, ksize=size, strides=stride, padding=padding)


def avg_pool(x, size=3, stride=1, padding="SAME"):
    return tf.nn.avg_pool2d(x, ksize=size, strides=stride, padding=padding)


# ---- recurrent -------------------------------------------------------------------------------


def lstm(
    inputs: tf.Tensor,
    lengths: tf.Tensor,
    units: int,
    name: str,
    reverse: bool = False,
    forget_bias: float = 1.0,
    unrolled: bool = False,
) -> tf.Tensor:
    """A single-layer LSTM over `inputs` [batch, time, features] starting from zero state;
    returns the outputs [batch, time, units], zero at and beyond each row's length.

    `reverse=True` reads each row's valid prefix backwards (the backward half of a
    bidirectional layer); outputs stay aligned with the input positions.

    The default implementation is TF's fused `BlockLSTM` op (one op per layer, forward and
    gradient kernels on CPU and GPU, no while loop, so the graph rewriter clones it like any
    op). Padding needs no special care there: a row's outputs at valid positions depend only on
    earlier positions, and the backward direction first moves each row's valid prefix to the
    front. `unrolled=True` builds the same cell from elementwise ops, one step at a time (the
    reference the tests compare the fused op with).
    """
    num_steps = int(inputs.shape[1])
    in_dim = int(inputs.shape[2])
    if reverse:
        inputs = tf.reverse_sequence(inputs, lengths, seq_axis=1, batch_axis=0)
    valid = tf.sequence_mask(lengths, num_steps, dtype=inputs.dtype)[:, :, None]  # [B, T, 1]
    with tf1.variable_scope(name):
        # Gate order of the kernel's columns: input, cell candidate, forget, output (BlockLSTM's).
        kernel = variable(
            "kernel", [in_dim + units, 4 * units], initializer="glorot", fan_in=in_dim + units
        )
        bias = variable("bias", [4 * units], initializer="constant")
        batch = tf.shape(inputs)[0]
        zeros = tf.zeros(tf.stack([batch, units]), dtype=inputs.dtype)
        if unrolled:
            out = _unrolled_lstm(inputs, kernel, bias, zeros, forget_bias)
        else:
            no_peephole = tf.zeros([units], dtype=inputs.dtype)
            time_major = tf.transpose(inputs, [1, 0, 2])
            h = tf.raw_ops.BlockLSTM(
                seq_len_max=tf.constant(num_steps, tf.int64),
                x=time_major,
                cs_prev=zeros,
                h_prev=zeros,
                w=kernel,
                wci=no_peephole,
                wcf=no_peephole,
                wco=no_peephole,
                b=bias,
                forget_bias=forget_bias,
                cell_clip=-1.0,
                use_peephole=False,
            )[6]
            out = tf.transpose(h, [1, 0, 2])
        out = out * valid
        if reverse:
            out = tf.reverse_sequence(out, lengths, seq_axis=1, batch_axis=0)
        return out


def _unrolled_lstm(inputs, kernel, bias, zeros, forget_bias):
    in_dim = int(inputs.shape[2])
    x_proj = tf.unstack(tf.tensordot(inputs, kernel[:in_dim], axes=[[2], [0]]) + bias, axis=1)
    h_kernel = kernel[in_dim:]
    c, h, outputs = zeros, zeros, []
    for x_t in x_proj:
        i, j, f, o = tf.split(x_t + tf.matmul(h, h_kernel), 4, axis=1)
        c = c * tf.sigmoid(f + forget_bias) + tf.sigmoid(i) * tf.tanh(j)
        h = tf.tanh(c) * tf.sigmoid(o)
        outputs.append(h)
    return tf.stack(outputs, axis=1)


# ---- losses ----------------------------------------------------------------------------------


def masked_token_xent(logits: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Per-example loss [batch]: the weighted mean over positions of the token cross entropy
    (rows with no weighted position give 0)."""
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    total = tf.reduce_sum(xent * weights, axis=-1)
    count = tf.reduce_sum(weights, axis=-1)
    return total / tf.maximum(count, 1.0)


def attention_bias(mask: tf.Tensor) -> tf.Tensor:
    """0 where mask is 1 (may attend), -1e9 where it is 0; same shape as mask."""
    return (1.0 - tf.cast(mask, tf.float32)) * -1e9
