"""Gradient sync: sum a stage's gradients over its replicas, then over the stages that read the
same variable (tied weights).

`LocalGradientSync` sums in-graph (all replicas in this process). A multi-rank implementation
(hvd.allreduce with op=Sum on the stage's process set) provides the same methods and is
passed to `rewrite(..., gradient_sync=...)`; `global_norm` (for clip_norm) is the norm of the
whole model's gradients, which a rank holding only some stages must sum across ranks.
"""

from __future__ import annotations

from typing import Protocol

import tensorflow as tf

from .accumulate import sum_gradients


class GradientSync(Protocol):
    def sum_replicas(
        self, stage: int, grads_by_replica: dict[int, dict], device_of_variable: dict[str, str]
    ) -> dict:
        """variable -> gradient summed over all replicas of `stage` (given: the local ones)."""

    def sum_stages(
        self, grads_by_stage: dict[int, dict], device_of_variable: dict[str, str]
    ) -> dict:
        """variable -> gradient summed over every stage that reads it (tied weights)."""

    def global_norm(self, grads: dict) -> tf.Tensor:
        """The global norm of the whole model's final gradients (`grads`: this process's
        variable -> final gradient, after sum_stages), every variable counted once."""

    def sum_statistics(
        self, stage: int, by_replica: dict[int, dict], ranks: tuple[int, ...], device: str
    ) -> dict:
        """name -> dense tensor summed over all replicas of `stage` (given: the local ones'
        tensors; `ranks`: the stage's plan devices), on `device` (batch norm's statistics,
        graph_rewrite/moving_statistics.py)."""


class LocalGradientSync:
    def sum_replicas(self, stage, grads_by_replica, device_of_variable):
        return _sum_by_variable(grads_by_replica, device_of_variable, f"dapple/sync/s{stage}")

    def sum_stages(self, grads_by_stage, device_of_variable):
        return _sum_by_variable(grads_by_stage, device_of_variable, "dapple/tied")

    def global_norm(self, grads):
        return tf.linalg.global_norm(list(grads.values()))

    def sum_statistics(self, stage, by_replica, ranks, device):
        return _sum_by_variable(
            by_replica,
            {name: device for values in by_replica.values() for name in values},
            f"dapple/sync/s{stage}",
        )


def _sum_by_variable(groups: dict[int, dict], device_of_variable, scope) -> dict:
    names = list(dict.fromkeys(v for k in sorted(groups) for v in groups[k]))
    out = {}
    for v in names:
        parts = [groups[k][v] for k in sorted(groups) if v in groups[k]]
        with tf.device(device_of_variable[v]):
            out[v] = sum_gradients(parts, f"{scope}/{v.replace('/', '_')}")
    return out
