"""A stage's gradient graph assembled layer by layer: `tf.gradients` once per distinct layer.

Transformer-like models repeat one block many times, and `tf.gradients` (Python, several ops
per forward op) was the largest cost of rewriting them. Here the stage's forward part (a
GraphDef, see stage_graph.py) is imported into a scratch graph and backpropagated one layer at
a time, last layer first:

* the gradient arriving at each tensor is the sum of what its consumers sent (the stage's
  grad_ys placeholders, the loss seed, and the input gradients of later layers), summed the way
  `tf.gradients` sums (graph_rewrite/accumulate.py `sum_gradients`);
* a layer's gradient ops come from `tf.gradients` run once per layer *structure* (same ops,
  attributes, wiring, inputs, and which outputs carry a gradient) in a graph holding only that
  layer, exported as a GraphDef and imported for every layer of that structure with its
  forward tensors, inputs and incoming gradients mapped in (`import_graph_def`'s `input_map`).

The result has the same form as the stage-level `tf.gradients` call it replaces: forward nodes
plus gradient nodes in one scratch graph, and where each gradient is. `differentiate_by_layers`
returns None when the stage needs the stage-level call instead: a layer whose gradient
construction changes its forward ops (while loops and function calls, whose gradient adds
outputs to the forward op), a layer reading a tensor produced by a later layer, or a resource
tensor passed between layers other than a variable handle.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from . import graphdefs
from .accumulate import scope_name, sum_gradients

v1 = tf.compat.v1

LAYER_INPUT_PREFIX = "dapple_layer_in"
LAYER_GRAD_PREFIX = "dapple_layer_grad_in"
SUM_SCOPE = "dapple_grad_sum"
_INPUT_OPS = frozenset({"Placeholder", "VarHandleOp"})


@dataclasses.dataclass
class _LayerGradient:
    """The gradient ops of one layer structure, as differentiated for layer `layer`."""

    layer: str
    forward: graph_pb2.GraphDef  # the layer's forward part (names of `layer`)
    gradient: graph_pb2.GraphDef  # only the gradient nodes
    outside: tuple[str, ...]  # tensors the gradient nodes read from outside them
    grads: tuple[graphdefs.GradRef | None, ...]  # per x: float inputs, then variable handles


class LayerGradientCache:
    """Gradient GraphDefs by layer structure, shared by the stages of one rewrite."""

    def __init__(self):
        self._by_key: dict[bytes, _LayerGradient] = {}

    def get(self, key: bytes, build: Callable[[], _LayerGradient | None]):
        if key not in self._by_key:
            built = build()
            if built is None:
                return None
            self._by_key[key] = built
        return self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)


def differentiate_by_layers(
    scratch: tf.Graph,
    forward: graph_pb2.GraphDef,
    layer_of_op: dict[str, str],
    layers: tuple[str, ...],
    seeds: list[tuple[str, tf.Tensor]],
    xs: list[str],
    cache: LayerGradientCache,
):
    """Backpropagate the stage's forward part `forward`, imported in `scratch`, layer by layer.

    seeds: (forward tensor name, its incoming gradient) (grad_ys placeholders, the loss seed).
    xs: the float input placeholders whose gradients are wanted. Returns (x -> gradient,
    VarHandleOp name -> gradient), None where there is none, with the gradient ops added to
    `scratch`; or None if this stage needs the stage-level `tf.gradients` (then `scratch` may
    hold unused ops: build a fresh one)."""
    node_layer = {
        n.name: None if n.op in _INPUT_OPS else layer_of_op.get(n.name) for n in forward.node
    }
    if any(
        layer is None and forward_node.op not in _INPUT_OPS
        for forward_node, layer in zip(forward.node, node_layer.values())
    ):
        return None  # an op outside every layer
    layer_index = {layer: k for k, layer in enumerate(layers)}
    handles = {n.name: n for n in forward.node if n.op == "VarHandleOp"}
    position = {n.name: k for k, n in enumerate(forward.node)}
    nodes_of_layer = collections.defaultdict(list)
    for node in forward.node:
        nodes_of_layer[node_layer[node.name]].append(node)
    library = forward.library if len(forward.library.function) else None
    incoming = collections.defaultdict(list)  # tensor -> gradients its consumers sent
    for tensor, seed in seeds:
        incoming[graphdefs.canonical_tensor_name(tensor)].append(seed)
    variable_parts = collections.defaultdict(list)
    x_set = set(xs)
    with scratch.as_default():
        for layer in reversed(layers):
            names = {n.name for n in nodes_of_layer[layer]}
            ys = [
                t
                for t in incoming
                if graphdefs.split_tensor_name(t)[0] in names
                and graphdefs.is_differentiable(scratch.get_tensor_by_name(t).dtype)
            ]
            if not ys:
                continue
            ys.sort(key=lambda t: (position[graphdefs.split_tensor_name(t)[0]], t))
            part = graphdefs.extract(
                nodes_of_layer[layer],
                scratch,
                LAYER_INPUT_PREFIX,
                keep_outside=handles,
                library=library,
            )
            layer_xs = []
            for tensor in part.placeholder_of:
                producer = node_layer.get(graphdefs.split_tensor_name(tensor)[0])
                dtype = scratch.get_tensor_by_name(tensor).dtype
                if producer is not None and layer_index[producer] > layer_index[layer]:
                    return None  # reads a later layer: not a chain of layers
                if dtype == tf.resource:
                    return None  # a resource passed between layers, not a variable handle
                if graphdefs.is_differentiable(dtype) and (producer is not None or tensor in x_set):
                    layer_xs.append(tensor)
            variables = [n.name for n in part.graph_def.node if n.op == "VarHandleOp"]
            where = graphdefs.positions(part.graph_def)
            x_placeholders = [part.placeholder_of[t] for t in layer_xs]
            key = graphdefs.structure_key(
                part.graph_def,
                [
                    *(where(t) for t in ys),
                    "ys",
                    *(where(p) for p in x_placeholders),
                    "xs",
                    *(where(v) for v in variables),
                ],
            )
            layer_grad = cache.get(
                key,
                lambda: _differentiate_layer(layer, part.graph_def, ys, x_placeholders, variables),
            )
            if layer_grad is None:
                return None
            grad_ys = [
                _as_tensor(sum_gradients(incoming.pop(t), f"{SUM_SCOPE}/{scope_name(t)}"))
                for t in ys
            ]
            grads = _import_layer_gradient(layer_grad, layer, part, grad_ys)
            for tensor, grad in zip(layer_xs + variables, grads):
                if grad is not None:
                    (
                        incoming[tensor]
                        if tensor in part.placeholder_of
                        else variable_parts[tensor]
                    ).append(grad)
        input_grads = {
            x: sum_gradients(incoming.get(x, []), f"{SUM_SCOPE}/{scope_name(x)}") for x in xs
        }
        variable_grads = {
            v: sum_gradients(variable_parts.get(v, []), f"{SUM_SCOPE}/{scope_name(v)}")
            for v in handles
        }
    return input_grads, variable_grads


def _differentiate_layer(
    layer: str,
    forward: graph_pb2.GraphDef,
    ys: list[str],
    x_placeholders: list[str],
    variables: list[str],
) -> _LayerGradient | None:
    """`tf.gradients` of the layer's ys (grad_ys: placeholders) w.r.t. its float inputs and
    variable handles, in a graph holding only the layer."""
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(forward, name="")
        y_tensors = [graph.get_tensor_by_name(t) for t in ys]
        grad_ys = [
            v1.placeholder(y.dtype, y.shape, name=f"{LAYER_GRAD_PREFIX}/{k}")
            for k, y in enumerate(y_tensors)
        ]
        xs = [graph.get_tensor_by_name(t) for t in x_placeholders] + [
            graph.get_tensor_by_name(f"{v}:0") for v in variables
        ]
        grads = tf.gradients(y_tensors, xs, grad_ys)
        refs = []
        for g in grads:
            if g is None:
                refs.append(None)
            elif isinstance(g, tf.IndexedSlices):
                refs.append(
                    graphdefs.GradRef(
                        indices=g.indices.name,
                        values=g.values.name,
                        dense_shape=None if g.dense_shape is None else g.dense_shape.name,
                    )
                )
            else:
                refs.append(graphdefs.GradRef(dense=g.name))
    result = graph.as_graph_def()
    before = {n.name: n for n in forward.node}
    if any(n.name in before and not _same_node(n, before[n.name]) for n in result.node):
        return None  # the gradient rewrote forward ops (while loops, function calls)
    if len(result.library.function) != len(forward.library.function):
        return None
    gradient = graph_pb2.GraphDef()
    gradient.versions.CopyFrom(result.versions)
    inside = set()
    for node in result.node:
        if node.name not in before and not node.name.startswith(LAYER_GRAD_PREFIX + "/"):
            gradient.node.add().CopyFrom(node)
            inside.add(node.name)
    outside = []
    for node in gradient.node:
        kept = []
        for name in node.input:
            op = graphdefs.split_tensor_name(name.lstrip("^"))[0]
            if op in inside:
                kept.append(name)
            elif not name.startswith("^"):
                kept.append(name)
                outside.append(graphdefs.canonical_tensor_name(name))
            # a control input on a forward op orders nothing the gradient needs: dropped
        del node.input[:]
        node.input.extend(kept)
        graphdefs.strip_placement(node)
    return _LayerGradient(layer, forward, gradient, tuple(dict.fromkeys(outside)), tuple(refs))


def _import_layer_gradient(
    layer_grad: _LayerGradient, layer: str, part: graphdefs.Subgraph, grad_ys: list[tf.Tensor]
) -> list:
    """Import the layer structure's gradient ops for `layer` into the default (scratch) graph;
    returns its gradients, one per x of the structure (None where there is none)."""
    graph = tf.compat.v1.get_default_graph()
    own_name = {a.name: b.name for a, b in zip(layer_grad.forward.node, part.graph_def.node)}
    own_tensor_of_placeholder = {ph: t for t, ph in part.placeholder_of.items()}

    def outside(name: str) -> tf.Tensor:
        """This layer's tensor for a tensor outside the gradient ops: an incoming gradient, an
        input or a forward tensor of the layer."""
        op, index = graphdefs.split_tensor_name(name)
        if op.startswith(LAYER_GRAD_PREFIX + "/"):
            return grad_ys[int(op.rsplit("/", 1)[1])]
        if op.startswith(LAYER_INPUT_PREFIX + "/"):
            return graph.get_tensor_by_name(own_tensor_of_placeholder[f"{op}:{index}"])
        return graph.get_tensor_by_name(f"{own_name[op]}:{index}")

    gradient = layer_grad.gradient
    if layer != layer_grad.layer:
        gradient = _with_layer_renamed(gradient, layer_grad.layer, layer)
    new_name = {a.name: b.name for a, b in zip(layer_grad.gradient.node, gradient.node)}
    wanted = [
        graphdefs.canonical_tensor_name(part)
        for g in layer_grad.grads
        if g is not None
        for part in (g.dense, g.indices, g.values, g.dense_shape)
        if part
    ]
    # a gradient may be an outside tensor itself (an Identity passes its incoming gradient on)
    made = [t for t in wanted if graphdefs.split_tensor_name(t)[0] in new_name]
    imported = tf.graph_util.import_graph_def(
        gradient,
        input_map={name: outside(name) for name in layer_grad.outside},
        return_elements=[
            f"{new_name[op]}:{index}" for op, index in map(graphdefs.split_tensor_name, made)
        ],
        name="",
    )
    returned = dict(zip(made, imported))
    returned.update((t, outside(t)) for t in wanted if t not in returned)
    grads = []
    for g in layer_grad.grads:
        if g is None:
            grads.append(None)
        elif g.dense:
            grads.append(returned[graphdefs.canonical_tensor_name(g.dense)])
        else:
            parts = [
                returned[graphdefs.canonical_tensor_name(p)] if p else None
                for p in (g.values, g.indices, g.dense_shape)
            ]
            grads.append(tf.IndexedSlices(*parts))
    return grads


def _with_layer_renamed(gradient: graph_pb2.GraphDef, old: str, new: str) -> graph_pb2.GraphDef:
    """A copy whose gradient node names (`gradients/<old>/...`) name layer `new` instead, so
    traces show the layer each gradient op belongs to; inputs from outside keep their names
    (`input_map` keys)."""
    inside = {n.name for n in gradient.node}
    layer_map = {old: new}
    if len({graphdefs.renamed_scopes(name, layer_map) for name in inside}) != len(inside):
        return gradient  # the new names would clash: keep the first layer's
    renamed = graph_pb2.GraphDef()
    renamed.CopyFrom(gradient)
    for node in renamed.node:
        node.name = graphdefs.renamed_scopes(node.name, layer_map)
        inputs = []
        for name in node.input:
            op = graphdefs.split_tensor_name(name.lstrip("^"))[0]
            inputs.append(graphdefs.renamed_scopes(name, layer_map) if op in inside else name)
        del node.input[:]
        node.input.extend(inputs)
    return renamed


def _same_node(a, b) -> bool:
    """Equal up to the spelling of inputs ('op' and 'op:0' are the same tensor)."""

    def canonical(names):
        return [n if n.startswith("^") else graphdefs.canonical_tensor_name(n) for n in names]

    return a.op == b.op and a.attr == b.attr and canonical(a.input) == canonical(b.input)


def _as_tensor(grad):
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad
