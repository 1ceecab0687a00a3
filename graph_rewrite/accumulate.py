"""Gradient accumulation and combination.

Per slot, dense gradients are summed as the backwards run (a running sum in schedule order), so
only one accumulated gradient per variable stays live instead of one per micro-batch: each
backward call after the slot's first takes the sums so far and returns them with its own
gradients added (the stage's `backward_accumulate` function, graph_rewrite/stage_graph.py);
`SlotAccumulator` keeps the latest sums. Sparse gradients stay sparse: IndexedSlices are
concatenated (duplicate indices are summed by the optimizer's sparse apply, as in a
single-device build).
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

    def running_sums(self) -> dict[str, tf.Tensor]:
        """Variable -> dense gradient summed over the backwards so far (empty before the first)."""
        return dict(self._dense)

    def update(self, variable: str, grad) -> None:
        """Record one backward's result for `variable`: the new running sum (dense) or this
        micro-batch's IndexedSlices."""
        if isinstance(grad, tf.IndexedSlices):
            self._sparse.setdefault(variable, []).append(grad)
        else:
            self._dense[variable] = grad

    def result(self) -> dict:
        out = {}
        for v in list(self._dense) + [v for v in self._sparse if v not in self._dense]:
            parts = ([self._dense[v]] if v in self._dense else []) + self._sparse.get(v, [])
            out[v] = sum_gradients(parts, f"{self.scope}/{scope_name(v)}_total")
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
            return tf.IndexedSlices(
                tf.concat([g.values for g in grads], 0),
                tf.concat([tf.cast(g.indices, tf.int64) for g in grads], 0),
                grads[0].dense_shape,
            )
        return tf.add_n([tf.convert_to_tensor(g) for g in grads])


def scope_name(tensor: str) -> str:
    """A variable or tensor name as one name-scope part."""
    return tensor.replace("/", "_").replace(":", "_")
