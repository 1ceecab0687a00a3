"""Stage functions: a stage's forward or backward GraphDef as a FunctionDef, called once per clone.

A clone is one `StatefulPartitionedCall` op (named `dapple/mb<i>/s<s>r<k>/fwd` or `.../bwd`)
instead of a copy of every op of the stage, so the training graph has a few ops per
(micro-batch, slot) and rewriting time does not grow with the number of micro-batches times the
stage size. When a session builds its executable graph, TensorFlow inlines the calls: the nodes
that run are named `<call op>/<template op>` and are placed on the call's device, so step stats,
placement and the timeline see the same per-op picture as with copied ops.

The conversion works on protos only (no Python op per node): every node input `op:k` becomes
the FunctionDef form `op:<output arg>:<index within arg>`, read from the op's OpDef (or, for a
call to a library function, the function's signature).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, function_pb2, graph_pb2

from dapple_tf import compat

from .graphdefs import canonical_tensor_name, split_tensor_name

ARG_PREFIX = "dapple_arg_"
RESULT_PREFIX = "dapple_result_"


def function_def(
    graph_def: graph_pb2.GraphDef,
    name: str,
    inputs: Sequence[tuple[str, tf.DType]],
    outputs: Sequence[tuple[str, tf.DType]],
) -> function_pb2.FunctionDef:
    """The nodes of `graph_def` as function `name`. `inputs`: (tensor name, dtype) of each
    argument, tensors that nodes of `graph_def` read but that no node of it produces (their
    Placeholder or VarHandleOp must not be in `graph_def`). `outputs`: (tensor name, dtype) of
    each result, produced by a node of `graph_def` or one of the inputs."""
    fdef = function_pb2.FunctionDef()
    fdef.signature.name = name
    arg_of = {}
    for k, (tensor, dtype) in enumerate(inputs):
        arg = fdef.signature.input_arg.add()
        arg.name = f"{ARG_PREFIX}{k}"
        arg.type = tf.as_dtype(dtype).as_datatype_enum
        arg_of[canonical_tensor_name(tensor)] = arg.name
    signatures = {f.signature.name: f.signature for f in graph_def.library.function}
    names = {node.name for node in graph_def.node}
    output_args = {}
    stateful = False
    for source in graph_def.node:
        op_def = signatures.get(source.op) or compat.op_def(source.op)
        if op_def is None:
            raise ValueError(f"node {source.name!r}: unknown op type {source.op!r}")
        stateful |= op_def.is_stateful
        output_args[source.name] = _output_arg_ranges(source, op_def)
    for source in graph_def.node:
        node = fdef.node_def.add()
        node.CopyFrom(source)
        del node.input[:]
        for tensor in source.input:
            if tensor.startswith("^"):
                if tensor[1:] in names:
                    node.input.append(tensor)
                continue
            node.input.append(_reference(tensor, arg_of, output_args))
    for k, (tensor, dtype) in enumerate(outputs):
        arg = fdef.signature.output_arg.add()
        arg.name = f"{RESULT_PREFIX}{k}"
        arg.type = tf.as_dtype(dtype).as_datatype_enum
        fdef.ret[arg.name] = _reference(tensor, arg_of, output_args)
    # A control edge from a (Stateful)PartitionedCall waits for the function's control outputs
    # once the call is inlined, not for its results: make every node producing a result one,
    # so "the call ended" means "its results exist" (the schedule's end ops rely on it).
    for producer in dict.fromkeys(split_tensor_name(t)[0] for t, _ in outputs):
        if producer in names:
            fdef.signature.control_output.append(producer)
            fdef.control_ret[producer] = producer
    fdef.signature.is_stateful = stateful
    return fdef


def register(graph: tf.Graph, functions: Iterable[function_pb2.FunctionDef]) -> None:
    """Add FunctionDefs to `graph`'s library (public API: a GraphDef with only a library)."""
    library = graph_pb2.GraphDef()
    seen = set()
    for fdef in functions:
        if fdef.signature.name not in seen:
            seen.add(fdef.signature.name)
            library.library.function.add().CopyFrom(fdef)
    with graph.as_default():
        tf.graph_util.import_graph_def(library, name="")


def call(
    function_name: str,
    args: Sequence[tf.Tensor],
    specs: Sequence[tf.TensorSpec],
    name: str,
    unshaped: frozenset[int] = frozenset(),
) -> tf.Operation:
    """One call op of a registered function (its results are `.outputs`); results get the
    static shapes of `specs`, except those at the indices in `unshaped` (results only another
    call reads need none).

    The op carries `_disable_call_shape_inference` (as TF's own `Defun` call ops do): without it,
    adding the op to the graph re-runs shape inference over the whole function body, which was
    most of the cost of a call op; the result shapes are known from `specs` instead."""
    graph = tf.compat.v1.get_default_graph()
    op = graph.create_op(
        "StatefulPartitionedCall",
        list(args),
        [s.dtype for s in specs],
        name=name,
        attrs={
            "Tin": _type_list([a.dtype for a in args]),
            "Tout": _type_list([s.dtype for s in specs]),
            "f": attr_value_pb2.AttrValue(func=attr_value_pb2.NameAttrList(name=function_name)),
            "_disable_call_shape_inference": attr_value_pb2.AttrValue(b=True),
        },
    )
    for k, (tensor, spec) in enumerate(zip(op.outputs, specs)):
        if k not in unshaped:
            tensor.set_shape(spec.shape)
    return op


def _type_list(dtypes: Sequence[tf.DType]) -> attr_value_pb2.AttrValue:
    return attr_value_pb2.AttrValue(
        list=attr_value_pb2.AttrValue.ListValue(type=[d.as_datatype_enum for d in dtypes])
    )


_VALID_NAME = re.compile(r"[^A-Za-z0-9_]")


def function_name(*parts: str) -> str:
    """A function name made of `parts` (FunctionDef names allow letters, digits, '_')."""
    return "_".join(_VALID_NAME.sub("_", p) for p in parts)


def _reference(tensor: str, arg_of: dict[str, str], output_args: dict) -> str:
    key = canonical_tensor_name(tensor)
    if key in arg_of:
        return arg_of[key]
    op, index = split_tensor_name(key)
    if op not in output_args:
        raise ValueError(f"tensor {tensor!r} is neither a function input nor produced by a node")
    for arg_name, start, count in output_args[op]:
        if start <= index < start + count:
            return f"{op}:{arg_name}:{index - start}"
    raise ValueError(
        f"tensor {tensor!r}: its op has only {sum(c for _, _, c in output_args[op])} outputs"
    )


def _output_arg_ranges(node, op_def) -> list[tuple[str, int, int]]:
    """(output arg name, first flat output index, number of outputs) for each output arg."""
    ranges, start = [], 0
    for arg in op_def.output_arg:
        if arg.number_attr:
            count = node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            count = len(node.attr[arg.type_list_attr].list.type)
        else:
            count = 1
        ranges.append((arg.name, start, count))
        start += count
    return ranges
