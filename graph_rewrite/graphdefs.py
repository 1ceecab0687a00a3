"""GraphDef surgery shared by the passes: cut a set of nodes out of a GraphDef, turning every
tensor it reads from outside into a Placeholder (so `import_graph_def` can map it), and strip
device and colocation attributes (placement is decided by the rewriter, not the template)."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

_COLOCATION_ATTR = "_class"


@dataclasses.dataclass(frozen=True)
class GradRef:
    """Where a gradient is in a GraphDef: a dense tensor, or the parts of IndexedSlices."""

    dense: str | None = None
    indices: str | None = None
    values: str | None = None
    dense_shape: str | None = None

    @property
    def is_sparse(self) -> bool:
        return self.dense is None


@dataclasses.dataclass
class Subgraph:
    graph_def: graph_pb2.GraphDef
    # outside tensor name -> name of the placeholder tensor that stands for it in graph_def
    placeholder_of: dict[str, str]


def split_tensor_name(name: str) -> tuple[str, int]:
    if ":" in name:
        op, index = name.rsplit(":", 1)
        return op, int(index)
    return name, 0


def canonical_tensor_name(name: str) -> str:
    """'op' or 'op:k' -> 'op:k' (a NodeDef input may leave out output 0)."""
    op, index = split_tensor_name(name)
    return f"{op}:{index}"


def is_differentiable(dtype: tf.DType) -> bool:
    return dtype.is_floating or dtype.is_complex


def renamed_scopes(name: str, mapping: Mapping[str, str]) -> str:
    """`name` with each run of '/'-separated parts that is a key of `mapping` replaced (e.g. a
    layer name such as `bert/encoder/layer_3`; the longest key wins)."""
    parts = name.split("/")
    if all("/" not in key for key in mapping):
        return "/".join(mapping.get(part, part) for part in parts)
    keys = sorted((key.split("/") for key in mapping), key=len, reverse=True)
    out, k = [], 0
    while k < len(parts):
        for key in keys:
            if parts[k : k + len(key)] == key:
                out.append(mapping["/".join(key)])
                k += len(key)
                break
        else:
            out.append(parts[k])
            k += 1
    return "/".join(out)


def strip_placement(node: node_def_pb2.NodeDef) -> None:
    node.device = ""
    if _COLOCATION_ATTR in node.attr:
        del node.attr[_COLOCATION_ATTR]


def strip_library_placement(library) -> None:
    for function in library.function:
        for node in function.node_def:
            strip_placement(node)


def extract(
    nodes: Iterable[node_def_pb2.NodeDef],
    graph: tf.Graph,
    placeholder_prefix: str,
    keep_outside: Mapping[str, node_def_pb2.NodeDef] = (),
    library=None,
    static_rows: int | None = None,
    batch_tensors=frozenset(),
    row_factor: Mapping[str, int] | None = None,
) -> Subgraph:
    """A GraphDef of `nodes` (copied, placement stripped). Data inputs produced outside become
    Placeholders named `<placeholder_prefix>/<k>` (dtype and shape from `graph`), except inputs
    produced by a node in `keep_outside` (e.g. variable handles), which is copied in as-is.
    Control inputs from outside are dropped: callers order subgraphs with their own control
    dependencies."""
    out = graph_pb2.GraphDef()
    nodes = list(nodes)
    inside = {n.name for n in nodes}
    placeholder_of: dict[str, str] = {}
    copied_outside: set[str] = set()
    for source in nodes:
        node = out.node.add()
        node.CopyFrom(source)
        strip_placement(node)
        del node.input[:]
        for name in source.input:
            if name.startswith("^"):
                if name[1:] in inside:
                    node.input.append(name)
                continue
            op_name, index = split_tensor_name(name)
            if op_name in inside:
                node.input.append(name)
            elif op_name in keep_outside:
                if op_name not in copied_outside:
                    copied_outside.add(op_name)
                    kept = out.node.add()
                    kept.CopyFrom(keep_outside[op_name])
                    strip_placement(kept)
                node.input.append(name)
            else:
                tensor_name = f"{op_name}:{index}"
                if tensor_name not in placeholder_of:
                    like = graph.get_tensor_by_name(tensor_name)
                    shape = like.shape
                    if (
                        static_rows
                        and tensor_name in batch_tensors
                        and shape.rank
                        and shape[0] is None
                    ):
                        rows = static_rows * (row_factor or {}).get(tensor_name, 1)
                        shape = tf.TensorShape([rows]).concatenate(shape[1:])
                    placeholder_of[tensor_name] = _add_placeholder(
                        out, f"{placeholder_prefix}/{len(placeholder_of)}", like, shape
                    )
                node.input.append(placeholder_of[tensor_name])
    if library is not None:
        out.library.CopyFrom(library)
        strip_library_placement(out.library)
    out.versions.CopyFrom(graph.graph_def_versions)
    return Subgraph(out, placeholder_of)


def _add_placeholder(graph_def, name: str, like: tf.Tensor, shape=None) -> str:
    node = graph_def.node.add()
    node.name = name
    node.op = "Placeholder"
    node.attr["dtype"].type = like.dtype.as_datatype_enum
    node.attr["shape"].shape.CopyFrom((like.shape if shape is None else shape).as_proto())
    return f"{name}:0"


def positions(graph_def: graph_pb2.GraphDef):
    """A function: tensor or op name -> 'node position:output index' in `graph_def` (how
    `structure_key` wiring names a tensor)."""
    position = {n.name: k for k, n in enumerate(graph_def.node)}

    def where(name: str) -> str:
        op, index = split_tensor_name(name)
        return f"{position[op]}:{index}"

    return where


_VARIABLE_NAME_ATTRS = frozenset({"shared_name", "debug_name"})


def structure_key(graph_def: graph_pb2.GraphDef, wiring: Iterable[str]) -> bytes:
    """Equal for two GraphDefs iff they differ in node names only: every node's op, attributes
    (a variable handle's name attributes aside) and inputs by position, and `wiring` (caller
    facts about the graph, e.g. its outputs as 'node position:output index')."""
    where = positions(graph_def)
    key = graph_pb2.GraphDef()
    for source in graph_def.node:
        node = key.node.add()
        node.op = source.op
        for name, value in source.attr.items():
            if not (source.op == "VarHandleOp" and name in _VARIABLE_NAME_ATTRS):
                node.attr[name].CopyFrom(value)
        node.input.extend(
            ("^" if t.startswith("^") else "") + where(t.lstrip("^")) for t in source.input
        )
    node = key.node.add()
    node.op = "dapple_wiring"
    node.input.extend(wiring)
    return key.SerializeToString(deterministic=True)
