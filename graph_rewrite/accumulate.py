"""Gradient accumulation and combination.

Per slot, dense gradients are summed as the backwards run (a running sum in schedule order), so
only one accumulated gradient per variable stays live instead of one per micro-batch. Sparse
gradients stay sparse: IndexedSlices are concatenated (duplicate indices are summed by the
optimizer's sparse apply, as in a single-device build).
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf


class SlotAccumulator:
    """Running sum of one slot's variable gradients over its micro-batches."""

    def __init__(self, scope: str):
        self.scope = scope
        self._dense: dict[str, tf.Tensor] = {}
        self._sparse: dict[str, list[tf.IndexedSlices]] = {}

    def add(self, variable: str, grad) -> list[tf.Operation]:
        """Add one micro-batch's gradient (call under the slot's device); returns the ops the
        backward action must finish."""
        if isinstance(grad, tf.IndexedSlices):
            self._sparse.setdefault(variable, []).append(grad)
            return [grad.values.op, grad.indices.op]
        if variable in self._dense:
            with tf.name_scope(f"{self.scope}/{_scope(variable)}/"):
                self._dense[variable] = tf.add(self._dense[variable], grad)
        else:
            self._dense[variable] = grad
        return [self._dense[variable].op]

    def result(self) -> dict:
        out = {}
        for v in list(self._dense) + [v for v in self._sparse if v not in self._dense]:
            parts = ([self._dense[v]] if v in self._dense else []) + self._sparse.get(v, [])
            out[v] = sum_gradients(parts, f"{self.scope}/{_scope(v)}_total")
        return out


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
        return tf.add_n([tf.convert_to_tensor(g) for g in grads])


def _scope(variable: str) -> str:
    return variable.replace("/", "_").replace(":", "_")
