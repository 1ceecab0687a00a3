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
from typing import Callable, Iterable, Mapping

from tensorflow.core.framework import graph_pb2

from .graphdefs import GradRef, canonical_tensor_name, split_tensor_name


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


@dataclasses.dataclass(frozen=True)
class WeightSplit:
    """A stage's backward cut in two for zero-bubble schedules: `I` runs the input graph (the
    input gradients, and the variable gradients that share nodes with them), `W` runs the
    weight graph later, on what `I` received and computed."""

    variables: tuple[str, ...]  # variables whose gradient the weight graph computes
    input_graph_def: graph_pb2.GraphDef  # the backward without the weight graph's own nodes
    weight_graph_def: graph_pb2.GraphDef  # the nodes only their gradients need (+ constants)
    weight_inputs: tuple[str, ...]  # what it reads from outside: backward inputs, input results
    input_results: tuple[str, ...]  # those of `weight_inputs` the input graph computes


def split_weight_gradients(
    graph_def: graph_pb2.GraphDef,
    input_grads: Iterable[str],
    variable_grads: Mapping[str, GradRef],
    can_pass: Callable[[str], bool] = lambda tensor: True,
) -> WeightSplit | None:
    """Split a backward GraphDef (its inputs are function arguments: no Placeholder or
    VarHandleOp nodes) so that every variable gradient the input gradients do not need is
    computed by a weight graph; no node is in both graphs but constants (copied). A tensor of
    the input graph that the weight graph reads becomes a result of the input graph where
    `can_pass(tensor)` (resource and variant tensors should not leave a call); a gradient that
    would read another stays in the input graph. None if no gradient moves."""
    input_grads = [canonical_tensor_name(t) for t in input_grads]
    tensors_of = {
        v: [canonical_tensor_name(t) for t in (r.dense, r.indices, r.values, r.dense_shape) if t]
        for v, r in variable_grads.items()
    }
    node_by_name = {n.name: n for n in graph_def.node}
    constant_nodes = {n.name for n in graph_def.node if n.op == "Const"}
    weight_part = split_backward(
        graph_def, input_grads, [t for ts in tensors_of.values() for t in ts]
    ).weight_part
    moved = [
        v for v, ts in tensors_of.items() if any(split_tensor_name(t)[0] in weight_part for t in ts)
    ]
    while moved:
        kept = [t for v, ts in tensors_of.items() if v not in moved for t in ts]
        input_nodes = data_ancestors(graph_def, input_grads + kept)
        own = data_ancestors(graph_def, [t for v in moved for t in tensors_of[v]]) - input_nodes
        weight_nodes = own | (_data_inputs(node_by_name, own) & constant_nodes)
        outside = [
            t
            for t in dict.fromkeys(
                canonical_tensor_name(i)
                for n in graph_def.node
                if n.name in weight_nodes
                for i in n.input
                if not i.startswith("^")
            )
            if split_tensor_name(t)[0] not in weight_nodes
        ]
        blocked = {
            t for t in outside if split_tensor_name(t)[0] in node_by_name and not can_pass(t)
        }
        if not blocked:
            break
        moved = [
            v
            for v in moved
            if not reads_any(
                graph_def, data_ancestors(graph_def, tensors_of[v], within=own), blocked
            )
        ]
    if not moved:
        return None
    return WeightSplit(
        variables=tuple(moved),
        input_graph_def=subgraph(
            graph_def, set(node_by_name) - with_data_descendants(graph_def, own)
        ),
        weight_graph_def=subgraph(graph_def, weight_nodes),
        weight_inputs=tuple(outside),
        input_results=tuple(t for t in outside if split_tensor_name(t)[0] in node_by_name),
    )


def _data_inputs(node_by_name, names: set[str]) -> set[str]:
    return {
        split_tensor_name(i)[0]
        for name in names
        for i in node_by_name[name].input
        if not i.startswith("^")
    }


def reads_any(graph_def: graph_pb2.GraphDef, names: set[str], tensors: set[str]) -> bool:
    """Whether a node of `graph_def` in `names` reads one of `tensors` through a data edge."""
    return any(
        canonical_tensor_name(i) in tensors
        for n in graph_def.node
        if n.name in names
        for i in n.input
        if not i.startswith("^")
    )


def with_data_descendants(graph_def: graph_pb2.GraphDef, names: set[str]) -> set[str]:
    """`names` and every node reading one of them through data edges (graph_def is in
    topological order). Those readers are needed by no other output (else the node they read
    would be), e.g. the unused gradient of a feature."""
    found = set(names)
    for node in graph_def.node:
        if any(split_tensor_name(i)[0] in found for i in node.input if not i.startswith("^")):
            found.add(node.name)
    return found


def subgraph(graph_def: graph_pb2.GraphDef, names: set[str]) -> graph_pb2.GraphDef:
    """The nodes of `graph_def` in `names`, in order, with its library and versions."""
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    if len(graph_def.library.function):
        out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in names:
            out.node.add().CopyFrom(node)
    return out
