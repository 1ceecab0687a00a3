"""Batch norm's moving statistics (`UPDATE_OPS`), recognised as plain data (template analysis).

An update is an assign op (`AssignVariableOp`, `AssignSubVariableOp`, `AssignAddVariableOp`)
of a variable, whose value is computed from variables, constants and **statistics**: per-feature
statistics of a layer's rows, each one of
  - MEAN: `Mean(x, axes)` of a batch tensor x, reducing its batch axis (x's first axis, the only
    one of unknown size) and leaving a result whose shape does not depend on the batch;
  - VARIANCE: `Mean(SquaredDifference(x, StopGradient(m)), axes)` where m is the MEAN statistic
    `Mean(x, axes)` of the same x and axes (the biased variance `tf.nn.moments` computes);
  - UNBIASED_VARIANCE: output 2 of a training-mode `FusedBatchNormV3` (`exponential_avg_factor`
    1): the batch variance with Bessel's correction over the n = rows x H x W values of each
    channel (output 1, its MEAN, is a MEAN statistic).
The pipelined trainer evaluates each update once per step from the statistics of the whole
global batch, combined from every micro-batch clone's (graph_rewrite/moving_statistics.py).
Anything else in `UPDATE_OPS` or in an update's inputs that depends on the batch is refused
with a TemplateError naming the op: an update is never dropped or evaluated on part of the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

MEAN, VARIANCE, UNBIASED_VARIANCE = "mean", "variance", "unbiased_variance"
ASSIGN_OPS = frozenset({"AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"})
_READ_OPS = frozenset({"VarHandleOp", "ReadVariableOp"})


@dataclasses.dataclass(frozen=True)
class Statistic:
    """A per-feature statistic of a layer's rows, computed by every micro-batch clone."""

    tensor: str
    kind: str  # MEAN, VARIANCE or UNBIASED_VARIANCE
    mean: str | None = None  # the variances: the MEAN statistic of the same values
    values_per_row: int = 1  # UNBIASED_VARIANCE: values per channel of one row (H x W)


@dataclasses.dataclass(frozen=True)
class MovingUpdate:
    """One assign op of UPDATE_OPS and the template ops it evaluates."""

    assign: str  # the assign op
    variable: str  # the variable it writes
    ops: tuple[str, ...]  # the ops computing it (assign included), creation order
    reads: tuple[str, ...]  # variables whose handles those ops read (the written one included)
    statistics: tuple[str, ...]  # statistic tensors those ops read


class UpdateError(ValueError):
    """An UPDATE_OPS entry that is not a recognised moving-statistics update."""


def update_assign_ops(graph: tf.Graph) -> list[tf.Operation]:
    """The assign ops of the graph's UPDATE_OPS collection, in collection order. An entry is
    an assign op, a resource variable's lazy read of one, a tensor read after one (`assign`
    with read_value) or a group (NoOp/Identity) of such; anything else is an UpdateError."""
    found: dict[str, tf.Operation] = {}
    for entry in graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS):
        op = entry if isinstance(entry, tf.Operation) else getattr(entry, "op", None)
        if not isinstance(op, tf.Operation):
            raise UpdateError(f"UPDATE_OPS holds {entry!r}, which is not an op of the graph")
        stack = [op]
        while stack:
            op = stack.pop()
            if op.type in ASSIGN_OPS:
                found.setdefault(op.name, op)
            elif op.type in ("NoOp", "Identity", "ReadVariableOp"):
                stack.extend(op.control_inputs)
                stack.extend(t.op for t in op.inputs if op.type == "Identity")
            else:
                raise UpdateError(
                    f"UPDATE_OPS holds {op.name} ({op.type}): only assign ops of variables "
                    f"(moving statistics: {sorted(ASSIGN_OPS)}) can be carried through the "
                    f"pipeline"
                )
    return list(found.values())


def recognise_updates(
    graph: tf.Graph,
    feature_tensors: set[str],
    batch_tensors: frozenset[str],
    variable_ops: Mapping[str, tf.Operation],
) -> tuple[tuple[MovingUpdate, ...], dict[str, Statistic]]:
    """(the updates of UPDATE_OPS, the statistics they read by tensor, variances' means
    included). `batch_tensors`: tensors depending on a feature; `variable_ops`: every variable's
    handle op by name. Raises UpdateError naming what is not recognised."""
    statistics: dict[str, Statistic] = {}
    updates = []
    order = {op.name: k for k, op in enumerate(graph.get_operations())}  # creation order
    for assign in update_assign_ops(graph):
        handle = assign.inputs[0].op
        if handle.name not in variable_ops:
            raise UpdateError(
                f"update {assign.name} ({assign.type}) writes {handle.name} ({handle.type}), "
                f"which is not a resource variable"
            )
        ops, reads, read_statistics = {}, {handle.name: None}, {}
        stack = [assign]
        while stack:
            op = stack.pop()
            if op.name in ops:
                continue
            ops[op.name] = op
            for t in op.inputs:
                if t.op.name in variable_ops:
                    reads[t.op.name] = None
                    continue
                statistic = _statistic(t, batch_tensors)
                if statistic is not None:
                    read_statistics[t.name] = None
                    statistics[t.name] = statistic
                    if statistic.mean is not None:
                        mean = graph.get_tensor_by_name(statistic.mean)
                        statistics[statistic.mean] = _statistic(mean, batch_tensors)
                    continue
                forward = t.name in batch_tensors or t.name in feature_tensors
                if forward and _reads_rows(t, feature_tensors, batch_tensors):
                    raise UpdateError(
                        f"update {assign.name} of {handle.name}: {op.name} ({op.type}) reads "
                        f"{t.name}, which depends on the batch rows but is not a per-feature "
                        f"statistic of them that can be combined over micro-batches (a Mean "
                        f"over the batch axis, tf.nn.moments' variance or FusedBatchNormV3's "
                        f"batch mean/variance)"
                    )
                if t.op.op_def.is_stateful and t.op.type not in _READ_OPS:
                    raise UpdateError(
                        f"update {assign.name} of {handle.name} reads {t.name} of the stateful "
                        f"op {t.op.name} ({t.op.type}); it cannot be evaluated once per step"
                    )
                stack.append(t.op)
        updates.append(
            MovingUpdate(
                assign=assign.name,
                variable=handle.name,
                ops=tuple(sorted(ops, key=order.__getitem__)),
                reads=tuple(reads),
                statistics=tuple(read_statistics),
            )
        )
    return tuple(updates), statistics


def _reads_rows(t: tf.Tensor, feature_tensors: set[str], batch_tensors) -> bool:
    """Whether `t` depends on a feature other than through statistics."""
    seen, stack = set(), [t]
    while stack:
        t = stack.pop()
        if t.name in seen or _statistic(t, batch_tensors) is not None:
            continue
        if t.name in feature_tensors:
            return True
        seen.add(t.name)
        stack.extend(t.op.inputs)
    return False


def _statistic(t: tf.Tensor, batch_tensors: frozenset[str]) -> Statistic | None:
    """The statistic `t` is, or None."""
    op = t.op
    if op.type == "FusedBatchNormV3" and t.value_index in (1, 2):
        return _fused_statistic(t)
    if op.type != "Mean" or op.inputs[0].name not in batch_tensors:
        return None
    x = op.inputs[0]
    axes = _reduced_axes(op)
    if (
        axes is None
        or x.shape.rank is None
        or 0 not in axes
        or x.shape[0] is not None
        or not all(x.shape[k] is not None for k in range(1, x.shape.rank))
        or not t.shape.is_fully_defined()
    ):
        return None
    source = x.op
    if source.type == "SquaredDifference" and source.inputs[1].op.type == "StopGradient":
        mean = source.inputs[1].op.inputs[0]
        if (
            mean.op.type == "Mean"
            and mean.op.inputs[0] is source.inputs[0]
            and _reduced_axes(mean.op) == axes
            and _statistic(mean, batch_tensors) is not None
        ):
            return Statistic(t.name, VARIANCE, mean=mean.name)
        return None  # centred by something else of the micro-batch: not combinable
    return Statistic(t.name, MEAN)


def _fused_statistic(t: tf.Tensor) -> Statistic | None:
    op = t.op
    x = op.inputs[0]
    if (
        not op.get_attr("is_training")
        or op.get_attr("exponential_avg_factor") != 1.0
        or x.shape.rank != 4
        or x.shape[0] is not None
    ):
        return None
    spatial = (1, 2) if op.get_attr("data_format") == b"NHWC" else (2, 3)
    if any(x.shape[k] is None for k in spatial):
        return None
    if t.value_index == 1:
        return Statistic(t.name, MEAN)
    return Statistic(
        t.name,
        UNBIASED_VARIANCE,
        mean=op.outputs[1].name,
        values_per_row=int(np.prod([x.shape[k] for k in spatial])),
    )


def _reduced_axes(mean: tf.Operation) -> frozenset[int] | None:
    axes_op = mean.inputs[1].op
    if axes_op.type != "Const":
        return None
    rank = mean.inputs[0].shape.rank
    values = np.atleast_1d(tf.make_ndarray(axes_op.get_attr("value")))
    if rank is None:
        return None
    return frozenset(int(a) % rank for a in values)
