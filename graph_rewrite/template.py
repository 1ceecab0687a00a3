"""Template analysis: build the user's model once and describe it as plain data.

The template graph holds one placeholder per feature (shape [None] + per-example shape) and the
ops `model_fn` creates. Analysis only reads it: which layer every op of the loss's backward cone
belongs to, the tensors that cross layers, the variables each layer reads, and which tensors
depend on the batch. Passes read this data; none of them changes the template.

Layer rules (ARCHITECTURE.md): `layer_rule(layers)` turns the user's `layers=` argument into a
function from op name to layer name (or None). The default rule: the op's top-level name scope.
A regular expression (or a list of them) is matched with `re.fullmatch` against the scope paths
on the op's name, outermost first (`bert`, `bert/encoder`, `bert/encoder/layer_3`); the first
that matches is the layer. An op the rule gives no layer (a parent-scope reshape, an unscoped
op) joins the earliest layer among its consumers (the loss, if it has none, joins the last
layer). Feature placeholders and variable handles are inputs, not layer members. The profiler
(dapple_tf/profiler.py) assigns forward ops with `assign_layers` too, so plans name the layers
the rewriter finds.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import tensorflow as tf

from . import batch_norm, random_ops
from .random_ops import RANDOM_ROWS_FEATURE, RANDOM_ROWS_SPEC

v1 = tf.compat.v1

FEATURE_SCOPE = "dapple_features"
_VARIABLE_OPS = ("VarHandleOp",)
_REF_VARIABLE_OPS = ("VariableV2", "Variable")
# TF1 control flow (v1 while_loop / cond under tf.compat.v1.disable_control_flow_v2()): its
# frames live in Python-side contexts that a GraphDef does not keep, so the rewriter can neither
# differentiate an imported copy nor put it in a stage function.
V1_CONTROL_FLOW_OPS = frozenset(
    {
        "Enter",
        "RefEnter",
        "Exit",
        "RefExit",
        "Merge",
        "RefMerge",
        "Switch",
        "RefSwitch",
        "NextIteration",
        "RefNextIteration",
        "LoopCond",
    }
)


class TemplateError(ValueError):
    """The model cannot be used as a pipeline template (what is wrong, and where)."""


@dataclasses.dataclass(frozen=True)
class WeightedLoss:
    """A loss that is a weighted mean, `numerator / denominator`, e.g. masked LM's
    `sum(w * l) / sum(w)`: both are sums over the batch's rows, so the pipelined trainer sums
    each over all micro-batches and replicas and trains on their quotient, whatever M. The
    denominator must depend on the features only (not on variables): its gradient is not taken.
    A plain scalar loss is taken as a mean over the micro-batch's rows."""

    numerator: tf.Tensor
    denominator: tf.Tensor


# What `layers=` accepts: None (top-level name scopes), a regular expression over scope paths,
# a list of them, or a function from op name to layer name (None: no layer of its own).
LayerRule = Union[None, str, Sequence[str], Callable[[str], Union[str, None]]]


def layer_rule(layers: LayerRule = None) -> Callable[[str], str | None]:
    """The function op name -> layer name (or None) that `layers` describes (module doc)."""
    if layers is None:
        return top_level_scope
    if callable(layers):
        return layers
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TemplateError(
            f"layers must be a regular expression, a list of them or a function "
            f"op name -> layer name; got {layers!r}"
        )
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise TemplateError(f"layers: {e.pattern!r} is not a regular expression: {e}") from None

    def outermost_matching_scope(op_name: str) -> str | None:
        parts = op_name.split("/")
        for k in range(1, len(parts)):
            path = "/".join(parts[:k])
            if any(c.fullmatch(path) for c in compiled):
                return path
        return None

    return outermost_matching_scope


def top_level_scope(op_name: str) -> str | None:
    """The default layer rule: an op's top-level name scope (None for an unscoped op)."""
    return op_name.split("/", 1)[0] if "/" in op_name else None


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    name: str  # single-device variable name without ':0', e.g. 'layer_0/dense/kernel'
    shape: tuple[int, ...]
    dtype: tf.DType
    trainable: bool


@dataclasses.dataclass(frozen=True)
class Edge:
    """A tensor produced in one layer and consumed in another."""

    tensor: str
    producer: str
    consumer: str


@dataclasses.dataclass
class Template:
    graph: tf.Graph
    loss: str  # tensor name of the scalar loss
    features: dict[str, str]  # feature name -> placeholder tensor name
    feature_spec: dict[str, tuple[tuple[int, ...], tf.DType]]
    layers: tuple[str, ...]  # in order of first creation
    layer_of_op: dict[str, str]  # every op of the loss cone (inputs excluded)
    ops_of_layer: dict[str, tuple[str, ...]]  # in graph (topological) order
    variables: dict[str, VariableInfo]  # handle op name -> info, creation order
    variables_of_layer: dict[str, tuple[str, ...]]
    edges: tuple[Edge, ...]
    batch_tensors: frozenset[str]  # tensor names that depend on a feature
    # crossing batch tensors whose axis 0 is provably not the batch axis: with static batches of
    # PROBE_ROWS rows, shape inference gives them a first dimension that is not k x rows (their
    # shape with 7 rows)
    not_batch_major: dict[str, tuple] = dataclasses.field(default_factory=dict)
    # crossing batch tensors whose axis 0 is k x rows, k > 1 (flattened [batch * seq, ...]): k
    row_factor: dict[str, int] = dataclasses.field(default_factory=dict)
    variable_objects: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
    # WeightedLoss: `loss` is the numerator (a sum over rows), this the denominator's tensor
    loss_denominator: str | None = None
    # batch norm's UPDATE_OPS (graph_rewrite/batch_norm.py) and the statistics they read; the
    # variables they write (moving statistics) are in `variables`, in no layer's list
    moving_updates: tuple[batch_norm.MovingUpdate, ...] = ()
    statistics: dict[str, batch_norm.Statistic] = dataclasses.field(default_factory=dict)

    @property
    def graph_def(self):
        return self.graph.as_graph_def()

    def describe(self) -> str:
        lines = [
            f"template: {len(self.layers)} layers, {len(self.layer_of_op)} ops, "
            f"{len(self.variables)} variables, loss {self.loss}"
        ]
        for name in self.layers:
            lines.append(
                f"  {name}: {len(self.ops_of_layer[name])} ops, reads "
                f"{list(self.variables_of_layer[name])}"
            )
        return "\n".join(lines)


def build_template(
    model_fn: Callable[[dict[str, tf.Tensor]], tf.Tensor],
    feature_spec: Mapping[str, tuple[tuple[int, ...], Any]],
    seed: int | None = None,
    layers: LayerRule = None,
) -> Template:
    """Build `model_fn` in a fresh graph and analyse it with the layer rule `layers`."""
    graph, features, loss = build_model_graph(model_fn, feature_spec, seed)
    if RANDOM_ROWS_FEATURE in features:
        feature_spec = {**feature_spec, RANDOM_ROWS_FEATURE: RANDOM_ROWS_SPEC}
    if isinstance(loss, WeightedLoss):
        template = analyse(graph, features, loss.numerator, feature_spec, layers)
        template.loss_denominator = loss.denominator.name
        return template
    return analyse(graph, features, loss, feature_spec, layers)


def build_model_graph(model_fn, feature_spec, seed=None, graph=None):
    """Create the feature placeholders and call `model_fn` with resource variables; make its
    random ops stateless (graph_rewrite/random_ops.py). Returns (graph, {feature: placeholder},
    loss); the features include RANDOM_ROWS_FEATURE if the model has random ops. The
    single-device reference build uses this too, so the two builds create the same ops (same
    random numbers per row, same variable names)."""
    graph = graph or tf.Graph()
    with graph.as_default():
        if seed is not None:
            v1.set_random_seed(seed)
        features = {}
        with tf.name_scope(FEATURE_SCOPE + "/"):
            for name, (shape, dtype) in feature_spec.items():
                features[name] = v1.placeholder(tf.as_dtype(dtype), [None] + list(shape), name=name)
        with v1.variable_scope(v1.get_variable_scope(), use_resource=True):
            returned = model_fn(dict(features))
        _check_loss(returned, graph)
        loss = returned.numerator if isinstance(returned, WeightedLoss) else returned
        random = random_ops.random_ops_of(loss)
        if random:
            with tf.name_scope(FEATURE_SCOPE + "/"):
                rows_info = v1.placeholder(
                    RANDOM_ROWS_SPEC[1], [None, *RANDOM_ROWS_SPEC[0]], name=RANDOM_ROWS_FEATURE
                )
            random_ops.make_stateless(random, rows_info, list(features.values()), seed)
            features[RANDOM_ROWS_FEATURE] = rows_info
    return graph, features, returned


def _check_loss(loss, graph: tf.Graph) -> None:
    """A scalar tensor of `graph`, or a WeightedLoss of two whose denominator reads no
    variable."""
    parts = [loss.numerator, loss.denominator] if isinstance(loss, WeightedLoss) else [loss]
    for part in parts:
        if not isinstance(part, tf.Tensor) or part.graph is not graph:
            raise TemplateError(
                f"model_fn must return a scalar tf.Tensor of its graph or a "
                f"dapple_tf.WeightedLoss of two, got {loss!r}"
            )
        if part.shape.rank not in (0, None):
            raise TemplateError(
                f"model_fn must return a scalar loss (a mean over its rows, or "
                f"WeightedLoss(sum, sum)), got {part.name} of shape {part.shape}"
            )
    if isinstance(loss, WeightedLoss):
        reads = [
            op.name
            for op in graph.get_operations()
            if op.name in _backward_cone(loss.denominator.op)
            and op.type in ("ReadVariableOp", "VarHandleOp")
        ]
        if reads:
            raise TemplateError(
                f"the WeightedLoss denominator {loss.denominator.name} reads "
                f"variables ({reads[:3]}); it must depend on the features only"
            )


def _variable_info(op: tf.Operation, trainable) -> VariableInfo:
    """The VariableInfo of a resource variable's VarHandleOp; `trainable`: trainable names."""
    dims = op.get_attr("shape").dim
    return VariableInfo(
        op.name,
        tuple(d.size for d in dims),
        tf.as_dtype(op.get_attr("dtype")),
        op.name in trainable,
    )


def analyse(
    graph: tf.Graph,
    features: Mapping[str, tf.Tensor],
    loss: tf.Tensor,
    feature_spec,
    layers: LayerRule = None,
) -> Template:
    feature_ops = {t.op.name: name for name, t in features.items()}
    cone = _backward_cone(loss.op)
    ops = [op for op in graph.get_operations() if op.name in cone]  # creation = topological
    variable_objects = {
        v.handle.op.name: v
        for v in graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)
        if hasattr(v, "handle")
    }
    trainable = {
        v.handle.op.name
        for v in graph.get_collection(v1.GraphKeys.TRAINABLE_VARIABLES)
        if hasattr(v, "handle")
    }

    members = []
    variables: dict[str, VariableInfo] = {}
    for op in ops:
        if op.type in _REF_VARIABLE_OPS:
            raise TemplateError(
                f"variable '{op.name}' is a reference variable; build the model "
                f"with resource variables (tf.compat.v1.get_variable under "
                f"use_resource=True, which dapple builds model_fn under)"
            )
        if op.type in _VARIABLE_OPS:
            variables[op.name] = _variable_info(op, trainable)
        elif op.name in feature_ops:
            pass
        elif op.type == "Placeholder":
            raise TemplateError(
                f"the loss depends on placeholder '{op.name}' that is not a "
                f"feature; features are: {sorted(feature_ops.values())}"
            )
        else:
            members.append(op)
    if not members:
        raise TemplateError("model_fn's loss has no ops besides its inputs")

    layers, layer_of_op = assign_layers(
        members, loss.op, layer_rule(layers), explicit=layers is not None
    )
    _check_no_v1_control_flow(members, layer_of_op)
    ops_of_layer: dict[str, list[str]] = {name: [] for name in layers}
    for op in members:
        ops_of_layer[layer_of_op[op.name]].append(op.name)

    variables_of_layer: dict[str, dict[str, None]] = {name: {} for name in layers}
    edges: dict[tuple[str, str, str], None] = {}
    for op in members:
        for t in op.inputs:
            producer = t.op
            if producer.name in variables:
                variables_of_layer[layer_of_op[op.name]][producer.name] = None
            elif (
                producer.name in layer_of_op and layer_of_op[producer.name] != layer_of_op[op.name]
            ):
                edges[(t.name, layer_of_op[producer.name], layer_of_op[op.name])] = None

    batch_tensors = set(t.name for t in features.values())
    for op in members:
        if any(t.name in batch_tensors for t in op.inputs):
            batch_tensors.update(t.name for t in op.outputs)

    row_factor, not_batch_major = _probe_row_factors(
        graph, features, feature_spec, batch_tensors, {e[0] for e in edges}
    )
    moving_updates, statistics = _moving_updates(graph, features, batch_tensors, layer_of_op)
    for update in moving_updates:
        for name in update.reads:
            if name not in variables:
                variables[name] = _variable_info(graph.get_operation_by_name(name), trainable)
    return Template(
        moving_updates=moving_updates,
        statistics=statistics,
        not_batch_major=not_batch_major,
        row_factor=row_factor,
        graph=graph,
        loss=loss.name,
        features={n: t.name for n, t in features.items()},
        feature_spec={n: (tuple(s), tf.as_dtype(d)) for n, (s, d) in feature_spec.items()},
        layers=tuple(layers),
        layer_of_op=layer_of_op,
        ops_of_layer={n: tuple(o) for n, o in ops_of_layer.items()},
        variables=variables,
        variables_of_layer={n: tuple(v) for n, v in variables_of_layer.items()},
        edges=tuple(Edge(*e) for e in edges),
        batch_tensors=frozenset(batch_tensors),
        variable_objects={n: variable_objects[n] for n in variables if n in variable_objects},
    )


def _moving_updates(graph, features, batch_tensors, layer_of_op):
    """Batch norm's UPDATE_OPS as data (graph_rewrite/batch_norm.py); a TemplateError names
    what is not recognised, or a statistic no layer of the loss computes."""
    variable_ops = {op.name: op for op in graph.get_operations() if op.type in _VARIABLE_OPS}
    try:
        updates, statistics = batch_norm.recognise_updates(
            graph, {t.name for t in features.values()}, frozenset(batch_tensors), variable_ops
        )
    except batch_norm.UpdateError as e:
        raise TemplateError(f"{e} (see docs/tf1-models.md, Batch norm)") from None
    for update in updates:
        outside = [t for t in update.statistics if t.split(":")[0] not in layer_of_op]
        if outside:
            raise TemplateError(
                f"update {update.assign} of {update.variable} reads the statistics {outside}, "
                f"which the loss does not compute; the pipeline computes statistics only in "
                f"the forward of the loss"
            )
        layers = {layer_of_op[t.split(":")[0]] for t in update.statistics}
        if len(layers) > 1:
            raise TemplateError(
                f"update {update.assign} of {update.variable} reads statistics of several "
                f"layers {sorted(layers)}; one update must read one layer's statistics"
            )
    return updates, statistics


def _check_no_v1_control_flow(members: Sequence[tf.Operation], layer_of_op) -> None:
    found = [op for op in members if op.type in V1_CONTROL_FLOW_OPS]
    if found:
        examples = ", ".join(
            f"{op.name} ({op.type}, layer '{layer_of_op[op.name]}')" for op in found[:2]
        )
        raise TemplateError(
            f"the model uses TF1 control flow ({len(found)} ops such as {examples}): v1 "
            f"while_loop/cond frames cannot be split into pipeline stages. Build it with "
            f"control flow v2, TF 2's default: do not call "
            f"tf.compat.v1.disable_control_flow_v2() (or call "
            f"tf.compat.v1.enable_control_flow_v2() before building the trainer); "
            f"tf.compat.v1.while_loop and tf.compat.v1.cond then make While/If ops, which "
            f"train exactly"
        )


def initial_values(template: Template, session_config=None, names=None) -> dict[str, np.ndarray]:
    """Run the initializers of the template's variables (only those in `names` if given: a rank
    initialises only its own); values keyed by variable name. `session_config`: the ConfigProto
    of the session that runs them (the runtime passes its device pinning)."""
    wanted = [n for n in template.variables if names is None or n in names]
    objects = [template.variable_objects[n] for n in wanted if n in template.variable_objects]
    if len(objects) != len(wanted):
        missing = sorted(set(wanted) - set(template.variable_objects))
        raise TemplateError(
            f"variables {missing} have no tf.Variable object (not created with "
            f"tf.compat.v1.get_variable/tf.Variable?)"
        )
    with v1.Session(graph=template.graph, config=session_config) as sess:
        sess.run([v.initializer for v in objects])
        values = sess.run([v.value() for v in objects])
    return dict(zip(wanted, values))


PROBE_ROWS = (7, 11)


def _probe_row_factors(graph, features, feature_spec, batch_tensors, tensors):
    """Shape inference with static batches of 7 and 11 rows, for the batch tensors among
    `tensors`: (row factors, not batch major). A tensor whose first dimension is k x rows in
    both probes, k > 1 (a flattened [batch * seq, ...]), gets row factor k; one whose first
    dimension is known and is not a multiple k x rows of both (a scalar, a time-major tensor)
    is not batch major (its shape with 7 rows)."""
    tensors = sorted(t for t in tensors if t in batch_tensors)
    if not tensors:
        return {}, {}
    probed = [_static_shapes(graph, features, feature_spec, tensors, rows) for rows in PROBE_ROWS]
    if any(p is None for p in probed):  # shapes that do not infer with a static batch
        return {}, {}
    row_factor, not_batch_major = {}, {}
    for name, small, large in zip(tensors, *probed):
        if small.rank is None or (small.rank > 0 and small[0] is None):
            continue  # no proof either way
        factor = small[0] // PROBE_ROWS[0] if small.rank else 0
        if factor and small[0] == factor * PROBE_ROWS[0] and large[0] == factor * PROBE_ROWS[1]:
            if factor > 1:
                row_factor[name] = factor
        else:
            not_batch_major[name] = tuple(small.as_list())
    return row_factor, not_batch_major


def _static_shapes(graph, features, feature_spec, tensors, rows):
    """Static shapes of `tensors` in a copy of `graph` fed `rows`-row features (None if the
    copy does not build)."""
    probe = tf.Graph()
    with probe.as_default():
        input_map = {
            t.name: v1.placeholder(
                tf.as_dtype(feature_spec[n][1]), [rows] + list(feature_spec[n][0])
            )
            for n, t in features.items()
        }
        try:
            found = tf.graph_util.import_graph_def(
                graph.as_graph_def(),
                input_map=input_map,
                return_elements=list(tensors),
                name="probe",
            )
        except ValueError:
            return None
    return [t.shape for t in found]


# Ops whose output depends on their input's shape only.
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})


def shape_only_cone(template: Template, tensor: str) -> tuple[list[str], bool]:
    """(the shape ops `tensor` reads through, whether its value depends on the batch through
    those only): e.g. `tf.shape(x)[0] * seq` depends on x's shape, not on its values."""
    graph = template.graph
    shape_ops, seen = [], set()
    stack = [graph.get_tensor_by_name(tensor).op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type in _SHAPE_OPS:
            shape_ops.append(op.name)
            continue
        if (
            op.type in ("Placeholder", "VarHandleOp", "ReadVariableOp")
            or op.type in random_ops.STATEFUL_TYPES
        ):
            return shape_ops, False
        stack.extend(t.op for t in op.inputs)
    return shape_ops, True


def values_at_rows(template: Template, tensors: Sequence[str], rows: int) -> dict[str, np.ndarray]:
    """The values `tensors` (shape-only functions of the batch, see `shape_only_cone`) take when
    the batch has `rows` rows: their shape ops become constants of the shapes static inference
    gives with `rows`-row features, then the rest is evaluated."""
    cones = {t: shape_only_cone(template, t) for t in tensors}
    shape_ops = sorted({op for ops, _ in cones.values() for op in ops})
    graph = template.graph
    probe_inputs = [graph.get_operation_by_name(op).inputs for op in shape_ops]
    names = [t.name for inputs in probe_inputs for t in inputs]
    shapes = (
        _static_shapes(
            graph,
            {n: graph.get_tensor_by_name(t) for n, t in template.features.items()},
            template.feature_spec,
            names,
            rows,
        )
        or []
    )
    shape_of = dict(zip(names, shapes))
    constants = {}
    for op_name, inputs in zip(shape_ops, probe_inputs):
        op = graph.get_operation_by_name(op_name)
        known = [shape_of.get(t.name) for t in inputs]
        if any(s is None or not s.is_fully_defined() for s in known):
            raise TemplateError(
                f"{op_name} ({op.type}) has no static value with a batch of "
                f"{rows} rows (input shapes {known})"
            )
        dims = [s.as_list() for s in known]
        if op.type == "Rank":
            values = [len(dims[0])]
        elif op.type == "Size":
            values = [int(np.prod(dims[0]))]
        else:
            values = dims
        for k, value in enumerate(values):
            constants[f"{op_name}:{k}"] = np.asarray(value, op.outputs[k].dtype.as_numpy_dtype)
    evaluation = tf.Graph()
    with evaluation.as_default():
        found = tf.graph_util.import_graph_def(
            graph.as_graph_def(),
            input_map={t: tf.constant(v) for t, v in constants.items()},
            return_elements=list(tensors),
            name="",
        )
        with v1.Session(graph=evaluation) as session:
            values = session.run(found)
    return dict(zip(tensors, values))


def _backward_cone(loss_op: tf.Operation) -> set[str]:
    seen = {loss_op.name}
    stack = [loss_op]
    while stack:
        op = stack.pop()
        for t in op.inputs:
            if t.op.name not in seen:
                seen.add(t.op.name)
                stack.append(t.op)
    return seen


def assign_layers(
    members: Sequence[tf.Operation],
    loss_op: tf.Operation,
    rule: Callable[[str], str | None] = top_level_scope,
    explicit: bool = False,
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(layers in creation order, op name -> layer) for `members` (the loss cone's ops in
    creation order, inputs excluded). Ops the rule names: that layer. The others: the earliest
    layer among their consumers (walked in reverse creation order, so consumers are decided
    first), or the last layer. `explicit`: the rule is the user's, so matching nothing is an
    error (the default rule makes a model without scopes one layer)."""
    layer_of_op = {}
    for op in members:
        name = rule(op.name)
        if name is not None:
            layer_of_op[op.name] = name
    first_seen: dict[str, int] = {}
    for k, op in enumerate(members):
        if op.name in layer_of_op:
            first_seen.setdefault(layer_of_op[op.name], k)
    if not first_seen:
        if explicit:
            scopes = sorted({op.name.rsplit("/", 1)[0] for op in members if "/" in op.name})
            raise TemplateError(
                f"the layer rule matched no scope path of the model's ops; "
                f"scope paths are: {scopes[:20]}{' ...' if len(scopes) > 20 else ''}"
            )
        only = loss_op.name
        return (only,), {op.name: only for op in members}
    last_layer = max(first_seen, key=first_seen.get)
    for op in reversed(members):
        if op.name in layer_of_op:
            continue
        consumer_layers = [
            layer_of_op[c.name] for t in op.outputs for c in t.consumers() if c.name in layer_of_op
        ]
        if op is loss_op or not consumer_layers:
            layer_of_op[op.name] = last_layer
        else:
            layer_of_op[op.name] = min(consumer_layers, key=lambda n: first_seen.get(n, 1 << 62))
    return tuple(first_seen), layer_of_op
