"""Split a stage's backward into the part its input gradients need and the weight-gradient part.

`split_backward` partitions the nodes of a backward GraphDef (no recomputation: every node lands
in exactly one part): the *input part* is every node the input gradients (the gradients sent to
earlier stages) read, directly or not, through data edges; the *weight part* is every other node
a variable gradient reads. Control edges are not followed: `tf.gradients` groups an op's
gradients under control dependencies (`.../tuple/control_dependency`), which would otherwise make
every input gradient wait for its op's weight gradient. Zero-bubble schedules (ZB-H1's `I` and
`W` actions) and stacked weight gradients (graph_rewrite/stacked_gradients.py) both start here.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from tensorflow.core.framework import graph_pb2

from .graphdefs import split_tensor_name


@dataclasses.dataclass(frozen=True)
class BackwardSplit:
    input_part: frozenset[str]  # node names the input gradients read (data edges)
    weight_part: frozenset[str]  # node names only variable gradients read


def data_ancestors(
    graph_def: graph_pb2.GraphDef, tensors: Iterable[str], within: set[str] | None = None
) -> set[str]:
    """Names of the nodes of `graph_def` that produce `tensors` or that those read through data
    edges (control inputs are not followed); only nodes in `within` if given."""
    node_by_name = {n.name: n for n in graph_def.node}
    if within is not None:
        node_by_name = {name: n for name, n in node_by_name.items() if name in within}
    found: set[str] = set()
    stack = [split_tensor_name(t)[0] for t in tensors]
    while stack:
        name = stack.pop()
        if name in found or name not in node_by_name:
            continue
        found.add(name)
        stack.extend(
            split_tensor_name(i)[0] for i in node_by_name[name].input if not i.startswith("^")
        )
    return found


def split_backward(
    graph_def: graph_pb2.GraphDef, input_grads: Iterable[str], variable_grads: Iterable[str]
) -> BackwardSplit:
    """Partition the backward's nodes: those `input_grads` (tensor names) need, and those only
    `variable_grads` (tensor names) need. Nodes neither needs (grouping NoOps) are in neither."""
    input_part = data_ancestors(graph_def, input_grads)
    weight_part = data_ancestors(graph_def, variable_grads) - input_part
    return BackwardSplit(frozenset(input_part), frozenset(weight_part))
