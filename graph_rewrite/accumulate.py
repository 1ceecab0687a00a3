"""Gradient accumulation and combination: sum per-micro-batch gradients, keeping sparse ones
sparse (IndexedSlices are concatenated, so sparse optimizer updates see the same rows as in a
single-device build, where duplicate indices are summed by the optimizer)."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def sum_gradients(grads: Sequence, name: str):
    """Sum dense tensors and/or IndexedSlices. All IndexedSlices -> IndexedSlices (concatenated
    rows); any dense among them -> dense (as tf.gradients aggregates mixed gradients)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return None
    if len(grads) == 1:
        return grads[0]
    with tf.name_scope(name):
        if all(isinstance(g, tf.IndexedSlices) for g in grads):
            return tf.IndexedSlices(tf.concat([g.values for g in grads], 0),
                                    tf.concat([tf.cast(g.indices, tf.int64) for g in grads], 0),
                                    grads[0].dense_shape)
        dense = [tf.convert_to_tensor(g) for g in grads]
        return tf.add_n(dense)


def accumulate_micro_batches(grads_per_micro_batch: Sequence[dict], name: str) -> dict:
    """variable -> sum over micro-batches, for one slot (ops on the caller's device)."""
    names = list(dict.fromkeys(v for grads in grads_per_micro_batch for v in grads))
    return {v: sum_gradients([grads.get(v) for grads in grads_per_micro_batch],
                             f"{name}/{_scope(v)}") for v in names}


def _scope(variable: str) -> str:
    return variable.replace("/", "_").replace(":", "_")
