"""Random ops made stateless, so every global row gets the same numbers whatever the plan.

TF's random ops (`RandomUniform` under `tf.nn.dropout`, `RandomStandardNormal`,
`TruncatedNormal`, `RandomUniformInt`) draw from a per-op state: every micro-batch clone of a
stage would draw the same numbers, and which rows get which numbers would depend on the plan.
`make_stateless` replaces each of them in the model's graph (before any analysis, in
the single-device build too) by a stateless op whose numbers are a function of

    key  = H(seed, op name)     (first 63 bits of SHA-256 of "<seed>/<op name>")
    step = the global step of the training step (0 for the first one)
    rows = the global rows of the batch

through one feature the runtime feeds, `RANDOM_ROWS_FEATURE`: per row (global row index,
global batch size, step), int64. A random op whose shape depends on the batch has a first
dimension of k x rows (k = 1 for `[batch, ...]`, k = seq for a flattened `[batch * seq, ...]`);
its numbers are rows `[k * r0, k * r0 + n)` of
`tf.random.stateless_*(shape=[k * global batch, ...], seed=(key, step))`, where `r0` is the
global index of the clone's first row and `n` its first dimension: global row g always gets rows
`[k g, k (g + 1))` of the same draw. A random op whose shape does not depend on the batch gets
`tf.random.stateless_*(shape, seed=(key, step))` on every clone. The price: each clone draws the
random numbers of the whole global batch and keeps its rows (M x replicas times the numbers it
needs).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1

RANDOM_ROWS_FEATURE = "dapple_random_rows"
RANDOM_ROWS_SPEC = ((3,), tf.int64)
# (op type) -> builds the stateless replacement: (op, shape, seed pair) -> tensor
_STATELESS = {
    "RandomUniform": lambda op, shape, seed: tf.random.stateless_uniform(
        shape, seed, dtype=op.get_attr("dtype")
    ),
    "RandomStandardNormal": lambda op, shape, seed: tf.random.stateless_normal(
        shape, seed, dtype=op.get_attr("dtype")
    ),
    "TruncatedNormal": lambda op, shape, seed: tf.random.stateless_truncated_normal(
        shape, seed, dtype=op.get_attr("dtype")
    ),
    "RandomUniformInt": lambda op, shape, seed: tf.random.stateless_uniform(
        shape, seed, minval=op.inputs[1], maxval=op.inputs[2], dtype=op.get_attr("Tout")
    ),
}
# Stateful random ops without a stateless replacement here: refused rather than trained wrongly.
_UNSUPPORTED = frozenset(
    {
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
        "RandomShuffle",
        "ParameterizedTruncatedNormal",
        "StatefulUniform",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulUniformInt",
        "StatefulUniformFullInt",
    }
)
STATEFUL_TYPES = frozenset(_STATELESS) | _UNSUPPORTED


class RandomOpError(ValueError):
    """A random op dapple cannot make plan-independent (what, where, what to use instead)."""


def op_key(seed: int | None, op_name: str) -> int:
    """H(seed, op name): the first 63 bits of SHA-256 of '<seed>/<op name>'."""
    digest = hashlib.sha256(f"{seed or 0}/{op_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def random_ops_of(loss: tf.Tensor) -> list[tf.Operation]:
    """The random ops the loss depends on, in creation order; raises RandomOpError for one
    without a stateless replacement."""
    seen, stack = {loss.op}, [loss.op]
    while stack:
        op = stack.pop()
        if op.type in _UNSUPPORTED:
            raise RandomOpError(
                f"random op {op.name} ({op.type}) has no plan-independent replacement in "
                f"dapple; use tf.random.stateless_* ops or one of {sorted(_STATELESS)}"
            )
        for t in op.inputs:
            if t.op not in seen:
                seen.add(t.op)
                stack.append(t.op)
    return [op for op in loss.graph.get_operations() if op in seen and op.type in _STATELESS]


def make_stateless(
    random_ops: list[tf.Operation],
    rows_info: tf.Tensor,
    features: list[tf.Tensor],
    seed: int | None,
) -> None:
    """Replace each of `random_ops` by its stateless version (module doc), reading the
    RANDOM_ROWS_FEATURE placeholder `rows_info`; `features` tell which shapes depend on the
    batch."""
    graph = rows_info.graph
    batch_ops = _ops_reading(graph, [t.op for t in features])
    with graph.as_default():
        for op in random_ops:
            with tf.name_scope(f"{op.name}_stateless/"):
                shape = tf.cast(op.inputs[0], tf.int64)
                seed_pair = tf.stack(
                    [tf.constant(op_key(seed, op.name), tf.int64), rows_info[0, 2]]
                )
                if op.inputs[0].op in batch_ops:
                    value = _rows_of_global_draw(op, shape, seed_pair, rows_info)
                else:
                    value = _STATELESS[op.type](op, shape, seed_pair)
            _replace_uses(op.outputs[0], value)


def _rows_of_global_draw(op, shape, seed_pair, rows_info):
    rows = tf.shape(rows_info, out_type=tf.int64)[0]
    per_row = shape[0] // rows  # k: first dim = k x rows
    global_shape = tf.concat([[per_row * rows_info[0, 1]], shape[1:]], 0)
    drawn = _STATELESS[op.type](op, global_shape, seed_pair)
    first = per_row * rows_info[0, 0]
    return drawn[first : first + shape[0]]


def _replace_uses(old: tf.Tensor, new: tf.Tensor) -> None:
    new.set_shape(old.shape)
    for consumer in list(old.consumers()):
        for k, t in enumerate(consumer.inputs):
            if t is old:
                # Rewiring an existing op's input has no public API; the C API edits the edge.
                consumer._update_input(k, new)  # noqa: SLF001


def _ops_reading(graph: tf.Graph, sources: list[tf.Operation]) -> set[tf.Operation]:
    """Every op that depends on one of `sources` (inclusive)."""
    reached = set(sources)
    for op in graph.get_operations():
        if any(t.op in reached for t in op.inputs):
            reached.add(op)
    return reached


def rows_feature_value(first_row: int, rows: int, global_rows: int, step: int):
    """The RANDOM_ROWS_FEATURE rows [first_row, first_row + rows) of a step."""
    value = np.empty((rows, 3), np.int64)
    value[:, 0] = np.arange(first_row, first_row + rows)
    value[:, 1] = global_rows
    value[:, 2] = step
    return value
