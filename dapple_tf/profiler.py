"""Profiler: measure each layer of a template graph on one device (ARCHITECTURE.md, step 2).

The template is `model_fn` built once, in a fresh `tf.compat.v1` graph, on placeholders of shape
`[batch_size] + per_example_shape`, plus `tf.compat.v1.gradients(loss, trainable variables)`.
It is run for a few warm-up steps and then several steps with `FULL_TRACE`; the `RunMetadata`
step stats give each op's time, which is charged to the op's layer:

* forward ops the loss depends on get their layer from `graph_rewrite.template.assign_layers`
  with the same layer rule (`layers=`: default top-level name scopes, or a regular expression
  over scope paths), so plans name the layers the rewriter finds;
* any other forward op (placeholders, variable handles, initializers) joins the layer of its
  nearest consumer (or, with no consumer in a layer, of its nearest producer);
* backward ops are exactly the ops `tf.compat.v1.gradients` created. `gradients/<op>_grad/...`
  belongs to the layer of forward op `<op>`; the rest (`gradients/AddN`, `gradients/grad_ys_0`)
  join the layer of their nearest backward consumer, then producer.

Sizes are computed, not measured: a layer's activation bytes are the bytes of the tensors it
produces that forward ops of other layers consume (what crosses a stage cut after it), its
parameter bytes those of the trainable variables it owns. Times are the median over the measured
steps of the summed op times per layer.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from graph_rewrite.template import LayerRule, TemplateError, WeightedLoss, assign_layers, layer_rule
from planner.profile import LayerCost, Profile, ProfileError

from .devices import new_session

v1 = tf.compat.v1

FeatureSpec = Mapping[str, tuple[Sequence[int], tf.DType]]
ModelFn = Callable[[dict[str, tf.Tensor]], tf.Tensor]
BatchFn = Callable[[int, np.random.Generator], dict[str, np.ndarray]]

# Ops whose outputs are variables or reads of them: variables are shared by stages, never sent.
_VARIABLE_OP_TYPES = frozenset({"VarHandleOp", "VariableV2", "Variable", "ReadVariableOp"})
# Ops that are inputs of the template, not members of a layer; they do not make a scope a layer.
_INPUT_OP_TYPES = frozenset({"VarHandleOp", "VariableV2", "Variable", "Placeholder"})


# ---- the template graph ------------------------------------------------------------------------
@dataclasses.dataclass
class Template:
    """The template graph of one batch: placeholders, loss, gradients and what is backward."""

    graph: tf.Graph
    placeholders: dict[str, tf.Tensor]
    loss: tf.Tensor
    variables: list[tf.Variable]
    gradients: list[tf.Tensor]  # one per variable with a gradient, in `variables` order
    forward_ops: list[tf.Operation]  # ops model_fn created, in creation order
    backward_ops: list[tf.Operation]  # ops tf.compat.v1.gradients created, in creation order


def _placeholder_name(key: str) -> str:
    # Placeholders sit outside every scope so they join their first consumer's layer.
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", key) or "feature"


def build_template(
    model_fn: ModelFn,
    feature_spec: FeatureSpec,
    batch_size: int,
    *,
    device: str | None = None,
    seed: int = 0,
) -> Template:
    """Builds model_fn and its gradients in a fresh graph, all on `device` (default placement)."""
    if batch_size < 1:
        raise ProfileError(f"profile batch size must be >= 1, found {batch_size}")
    graph = tf.Graph()
    with graph.as_default(), graph.device(device):
        v1.set_random_seed(seed)
        placeholders = {
            key: v1.placeholder(
                tf.as_dtype(dtype), [batch_size, *shape], name=_placeholder_name(key)
            )
            for key, (shape, dtype) in feature_spec.items()
        }
        with v1.variable_scope(v1.get_variable_scope(), use_resource=True):
            loss = model_fn(dict(placeholders))
        if isinstance(loss, WeightedLoss):
            loss = tf.math.divide(loss.numerator, loss.denominator)
        if not isinstance(loss, tf.Tensor) or loss.shape.rank not in (0, None):
            raise ProfileError(f"model_fn must return a scalar loss tensor, found {loss!r}")
        num_forward_ops = len(graph.get_operations())
        candidates = v1.trainable_variables()
        grads = v1.gradients(loss, candidates)
    ops = graph.get_operations()
    pairs = [(v, g) for v, g in zip(candidates, grads) if g is not None]
    if not pairs:
        raise ProfileError("model_fn's loss depends on no trainable variable; nothing to profile")
    return Template(
        graph,
        placeholders,
        loss,
        [v for v, _ in pairs],
        [g for _, g in pairs],
        ops[:num_forward_ops],
        ops[num_forward_ops:],
    )


# ---- layers: which op belongs where ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerMap:
    """Layer names in order, and the layer index of each op of the template (forward, backward)."""

    names: tuple[str, ...]
    forward_layer: Mapping[str, int]  # forward op name -> layer index
    backward_layer: Mapping[str, int]  # backward op name -> layer index
    gradient_scope: str  # first name component of the backward ops ("gradients")

    def layer_of_node(self, node_name: str) -> tuple[int, bool] | None:
        """(layer, is_backward) of an executed node, also for names Grappler made up; else None.

        Grappler keeps the scope of the op it rewrites (`loss/ArithmeticOptimizer/...`), so an
        unknown name is placed by its first component: the gradient scope or a layer scope.
        """
        for candidate in (node_name, *_grappler_originals(node_name)):
            if candidate in self.forward_layer:
                return self.forward_layer[candidate], False
            if candidate in self.backward_layer:
                return self.backward_layer[candidate], True
        parts = node_name.split("/")
        if _GRAPPLER_COMPONENT.match(parts[0]) and len(parts) > 1:
            # `ConstantFolding/<op name>-folded-0`, `.../ShapeN-matshapes-1`: a node made from <op>.
            return self.layer_of_node("/".join(parts[1:]).split("-", 1)[0])
        if parts[0] == self.gradient_scope and len(parts) > 1:
            layer = _layer_of_gradient_name(parts[1:], self.forward_layer, self.names)
            return None if layer is None else (layer, True)
        layer = _layer_of_scope_path(parts[:-1], self.names)
        return None if layer is None else (layer, False)


# Grappler names a rewritten node `<scope>/<Optimizer>/<Rewrite>_<...>_<original base name>`.
_GRAPPLER_COMPONENT = re.compile(r"^[A-Z][A-Za-z]*(Optimizer|Folding|Remapper)$")


def _grappler_originals(node_name: str) -> list[str]:
    """Names the node may have had before Grappler rewrote it, most specific first."""
    parts = node_name.split("/")
    for i, part in enumerate(parts[:-1]):
        if _GRAPPLER_COMPONENT.match(part):
            scope, rest = parts[:i], parts[i + 1 :]
            words = rest[0].split("_")
            return [
                "/".join([*scope, "_".join(words[k:]), *rest[1:]]) for k in range(1, len(words))
            ]
    return []


def _ancestors(tensor: tf.Tensor) -> set[tf.Operation]:
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        if op in seen:
            continue
        seen.add(op)
        todo.extend(t.op for t in op.inputs)
    return seen


def _layer_of_scope_path(scopes: Sequence[str], names: Sequence[str]) -> int | None:
    """The layer named by the outermost path of `scopes` (a name's components) that is one."""
    for k in range(1, len(scopes) + 1):
        path = "/".join(scopes[:k])
        if path in names:
            return list(names).index(path)
    return None


def _nearest(
    start: tf.Operation,
    known: Mapping[str, int],
    allowed: set[str],
    step: Callable[[tf.Operation], Iterable[tf.Operation]],
    pick,
) -> int | None:
    """Breadth-first along `step` from `start` through `allowed` ops; `pick` of the layers of the
    nearest ops that have one (the first level holding any)."""
    frontier, seen = [start], {start.name}
    while frontier:
        following = []
        for op in frontier:
            for nxt in step(op):
                if nxt.name in seen or nxt.name not in allowed:
                    continue
                seen.add(nxt.name)
                following.append(nxt)
        found = [known[op.name] for op in following if op.name in known]
        if found:
            return pick(found)
        frontier = following
    return None


def _consumers(op: tf.Operation) -> Iterable[tf.Operation]:
    for out in op.outputs:
        yield from out.consumers()
    yield from op._control_outputs  # noqa: SLF001 (public accessor missing in tf.compat.v1)


def _producers(op: tf.Operation) -> Iterable[tf.Operation]:
    yield from (t.op for t in op.inputs)
    yield from op.control_inputs


def _layer_of_gradient_name(
    rest: Sequence[str], forward_layer: Mapping[str, int], names: Sequence[str]
) -> int | None:
    """Layer of `gradients/<rest>`: the forward op `<op>` of a `<op>_grad` scope, else a layer
    named by the first component."""
    for k in range(len(rest), 0, -1):
        head = rest[k - 1]
        if head.endswith("_grad"):
            forward = "/".join([*rest[: k - 1], head[: -len("_grad")]])
            if forward in forward_layer:
                return forward_layer[forward]
    return _layer_of_scope_path(rest[:-1], names)


def _fill_from_neighbours(ops, layer_of, allowed: set[str], pick_consumer, pick_producer) -> None:
    """Give every op of `ops` not yet in `layer_of` the layer of its nearest assigned consumers
    (chosen among them by `pick_consumer`), or failing that of its nearest assigned producers
    (`pick_producer`). Searches only see the ops assigned before this call."""
    assigned = dict(layer_of)
    for op in ops:
        if op.name not in layer_of:
            layer = _nearest(op, assigned, allowed, _consumers, pick_consumer)
            if layer is None:
                layer = _nearest(op, assigned, allowed, _producers, pick_producer)
            if layer is not None:
                layer_of[op.name] = layer


def find_layers(template: Template, layers: LayerRule = None) -> LayerMap:
    """Assigns every forward and backward op of the template to a layer (see module doc)."""
    # The ops of the loss's data cone, minus inputs (variable handles, placeholders), get their
    # layers from the rewriter's own analysis.
    needed = _ancestors(template.loss)
    members = [op for op in template.forward_ops if op in needed and op.type not in _INPUT_OP_TYPES]
    if layers is None and not any("/" in op.name for op in members):
        raise ProfileError(
            "model_fn created no name scopes: wrap each layer in "
            "tf.compat.v1.name_scope(<layer>) or dapple_tf.layer(<layer>), "
            "or name the layers with a layer rule (layers=)"
        )
    try:
        names, layer_of_op = assign_layers(
            members, template.loss.op, layer_rule(layers), explicit=layers is not None
        )
    except TemplateError as e:
        raise ProfileError(str(e)) from None
    index = {name: i for i, name in enumerate(names)}

    forward_names = {op.name for op in template.forward_ops}
    forward_layer = {op: index[layer] for op, layer in layer_of_op.items()}
    # Other forward ops join their earliest consumer's layer, else their latest producer's.
    _fill_from_neighbours(template.forward_ops, forward_layer, forward_names, min, max)

    gradient_scope = template.backward_ops[0].name.split("/", 1)[0]
    backward_names = {op.name for op in template.backward_ops}
    backward_layer = {}
    for op in template.backward_ops:
        parts = op.name.split("/")
        if parts[0] == gradient_scope and len(parts) > 1:
            layer = _layer_of_gradient_name(parts[1:], forward_layer, names)
            if layer is not None:
                backward_layer[op.name] = layer
    # Gradient sums (AddN) and seeds feed the backward of the layer that needs them.
    _fill_from_neighbours(template.backward_ops, backward_layer, backward_names, max, min)
    return LayerMap(names, forward_layer, backward_layer, gradient_scope)


# ---- sizes: activations, parameters, edges -----------------------------------------------------
def _tensor_bytes(shape: Sequence[int], dtype: tf.DType) -> int:
    try:
        item = tf.as_dtype(dtype).size
    except (TypeError, ValueError):
        item = 0  # strings and variants have no fixed size
    return int(np.prod(shape, dtype=np.int64)) * item


def boundary_tensors(
    template: Template, layers: LayerMap
) -> list[tuple[tf.Tensor, int, list[int]]]:
    """Tensors that leave their layer: (tensor, producer layer, sorted consumer layers).

    Only forward consumers count (a backward op reading a forward tensor runs where that tensor
    already is) and variables are excluded (stages share them, they are not sent)."""
    out = []
    for op in template.forward_ops:
        src = layers.forward_layer.get(op.name)
        if src is None or op.type in _VARIABLE_OP_TYPES:
            continue
        for t in op.outputs:
            if t.dtype == tf.resource:
                continue
            dst = {
                layers.forward_layer[c.name]
                for c in t.consumers()
                if c.name in layers.forward_layer and layers.forward_layer[c.name] != src
            }
            if dst:
                out.append((t, src, sorted(dst)))
    return out


def layer_sizes(
    template: Template,
    layers: LayerMap,
    session: v1.Session | None = None,
    feed: Mapping[tf.Tensor, np.ndarray] | None = None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(activation bytes per layer, parameter bytes per layer, edges), exact for static shapes.

    Tensors whose static shape is not fully known are sized by running `tf.shape` on them in
    `session` with `feed`; without a session such a tensor is an error.
    """
    n = len(layers.names)
    activation, parameter, edges = [0] * n, [0] * n, set()
    crossing = boundary_tensors(template, layers)
    unknown = [t for t, _, _ in crossing if not t.shape.is_fully_defined()]
    shapes = {}
    if unknown:
        if session is None:
            raise ProfileError(
                f"shape of {unknown[0].name} is not static ({unknown[0].shape}); "
                "pass a session to measure it"
            )
        with template.graph.as_default(), v1.name_scope("dapple_profiler_shapes"):
            shape_ops = [tf.shape(t) for t in unknown]
        shapes = dict(zip((t.name for t in unknown), session.run(shape_ops, feed)))
    for t, src, dsts in crossing:
        shape = shapes[t.name] if t.name in shapes else t.shape.as_list()
        activation[src] += _tensor_bytes(shape, t.dtype)
        for dst in dsts:
            if dst < src:
                raise ProfileError(
                    f"layer {layers.names[dst]!r} consumes {t.name} of the later layer "
                    f"{layers.names[src]!r}; layers must be created in dataflow order"
                )
            edges.add((src, dst))
    for var in template.variables:
        layer = _layer_of_variable(var, layers)
        if layer is None:
            raise ProfileError(f"variable {var.name} is used by no layer")
        parameter[layer] += _tensor_bytes(var.shape.as_list(), var.dtype.base_dtype)
    return activation, parameter, sorted(edges)


def _layer_of_variable(var: tf.Variable, layers: LayerMap) -> int | None:
    """The layer whose scope names the variable, else the first layer reading it."""
    layer = _layer_of_scope_path(var.op.name.split("/")[:-1], layers.names)
    return layer if layer is not None else layers.forward_layer.get(var.op.name)


# ---- times: step stats -> per-layer milliseconds -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One executed node: where, when, and how long it kept its device busy (microseconds)."""

    name: str
    device: str
    start_us: int
    end_us: int
    busy_us: int


def _kernel_op_name(node) -> str:
    # GPU tracer labels look like `<kernel> @@<op name>:<op type>#...` or node_name `name:type`.
    label, name = node.timeline_label, node.node_name
    start, end = label.find("@@"), label.find("#")
    if 0 <= start and start + 2 < end:
        name = label[start + 2 : end]
    return name.split(":")[0]


def op_records(step_stats) -> list[OpRecord]:
    """Executed nodes of one step. On GPUs the kernel times of `/stream:all` replace the launch
    times of the op (and per-stream duplicates are dropped)."""
    kernels: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for dev in step_stats.dev_stats:
        if "/stream:all" in dev.device:
            for node in dev.node_stats:
                kernels[_kernel_op_name(node)].append(
                    (node.all_start_micros, node.all_start_micros + node.all_end_rel_micros)
                )
    records = []
    for dev in step_stats.dev_stats:
        if "/stream:" in dev.device or "/memcpy" in dev.device:
            continue
        for node in dev.node_stats:
            start = node.all_start_micros
            end = start + node.all_end_rel_micros
            busy = node.all_end_rel_micros
            if node.node_name in kernels:
                spans = kernels[node.node_name]
                end = max(end, max(e for _, e in spans))
                busy = sum(e - s for s, e in spans)
            records.append(OpRecord(node.node_name, dev.device, start, end, busy))
    return records


@dataclasses.dataclass(frozen=True)
class StepTimes:
    forward_us: list[float]
    backward_us: list[float]
    unattributed_us: float
    unattributed_ops: tuple[str, ...]
    step_us: float
    device: str


# Nodes the executor adds around every step; they are nobody's compute.
_EXECUTOR_NODE = re.compile(r"^(_SOURCE|_SINK|_arg_.*|_retval_.*|_Recv.*|_Send.*)$")


def attribute_step(step_stats, layers: LayerMap) -> StepTimes:
    """Sums the busy time of one step's nodes per layer, forward and backward apart."""
    n = len(layers.names)
    forward, backward = [0.0] * n, [0.0] * n
    unattributed, lost = 0.0, set()
    records = op_records(step_stats)
    busy_by_device = collections.Counter()
    for rec in records:
        busy_by_device[rec.device] += rec.busy_us
        where = layers.layer_of_node(rec.name)
        if where is None:
            if not _EXECUTOR_NODE.match(rec.name):
                unattributed += rec.busy_us
                lost.add(rec.name)
            continue
        layer, is_backward = where
        (backward if is_backward else forward)[layer] += rec.busy_us
    step = (max(r.end_us for r in records) - min(r.start_us for r in records)) if records else 0
    device = busy_by_device.most_common(1)[0][0] if busy_by_device else "unknown"
    return StepTimes(forward, backward, unattributed, tuple(sorted(lost)), step, device)


# ---- running it --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Measurement:
    """A profile plus what the profile format has no place for."""

    profile: Profile
    step_ms: float  # median wall time of a traced step, first op to last
    unattributed_ms: float  # median op time per step that no layer could claim
    unattributed_ops: tuple[str, ...]


def default_batch(
    feature_spec: FeatureSpec, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Normal floats, zero integers (a valid id and label for any vocabulary), False booleans."""
    batch = {}
    for key, (shape, dtype) in feature_spec.items():
        dtype = tf.as_dtype(dtype)
        full = (batch_size, *shape)
        if dtype.is_floating:
            batch[key] = rng.standard_normal(full).astype(dtype.as_numpy_dtype)
        else:
            batch[key] = np.zeros(full, dtype.as_numpy_dtype)
    return batch


def measure(
    model_fn: ModelFn,
    feature_spec: FeatureSpec,
    batch_size: int,
    *,
    warmup_steps: int = 2,
    measured_steps: int = 5,
    device: str | None = None,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
    session_config: v1.ConfigProto | None = None,
    layers: LayerRule = None,
) -> Measurement:
    """Profiles model_fn at `batch_size`; see `profile_model`."""
    if measured_steps < 1:
        raise ProfileError(f"measured_steps must be >= 1, found {measured_steps}")
    template = build_template(model_fn, feature_spec, batch_size, device=device, seed=seed)
    layer_map = find_layers(template, layers)
    rng = np.random.default_rng(seed)
    batch = (
        batch_fn(batch_size, rng)
        if batch_fn is not None
        else default_batch(feature_spec, batch_size, rng)
    )
    missing = sorted(set(feature_spec) - set(batch))
    if missing:
        raise ProfileError(f"batch_fn returned no {missing}; expected keys {sorted(feature_spec)}")
    feed = {template.placeholders[k]: batch[k] for k in feature_spec}
    config = session_config or v1.ConfigProto(allow_soft_placement=True)
    # Fetching the gradients keeps Grappler from pruning the backward pass.
    fetches = [template.loss, template.gradients]
    with template.graph.as_default():
        init = v1.global_variables_initializer()
    with new_session(template.graph, config) as session:
        session.run(init)
        activation, parameter, edges = layer_sizes(template, layer_map, session, feed)
        for _ in range(warmup_steps):
            session.run(fetches, feed)
        options = v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE)
        steps = []
        for _ in range(measured_steps):
            metadata = v1.RunMetadata()
            session.run(fetches, feed, options=options, run_metadata=metadata)
            steps.append(attribute_step(metadata.step_stats, layer_map))

    def median_ms(values):
        return statistics.median(values) / 1000.0

    costs = tuple(
        LayerCost(
            name,
            forward_ms=median_ms([s.forward_us[i] for s in steps]),
            backward_ms=median_ms([s.backward_us[i] for s in steps]),
            activation_bytes=float(activation[i]),
            parameter_bytes=float(parameter[i]),
        )
        for i, name in enumerate(layer_map.names)
    )
    profile = Profile(costs, tuple(edges), batch_size, steps[0].device)
    lost = tuple(sorted(set().union(*(s.unattributed_ops for s in steps))))
    return Measurement(
        profile,
        median_ms([s.step_us for s in steps]),
        median_ms([s.unattributed_us for s in steps]),
        lost,
    )


def profile_model(
    model_fn: ModelFn,
    feature_spec: FeatureSpec,
    batch_size: int,
    *,
    warmup_steps: int = 2,
    measured_steps: int = 5,
    device: str | None = None,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
    layers: LayerRule = None,
) -> Profile:
    """Profiles the template of `model_fn` at `batch_size` rows on one device.

    `feature_spec` maps feature names to (per-example shape, dtype); `batch_fn(batch_size, rng)`
    makes the fed batch (default: `default_batch`). Returns forward/backward ms per layer (median
    of `measured_steps` traced steps after `warmup_steps`), exact activation and parameter bytes,
    and the layer edges. Layer names come from the layer rule `layers` (default: the model's
    top-level name scopes; see graph_rewrite/template.py).
    """
    return measure(
        model_fn,
        feature_spec,
        batch_size,
        warmup_steps=warmup_steps,
        measured_steps=measured_steps,
        device=device,
        seed=seed,
        batch_fn=batch_fn,
        layers=layers,
    ).profile


def format_table(profile: Profile) -> str:
    """A per-layer table: times, activation and parameter sizes, and totals."""
    width = max([len("layer"), *(len(l.name) for l in profile.layers)])
    lines = [
        f"{'layer':<{width}}  {'fwd ms':>9}  {'bwd ms':>9}  {'activation B':>13}  {'param B':>12}"
    ]
    for l in profile.layers:
        lines.append(
            f"{l.name:<{width}}  {l.forward_ms:9.3f}  {l.backward_ms:9.3f}  "
            f"{l.activation_bytes:13.0f}  {l.parameter_bytes:12.0f}"
        )
    lines.append(
        f"{'total':<{width}}  {sum(l.forward_ms for l in profile.layers):9.3f}  "
        f"{sum(l.backward_ms for l in profile.layers):9.3f}  "
        f"{sum(l.activation_bytes for l in profile.layers):13.0f}  "
        f"{sum(l.parameter_bytes for l in profile.layers):12.0f}"
    )
    return "\n".join(lines)


# ---- what the runtime's cost model needs beyond the published profile (issue #14) ----------------
def fit_fixed_and_per_row(
    batch_sizes: Sequence[int], times_ms: Sequence[float]
) -> tuple[float, float]:
    """(fixed ms, per-row ms) of the least-squares line `time = fixed + per_row x rows` through
    the measured points, both kept >= 0 (a negative intercept becomes a line through the origin,
    a negative slope a constant)."""
    rows = np.asarray(batch_sizes, dtype=float)
    times = np.asarray(times_ms, dtype=float)
    if len(set(rows.tolist())) < 2:
        raise ProfileError(
            f"a fixed + per-row fit needs two or more distinct batch sizes, found "
            f"{sorted(set(rows.tolist()))}"
        )
    per_row, fixed = np.polyfit(rows, times, 1)
    if fixed < 0:
        return 0.0, float(max(0.0, np.dot(rows, times) / np.dot(rows, rows)))
    if per_row < 0:
        return float(max(0.0, times.mean())), 0.0
    return float(fixed), float(per_row)


# Gradient ops that read only a tensor's shape: they run as soon as it exists, keeping nothing.
_METADATA_OP_TYPES = frozenset({"Shape", "ShapeN", "Size", "Rank", "BroadcastGradientArgs"})
# Ops whose output is their first input's buffer (TensorFlow's CPU and GPU kernels forward it):
# a tensor read through one of them and directly is kept once.
_ALIAS_OP_TYPES = frozenset(
    {"Reshape", "Identity", "ExpandDims", "Squeeze", "StopGradient", "Snapshot"}
)


def _buffer_of(tensor: tf.Tensor) -> tf.Tensor:
    """The tensor whose buffer `tensor` is: itself, or what it aliases through `_ALIAS_OP_TYPES`."""
    while tensor.op.type in _ALIAS_OP_TYPES and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor


def saved_tensor_bytes(
    template: Template,
    layers: LayerMap,
    session: v1.Session | None = None,
    feed: Mapping[tf.Tensor, np.ndarray] | None = None,
) -> list[int]:
    """Bytes per layer of the forward tensors the gradient ops read: what a layer keeps alive
    from its forward until its backward (variables and their reads excluded: they are
    parameters; so are reads by shape-only ops). A tensor read both directly and through an
    alias (a Reshape, an Identity: the same buffer) counts once, in the layer of the tensor
    that owns the buffer. Tensors without a static shape are sized by running `tf.shape` in
    `session`."""
    kept: dict[str, tuple[tf.Tensor, int]] = {}
    for op in template.backward_ops:
        if op.type in _METADATA_OP_TYPES:
            continue
        for read in op.inputs:
            t = _buffer_of(read)
            layer = layers.forward_layer.get(t.op.name)
            if layer is None or t.op.type in _VARIABLE_OP_TYPES or t.dtype == tf.resource:
                continue
            kept.setdefault(t.name, (t, layer))
    unknown = [t for t, _ in kept.values() if not t.shape.is_fully_defined()]
    shapes = {}
    if unknown:
        if session is None:
            raise ProfileError(
                f"shape of {unknown[0].name} is not static ({unknown[0].shape}); "
                "pass a session to measure it"
            )
        with template.graph.as_default(), v1.name_scope("dapple_profiler_saved_shapes"):
            shape_ops = [tf.shape(t) for t in unknown]
        shapes = dict(zip((t.name for t in unknown), session.run(shape_ops, feed)))
    saved = [0] * len(layers.names)
    for name, (t, layer) in kept.items():
        shape = shapes[name] if name in shapes else t.shape.as_list()
        saved[layer] += _tensor_bytes(shape, t.dtype)
    return saved


def optimizer_slot_bytes(template: Template, layers: LayerMap, optimizer_fn: Callable) -> list[int]:
    """Bytes per layer of the slot variables `optimizer_fn()` creates for the layer's parameters
    (Adam: m and v; momentum: one accumulator). Adds the optimizer's ops to the template graph."""
    with template.graph.as_default():
        optimizer = optimizer_fn()
        optimizer.apply_gradients(list(zip(template.gradients, template.variables)))
        slots = [0] * len(layers.names)
        for var in template.variables:
            layer = _layer_of_variable(var, layers)
            for slot_name in optimizer.get_slot_names():
                slot = optimizer.get_slot(var, slot_name)
                if slot is not None and layer is not None:
                    slots[layer] += _tensor_bytes(slot.shape.as_list(), slot.dtype.base_dtype)
    return slots


def _untraced_step_ms(session: v1.Session, fetches, feed, steps: int) -> float:
    import time

    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        session.run(fetches, feed)
        times.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class BatchMeasurement:
    """One batch size's per-layer times (ms), scaled so that they sum to the untraced step."""

    forward_ms: tuple[float, ...]
    backward_ms: tuple[float, ...]
    wall_ms: float  # median untraced forward + backward step
    traced_sum_ms: float  # what the traced layer times summed to
    workspace_bytes: tuple[int, ...]  # per layer, the most one of its ops allocated


def largest_op_allocation(step_stats, layers: LayerMap) -> list[int]:
    """Per layer, the temporary bytes of its two ops with the most: what an op allocates beyond
    its outputs and frees when it ends (e.g. a convolution's backward workspace). Two, because a
    layer's input gradient and weight gradient run at the same time."""
    temporaries: list[list[int]] = [[] for _ in layers.names]
    for dev in step_stats.dev_stats:
        for node in dev.node_stats:
            where = layers.layer_of_node(node.node_name)
            if where is None:
                continue
            allocated = sum(
                r.alloc_bytes
                for m in node.memory
                for r in m.allocation_records
                if r.alloc_bytes > 0
            )
            outputs = sum(
                o.tensor_description.allocation_description.allocated_bytes for o in node.output
            )
            temporaries[where[0]].append(max(0, allocated - outputs))
    return [sum(sorted(t)[-2:]) for t in temporaries]


def measure_batch(
    template: Template,
    layers: LayerMap,
    batch: Mapping[str, np.ndarray],
    session: v1.Session,
    *,
    warmup_steps: int = 2,
    measured_steps: int = 5,
    wall_steps: int = 10,
) -> BatchMeasurement:
    """Per-layer forward/backward time of one template at its batch size. Traced op times carry
    the tracer's overhead and miss the executor's, so each layer's share of the traced time is
    applied to the median untraced step time instead (the step the runtime really pays)."""
    feed = {template.placeholders[k]: batch[k] for k in template.placeholders}
    fetches = [template.loss, template.gradients]
    for _ in range(warmup_steps):
        session.run(fetches, feed)
    wall = _untraced_step_ms(session, fetches, feed, wall_steps)
    options = v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE)
    steps, workspace = [], [0] * len(layers.names)
    for _ in range(measured_steps):
        metadata = v1.RunMetadata()
        session.run(fetches, feed, options=options, run_metadata=metadata)
        steps.append(attribute_step(metadata.step_stats, layers))
        workspace = [
            max(a, b) for a, b in zip(workspace, largest_op_allocation(metadata.step_stats, layers))
        ]
    n = len(layers.names)
    fwd = [statistics.median(s.forward_us[i] for s in steps) / 1000.0 for i in range(n)]
    bwd = [statistics.median(s.backward_us[i] for s in steps) / 1000.0 for i in range(n)]
    traced = sum(fwd) + sum(bwd)
    scale = wall / traced if traced > 0 else 0.0
    return BatchMeasurement(
        tuple(x * scale for x in fwd), tuple(x * scale for x in bwd), wall, traced, tuple(workspace)
    )


def apply_ms_per_layer(
    template: Template,
    layers: LayerMap,
    optimizer_fn: Callable,
    batch: Mapping[str, np.ndarray],
    *,
    steps: int = 10,
    session_config: v1.ConfigProto | None = None,
) -> list[float]:
    """Time of the optimizer's update once per step, per layer: the untraced step with the
    update minus the step without it, shared out by the layers' parameter bytes."""
    with template.graph.as_default():
        optimizer = optimizer_fn()
        update = optimizer.apply_gradients(list(zip(template.gradients, template.variables)))
        # Both steps compute the gradients in the graph; neither copies them out.
        gradients_only = tf.group(*template.gradients)
        init = v1.global_variables_initializer()
    feed = {template.placeholders[k]: batch[k] for k in template.placeholders}
    config = session_config or v1.ConfigProto(allow_soft_placement=True)
    with new_session(template.graph, config) as session:
        session.run(init)
        without, with_update = [template.loss, gradients_only], [template.loss, update]
        for _ in range(2):
            session.run(with_update, feed)
        diffs = [
            _untraced_step_ms(session, with_update, feed, 1)
            - _untraced_step_ms(session, without, feed, 1)
            for _ in range(steps)
        ]
    total = max(0.0, statistics.median(diffs))
    bytes_per_layer = [0.0] * len(layers.names)
    for var in template.variables:
        layer = _layer_of_variable(var, layers)
        if layer is not None:
            bytes_per_layer[layer] += _tensor_bytes(var.shape.as_list(), var.dtype.base_dtype)
    whole = sum(bytes_per_layer)
    return [total * b / whole if whole else 0.0 for b in bytes_per_layer]


def profile_for_runtime(
    model_fn: ModelFn,
    feature_spec: FeatureSpec,
    batch_sizes: Sequence[int],
    *,
    optimizer_fn: Callable | None = None,
    warmup_steps: int = 2,
    measured_steps: int = 3,
    device: str | None = None,
    seed: int = 0,
    batch_fn: BatchFn | None = None,
    session_config: v1.ConfigProto | None = None,
    layers: LayerRule = None,
) -> Profile:
    """The profile the runtime cost model (`planner.runtime_cost`) needs: the template measured
    at each of `batch_sizes` (two or more) and each layer's forward and backward time fitted as
    fixed + per-row ms; the bytes each layer keeps for its backward; with `optimizer_fn`, the
    optimizer's slot bytes and update time per layer. Times are wall-clock shares (see
    `measure_batch`); forward_ms and backward_ms are those of the largest batch size, which is
    the profile's batch size. `session_config`: measure under the runtime's session options."""
    config = session_config or v1.ConfigProto(allow_soft_placement=True)
    sizes = sorted(set(int(b) for b in batch_sizes))
    if len(sizes) < 2 or sizes[0] < 1:
        raise ProfileError(
            f"profile_for_runtime needs two or more distinct positive batch sizes, "
            f"found {list(batch_sizes)}"
        )
    rng = np.random.default_rng(seed)
    measured: list[BatchMeasurement] = []
    for batch_size in sizes:
        template = build_template(model_fn, feature_spec, batch_size, device=device, seed=seed)
        layer_map = find_layers(template, layers)
        batch = (
            batch_fn(batch_size, rng)
            if batch_fn is not None
            else default_batch(feature_spec, batch_size, rng)
        )
        feed = {template.placeholders[k]: batch[k] for k in feature_spec}
        with template.graph.as_default():
            init = v1.global_variables_initializer()
        with new_session(template.graph, config) as session:
            session.run(init)
            measured.append(
                measure_batch(
                    template,
                    layer_map,
                    batch,
                    session,
                    warmup_steps=warmup_steps,
                    measured_steps=measured_steps,
                )
            )
            if batch_size == sizes[-1]:
                activation, parameter, edges = layer_sizes(template, layer_map, session, feed)
                saved = saved_tensor_bytes(template, layer_map, session, feed)
    slots = apply = [None] * len(layer_map.names)
    if optimizer_fn is not None:
        slots = optimizer_slot_bytes(template, layer_map, optimizer_fn)
        fresh = build_template(model_fn, feature_spec, sizes[-1], device=device, seed=seed)
        apply = apply_ms_per_layer(
            fresh, find_layers(fresh, layers), optimizer_fn, batch, session_config=config
        )
    costs = []
    for i, name in enumerate(layer_map.names):
        f_fixed, f_row = fit_fixed_and_per_row(sizes, [m.forward_ms[i] for m in measured])
        b_fixed, b_row = fit_fixed_and_per_row(sizes, [m.backward_ms[i] for m in measured])
        costs.append(
            LayerCost(
                name,
                forward_ms=measured[-1].forward_ms[i],
                backward_ms=measured[-1].backward_ms[i],
                activation_bytes=float(activation[i]),
                parameter_bytes=float(parameter[i]),
                forward_fixed_ms=f_fixed,
                forward_per_row_ms=f_row,
                backward_fixed_ms=b_fixed,
                backward_per_row_ms=b_row,
                saved_bytes=float(saved[i]),
                workspace_bytes=float(measured[-1].workspace_bytes[i]),
                optimizer_slot_bytes=None if slots[i] is None else float(slots[i]),
                apply_ms=None if apply[i] is None else float(apply[i]),
            )
        )
    return Profile(tuple(costs), tuple(edges), sizes[-1], device or "default")
