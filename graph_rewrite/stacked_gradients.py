"""Weight gradients of all micro-batches at once, over their stacked rows.

A dense weight gradient such as `MatMul(x, g, transpose_a=True)` sums over the rows of its
micro-batch, so the sum over micro-batches equals one call over the micro-batches' rows stacked
along axis 0: sum_i X_i^T G_i = X^T G. One such call replaces M small matmuls and M - 1 running-sum
additions of a weight-sized tensor per variable.

`plan_stacking` decides, per dense variable gradient, whether that is exact, from the weight part
of the stage's backward (graph_rewrite/backward_split.py) alone:

* every tensor the weight part reads from outside it is a *row tensor* (static axis 0 of the
  stage's micro-batch rows, so stacking concatenates whole micro-batches) or a variable handle;
* its ops keep rows apart until they sum over them: elementwise ops and `MatMul(row, free)` map
  row tensors to row tensors (equal ranks, so broadcasting never pairs axis 0 with another
  axis), `MatMul(row, row, transpose_a=True)`, `Sum` over axis 0 and `BiasAddGrad` turn row
  tensors into *row sums*, and only linear ops (sums of row sums, reshapes, scaling by a
  row-free tensor) follow;
* row-free tensors come from constants, variable handles and reads, and call inputs with one
  value per step (`step_constants`: the forward's variable reads, as variables change only at
  the step's end; the loss seed, the slot's share of the global batch), never from a stateful
  op: they are the same for every micro-batch. A row-free tensor with the micro-batch's rows
  (the loss seed tiled over the rows) stays in the per-micro-batch backward and is stacked like
  a row tensor.

Then the gradient is a sum over the stacked rows of one function per row, which is exactly the
sum over micro-batches (up to the order of float additions).

On a stage of a multi-stage plan (`row_ops_per_micro_batch`) only the sums over rows and what
follows them are stacked; everything they read with the micro-batch's rows on axis 0 is
computed per micro-batch, as without stacking, so any such tensor counts as a row tensor
(whatever computed it, batch norm's coupling of rows included): a sum over axis 0 of the
stacked calls' values is the sum over calls of their sums. A gradient that other outputs also
read (batch norm's beta: its sum over rows flows on into the input gradient), or whose sums read
a row sum that other outputs share, stays on the per-micro-batch path. Any other gradient (sparse, reading
the loss seed, reshaping rows, ...) keeps the per-micro-batch path with running sums.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from dapple_tf import compat

from .backward_split import (
    data_ancestors,
    reads_any,
    split_backward,
    subgraph,
    with_data_descendants,
)
from .graphdefs import GradRef, canonical_tensor_name, split_tensor_name

ROW, ROW_SUM, FREE = "row", "row sum", "free"

_ELEMENTWISE = frozenset(
    {
        "Identity",
        "Neg",
        "Abs",
        "Sign",
        "Square",
        "Sqrt",
        "Rsqrt",
        "Exp",
        "Log",
        "Log1p",
        "Reciprocal",
        "Relu",
        "Relu6",
        "Elu",
        "Selu",
        "Tanh",
        "Sigmoid",
        "Softplus",
        "Softsign",
        "Erf",
        "ZerosLike",
        "OnesLike",
        "Cast",
        "Floor",
        "Ceil",
        "Round",
        "ReluGrad",
        "Relu6Grad",
        "EluGrad",
        "SeluGrad",
        "TanhGrad",
        "SigmoidGrad",
        "SoftplusGrad",
        "SoftsignGrad",
        "RsqrtGrad",
        "SqrtGrad",
        "ReciprocalGrad",
        "Add",
        "AddV2",
        "AddN",
        "Sub",
        "Mul",
        "Div",
        "RealDiv",
        "DivNoNan",
        "MulNoNan",
        "Maximum",
        "Minimum",
        "SquaredDifference",
        "Pow",
        "Greater",
        "GreaterEqual",
        "Less",
        "LessEqual",
        "Equal",
        "NotEqual",
        "SelectV2",
    }
)  # not v1 Select: a rank-1 condition picks rows
_SUMS_OF_ROW_SUMS = frozenset({"Identity", "Neg", "Add", "AddV2", "AddN", "Sub"})
_SCALED_ROW_SUM = frozenset({"Mul", "Div", "RealDiv"})  # row sum (op) row-free
_RESHAPED_ROW_SUM = frozenset({"Reshape", "ExpandDims", "Squeeze", "Transpose"})


@dataclasses.dataclass(frozen=True)
class StackingPlan:
    """How a stage's backward splits for stacked weight gradients."""

    variables: tuple[str, ...]  # variables whose gradient is computed stacked
    weight_graph_def: graph_pb2.GraphDef  # the nodes computing them (once per step)
    row_inputs: tuple[str, ...]  # tensors it reads, one per micro-batch, stacked
    handle_inputs: tuple[str, ...]  # variable handles it reads ('<variable>:0')
    constant_inputs: tuple[str, ...]  # step constants it reads (from any one call)
    outputs: tuple[str, ...]  # gradient tensor of each of `variables`
    input_graph_def: graph_pb2.GraphDef  # the per-micro-batch backward without them
    backward_row_outputs: tuple[str, ...]  # row inputs the per-micro-batch backward computes


def plan_stacking(
    backward: graph_pb2.GraphDef,
    input_grads: Mapping[str, str],
    variable_grads: Mapping[str, GradRef],
    rows: int,
    spec_of: Callable[[str], tf.TensorSpec],
    variable_handles: set[str],
    step_constants: set[str],
    row_ops_per_micro_batch: bool = False,
) -> StackingPlan | None:
    """Split `backward` (a stage's backward GraphDef, inputs as function arguments) so the dense
    gradients that are sums over rows are computed once from the stacked rows (module doc).
    `input_grads`: input tensor -> its gradient tensor; `rows`: the micro-batch rows of every
    call; `spec_of`: static spec of a tensor of `backward` or of one of its inputs;
    `variable_handles`: variable names whose handles are arguments; `step_constants`: input
    tensors with one value per step for every call. `row_ops_per_micro_batch`: only the sums
    over rows (and what follows them) are stacked; the row-by-row ops that feed them (the
    activation gradients of a first stage, which sends no input gradient) stay in the
    per-micro-batch backward. None if no gradient qualifies."""
    dense = {v: canonical_tensor_name(r.dense) for v, r in variable_grads.items() if r.dense}
    split = split_backward(backward, input_grads.values(), dense.values())
    kinds = _RowKinds(
        backward,
        split.weight_part,
        rows,
        spec_of,
        variable_handles,
        {canonical_tensor_name(t) for t in step_constants},
        rows_by_shape=row_ops_per_micro_batch,
    )
    stacked = {v: t for v, t in dense.items() if kinds.of(t) == ROW_SUM}
    while stacked:
        others = [
            *input_grads.values(),
            *(
                canonical_tensor_name(t)
                for v, r in variable_grads.items()
                if v not in stacked
                for t in (r.dense, r.indices, r.values, r.dense_shape)
                if t
            ),
        ]
        kept_by_others = data_ancestors(backward, others)
        # A gradient that other outputs also read (batch norm's beta: the sum over rows of its
        # output gradient also flows back into the input gradient through the batch mean) is
        # computed per micro-batch anyway: it stays there, and the others are checked again.
        needed = {v for v, t in stacked.items() if split_tensor_name(t)[0] in kept_by_others}
        if needed:
            stacked = {v: t for v, t in stacked.items() if v not in needed}
            continue
        own = (
            data_ancestors(
                backward, stacked.values(), within=set(split.weight_part) - kinds.row_shaped_free
            )
            - kept_by_others
        )  # nodes only these gradients need
        per_call = set()  # nodes the per-micro-batch backward keeps although `own` holds them
        if row_ops_per_micro_batch:
            row_nodes = {n for n in own if kinds.memo.get(n) == ROW}
            per_call = data_ancestors(backward, [f"{n}:0" for n in row_nodes], within=own)
            # the row-free nodes they read stay in both (computed from constants)
            own -= {n for n in per_call if kinds.memo.get(n) != FREE}
        constants = {
            split_tensor_name(i)[0]
            for n in backward.node
            if n.name in own
            for i in n.input
            if split_tensor_name(i)[0] in kinds.const_by_name
        }
        weight_nodes = own | constants  # a shared constant: a copy each
        weight_graph_def = subgraph(backward, weight_nodes)
        read = [
            canonical_tensor_name(i)
            for n in weight_graph_def.node
            for i in n.input
            if not i.startswith("^")
        ]
        outside = list(
            dict.fromkeys(t for t in read if split_tensor_name(t)[0] not in weight_nodes)
        )
        handle_inputs = tuple(t for t in outside if split_tensor_name(t)[0] in variable_handles)
        constant_inputs = tuple(
            t
            for t in outside
            if t not in handle_inputs
            and kinds.of(t) == FREE
            and split_tensor_name(t)[0] not in kinds.row_shaped_free
        )
        row_inputs = tuple(t for t in outside if t not in handle_inputs + constant_inputs)
        # Only tensors with the micro-batch's rows on axis 0 can be stacked; a sum over rows
        # that other outputs share, read from outside, cannot: its gradients stay per call.
        unstackable = {
            t
            for t in row_inputs
            if kinds.of(t) != ROW and split_tensor_name(t)[0] not in kinds.row_shaped_free
        }
        if not unstackable:
            break
        stacked = {
            v: t
            for v, t in stacked.items()
            if not reads_any(
                weight_graph_def, data_ancestors(backward, [t], within=own), unstackable
            )
        }
    if not stacked:
        return None
    produced = {n.name for n in backward.node}
    return StackingPlan(
        variables=tuple(stacked),
        weight_graph_def=weight_graph_def,
        row_inputs=row_inputs,
        handle_inputs=handle_inputs,
        constant_inputs=constant_inputs,
        outputs=tuple(stacked.values()),
        input_graph_def=subgraph(
            backward, produced - with_data_descendants(backward, own - per_call)
        ),
        backward_row_outputs=tuple(t for t in row_inputs if split_tensor_name(t)[0] in produced),
    )


class _RowKinds:
    """ROW, ROW_SUM, FREE or None (anything else) for tensors the weight part computes."""

    def __init__(
        self,
        backward,
        weight_part,
        rows,
        spec_of,
        variable_handles,
        step_constants,
        rows_by_shape=False,
    ):
        """`rows_by_shape`: a node of the weight part that is none of the kinds but has the
        micro-batch's rows on axis 0 is a ROW tensor: it will be computed per call (each call
        computes it from its own micro-batch, as without stacking), and a sum over axis 0 of the
        calls' values stacked is the sum over calls of their sums."""
        self.rows_by_shape = rows_by_shape
        self.node_by_name = {n.name: n for n in backward.node if n.name in weight_part}
        self.const_by_name = {n.name: n for n in backward.node if n.op == "Const"}
        self.rows, self.spec_of, self.handles = rows, spec_of, variable_handles
        self.step_constants = step_constants
        self.memo: dict[str, str | None] = {}
        self.row_shaped_free: set[str] = set()  # computed per call, stacked as row tensors

    def of(self, tensor: str) -> str | None:
        op = split_tensor_name(tensor)[0]
        if op in self.handles or op in self.const_by_name or tensor in self.step_constants:
            return FREE
        if op not in self.node_by_name:
            return ROW if self.has_rows(tensor) else None
        if op not in self.memo:
            self.memo[op] = None  # a cycle (none in a GraphDef) stays unknown
            kind = self._node_kind(self.node_by_name[op])
            if kind is None and self.rows_by_shape and self.has_rows(tensor):
                kind = ROW
            self.memo[op] = kind
        return self.memo[op]

    def has_rows(self, tensor: str) -> bool:
        shape = self.spec_of(tensor).shape
        return bool(shape.rank) and shape[0] == self.rows

    def _node_kind(self, node) -> str | None:
        op_def = compat.op_def(node.op)
        if op_def is None or (op_def.is_stateful and node.op != "ReadVariableOp"):
            return None
        inputs = [canonical_tensor_name(i) for i in node.input if not i.startswith("^")]
        kinds = [self.of(t) for t in inputs]
        if None in kinds:
            return None
        if all(k == FREE for k in kinds):
            return FREE
        if node.op == "MatMul":
            return self._matmul(node, kinds)
        if node.op in ("Sum", "BiasAddGrad"):
            return self._row_sum(node, inputs, kinds)
        if ROW_SUM in kinds:
            return self._linear_in_row_sums(node, kinds)
        if node.op in _ELEMENTWISE and self._broadcasts_along_rows(inputs, kinds):
            return ROW
        return None

    def _matmul(self, node, kinds) -> str | None:
        transpose_a, transpose_b = node.attr["transpose_a"].b, node.attr["transpose_b"].b
        if kinds == [ROW, ROW] and transpose_a and not transpose_b:
            return ROW_SUM  # contracts over the rows
        if kinds == [ROW, FREE] and not transpose_a:
            return ROW  # row by row
        return None

    def _row_sum(self, node, inputs, kinds) -> str | None:
        if kinds[0] != ROW:
            return None
        if node.op == "BiasAddGrad":
            return ROW_SUM  # sums every axis but the channels, axis 0 included
        axes = self._constant(inputs[1])
        if axes is None:
            return None
        rank = self.spec_of(inputs[0]).shape.rank
        return ROW_SUM if any(int(a) % rank == 0 for a in np.ravel(axes)) else ROW

    @staticmethod
    def _linear_in_row_sums(node, kinds) -> str | None:
        if node.op in _SUMS_OF_ROW_SUMS and all(k == ROW_SUM for k in kinds):
            return ROW_SUM
        if (
            node.op in _SCALED_ROW_SUM
            and kinds[0] == ROW_SUM
            and kinds[1] == FREE
            or node.op == "Mul"
            and kinds == [FREE, ROW_SUM]
        ):
            return ROW_SUM
        if (
            node.op in _RESHAPED_ROW_SUM
            and kinds[0] == ROW_SUM
            and all(k == FREE for k in kinds[1:])
        ):
            return ROW_SUM
        return None

    def _broadcasts_along_rows(self, inputs, kinds) -> bool:
        """Row tensors of equal rank; row-free tensors of lower rank or with axis 0 of size 1, so
        broadcasting pairs row r only with row r. A row-free tensor the weight part computes
        with the rank and rows of the row tensors is computed per call and stacked instead."""
        ranks = {self.spec_of(t).shape.rank for t, k in zip(inputs, kinds) if k == ROW}
        if len(ranks) != 1 or None in ranks:
            return False
        rank = ranks.pop()
        for t, k in zip(inputs, kinds):
            if k == FREE:
                shape = self.spec_of(t).shape
                op = split_tensor_name(t)[0]
                if shape.rank == rank and shape[0] == self.rows and op in self.node_by_name:
                    self.row_shaped_free.add(op)
                elif (
                    shape.rank is None
                    or shape.rank > rank
                    or (shape.rank == rank and shape[0] != 1)
                ):
                    return False
        return True

    def _constant(self, tensor: str):
        node = self.const_by_name.get(split_tensor_name(tensor)[0])
        return None if node is None else tf.make_ndarray(node.attr["value"].tensor)
