"""Differentiate each stage once: a forward GraphDef and a backward GraphDef per stage.

For stage s the forward GraphDef holds the stage's template ops; everything it reads from
outside is a Placeholder (features, tensors from earlier stages) or a copy of the variable's
VarHandleOp. Its gradient is taken in a scratch graph holding that forward part, for ys = the
float tensors the stage sends on (+ the loss on the last stage) and xs = its float received
tensors + the variable handles it reads, with placeholder grad_ys: layer by layer, with
`tf.gradients` (public API) run once per distinct layer structure and its gradient ops imported
for each layer of that structure (graph_rewrite/layer_gradients.py), or, where that does not
apply, by one `tf.gradients` call over the stage. The new gradient ops form the backward
GraphDef; the forward tensors they read become Placeholders.

Each GraphDef then becomes a library function (graph_rewrite/functions.py): `forward`,
`backward`, and `backward_accumulate` (the backward that also adds this micro-batch's dense
variable gradients to the running sums it is given). The clone pass calls them once per
(micro-batch, slot), so the rewrite never re-runs gradient construction or copies stage ops per
clone. Control-flow-v2 ops (While from `tf.compat.v1.while_loop`) work because their gradient is
built here, before export: the forward While already carries the accumulator outputs its
gradient reads.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf
from tensorflow.core.framework import function_pb2, graph_pb2

from . import (
    backward_split,
    functions,
    graphdefs,
    layer_gradients,
    stacked_gradients,
    transposed_weights,
)
from .graphdefs import GradRef, is_differentiable
from .partition import StageSpec
from .template import Template

v1 = tf.compat.v1

FORWARD_INPUT_PREFIX = "dapple_in"
GRAD_INPUT_PREFIX = "dapple_grad_in"
FORWARD_REF_PREFIX = "dapple_fwd"
RUNNING_SUM_PREFIX = "dapple_running_sum"
ACCUMULATE_SCOPE = "dapple_accumulate"
WEIGHT_RUNNING_SUM_PREFIX = "dapple_weight_running_sum"  # deferred weights' own (other shapes)
WEIGHT_ACCUMULATE_SCOPE = "dapple_weight_accumulate"


@dataclasses.dataclass(frozen=True)
class StageFunction:
    """A library function and how a clone calls it: `inputs` are the names the caller maps to
    tensors (placeholder tensors of the GraphDef, `<variable>:0` for variable handles), `outputs`
    the GraphDef tensors it returns, with their static specs."""

    function: function_pb2.FunctionDef
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_specs: tuple[tf.TensorSpec, ...]

    @property
    def name(self) -> str:
        return self.function.signature.name


@dataclasses.dataclass(frozen=True)
class DeferredWeights:
    """The weight part of a stage's backward as a function of its own (zero-bubble schedules'
    `W` actions, graph_rewrite/backward_split.py): called once per micro-batch, after that
    micro-batch's backward call (`I`), on tensors of that call."""

    variable_grads: dict[str, GradRef]  # variable -> its gradient in the functions
    inputs: tuple[str, ...]  # tensors of the backward call (its arguments or results) it reads
    function: StageFunction
    # + running sums: extra inputs running_sum_inputs[v] for each dense gradient, whose output
    # (the sum) replaces variable_grads[v].dense; None if no gradient is dense
    accumulate_function: StageFunction | None
    running_sum_inputs: dict[str, str]
    running_sum_outputs: dict[str, str]
    # What one pending micro-batch holds (static shapes; variable reads count 0): from its
    # forward until its I, the forward's tensors the backward reads; from its I until its W,
    # the tensors W reads. ZB-H1's memory bound (planner.schedules.memory_bounded_held_back).
    forward_bytes: int = 0
    input_bytes: int = 0

    def results(self, accumulating: bool) -> list[str]:
        """Names of the results of `function` or, if `accumulating`, `accumulate_function`."""
        return _backward_outputs(
            {}, self.variable_grads, self.running_sum_outputs if accumulating else {}
        )


@dataclasses.dataclass
class StageGraph:
    spec: StageSpec
    forward: graph_pb2.GraphDef
    feature_inputs: dict[str, str]  # feature -> placeholder tensor in `forward`
    boundary_inputs: dict[str, str]  # template tensor -> placeholder tensor in `forward`
    forward_variables: tuple[str, ...]  # VarHandleOp names present in `forward`
    loss: str | None  # loss tensor in `forward` (last stage)
    backward: graph_pb2.GraphDef
    forward_refs: dict[str, str]  # placeholder in `backward` -> tensor of `forward`
    backward_variables: tuple[str, ...]  # VarHandleOp names present in `backward`
    grad_inputs: dict[str, str]  # float output tensor -> grad placeholder in `backward`
    loss_grad_input: str | None
    input_grads: dict[str, str]  # float input tensor -> its gradient in `backward`
    variable_grads: dict[str, GradRef]
    forward_function: StageFunction
    backward_function: StageFunction
    # backward + running sums: extra inputs running_sum_inputs[v] for each dense gradient, whose
    # output (the sum) replaces variable_grads[v].dense; None if the stage has no dense gradient
    backward_accumulate_function: StageFunction | None
    running_sum_inputs: dict[str, str]
    running_sum_outputs: dict[str, str]
    library: tuple[function_pb2.FunctionDef, ...]  # every function the calls need
    gradient_twin: int | None = None  # stage whose gradient graph this one reuses, renamed
    gradient_by_layers: bool = False  # its gradient graph was assembled layer by layer
    # stacked weight gradients (graph_rewrite/stacked_gradients.py): variable -> its gradient
    # tensor in `weight_gradient_function`, which computes them once per step from
    # `weight_gradient_inputs` (tensors of the backward call or its inputs, one per micro-batch,
    # concatenated along axis 0) and the handles of `weight_gradient_variables`; these
    # variables are not in `variable_grads`
    stacked_gradients: dict[str, str] = dataclasses.field(default_factory=dict)
    weight_gradient_function: StageFunction | None = None
    weight_gradient_inputs: tuple[str, ...] = ()
    weight_gradient_constants: tuple[str, ...] = ()  # inputs with one value per step
    weight_gradient_variables: tuple[str, ...] = ()
    # forward input -> the variable whose transposed value it takes, once per step
    # (graph_rewrite/transposed_weights.py)
    transposed_weights: dict[str, str] = dataclasses.field(default_factory=dict)
    # the weight gradients that `backward_function` leaves to zero-bubble schedules' W actions;
    # their variables are not in `variable_grads`
    deferred_weights: DeferredWeights | None = None

    def backward_results(self, accumulating: bool) -> list[str]:
        """Names of the backward's results, in (input grads, variable grads) order, of
        `backward_function` or, if `accumulating`, of `backward_accumulate_function`."""
        return _backward_outputs(
            self.input_grads, self.variable_grads, self.running_sum_outputs if accumulating else {}
        )

    @functools.cached_property
    def backward_only_forward_results(self) -> frozenset[int]:
        """Indices of the forward function's results that only the backward call reads (saved
        activations not sent on): their static shapes are not needed outside the calls."""
        sent = set(self.spec.outputs) | ({self.loss} if self.loss else set())
        sent |= set(self.spec.statistics)
        refs = set(self.forward_refs.values())
        return frozenset(
            k
            for k, name in enumerate(self.forward_function.outputs)
            if name in refs and name not in sent
        )

    def functions(self) -> list[function_pb2.FunctionDef]:
        """Every function a clone's calls need: the stage's own and those they call."""
        own = [
            self.forward_function,
            self.backward_function,
            self.backward_accumulate_function,
            self.weight_gradient_function,
            *(
                (self.deferred_weights.function, self.deferred_weights.accumulate_function)
                if self.deferred_weights
                else ()
            ),
        ]
        return list(self.library) + [f.function for f in own if f is not None]

    @property
    def differentiable_outputs(self) -> tuple[str, ...]:
        return tuple(self.grad_inputs)


def build_stage_graphs(
    template: Template,
    specs: list[StageSpec],
    rows_of_stage=None,
    stages=None,
    layer_cache: layer_gradients.LayerGradientCache | None = None,
    stack_weight_gradients: bool = False,
    transposed_stages: frozenset[int] = frozenset(),
    defer_weight_gradients: bool = False,
) -> list[StageGraph | None]:
    """rows_of_stage[s]: the rows every clone of stage s gets (static shapes let gradient
    functions skip dynamic shape arithmetic); None keeps the batch dimension unknown.
    `stages`: the stage indices to build (default all; a rank builds its own); the others are
    None in the result. `layer_cache`: gradient graphs by layer structure (default: a new one).
    `stack_weight_gradients` (needs rows_of_stage): the dense weight gradients that are sums
    over rows get a function of their own, called once per step on the stacked rows of all
    micro-batches (graph_rewrite/stacked_gradients.py); with more than one stage, only their
    sums over rows are stacked, and every stage computes its activation gradients per
    micro-batch, in the time it would otherwise wait for its neighbours (a first stage sends no
    input gradient and would otherwise leave its whole backward to the end of the step); one
    stage has no neighbours and stacks its whole backward. `transposed_stages`: the stages whose
    forward matmuls read their weights transposed (graph_rewrite/transposed_weights.py).
    `defer_weight_gradients` (zero-bubble schedules; not with `stack_weight_gradients`): the
    variable gradients the input gradients do not need get a function of their own
    (`StageGraph.deferred_weights`), called once per micro-batch as the schedule's W action.

    `tf.gradients` runs once per distinct stage structure: a stage whose forward part is the
    same as an earlier stage's up to names (same ops, attributes, wiring, inputs, outputs and
    variable shapes: the middle stages of a block-repeated model) takes that stage's gradient
    graph with its forward names swapped for its own. A stage that repeats none is differentiated
    layer by layer, `tf.gradients` running once per distinct layer structure
    (graph_rewrite/layer_gradients.py), or, where that does not apply (while loops), at once."""
    if stack_weight_gradients and defer_weight_gradients:
        raise ValueError(
            "stacked weight gradients (one call after a slot's last backward) and deferred ones "
            "(one W call per micro-batch) split the same gradients: ask for one"
        )
    graph_def = template.graph.as_graph_def()
    node_by_name = {n.name: n for n in graph_def.node}
    rows_of_stage = rows_of_stage or [None] * len(specs)
    stage_graphs, differentiated = [], {}
    if layer_cache is None:
        layer_cache = layer_gradients.LayerGradientCache()
    wanted = set(range(len(specs)) if stages is None else stages)
    for spec, rows in zip(specs, rows_of_stage):
        if spec.index not in wanted:
            stage_graphs.append(None)
            continue
        forward_part = _forward_part(template, spec, node_by_name, graph_def.library, rows)
        key = _structure_key(forward_part, spec, template)
        diff = None
        if key in differentiated:
            twin_stage, twin_part, twin = differentiated[key]
            diff = _renamed(
                twin,
                _name_map(twin_part.graph_def, forward_part.graph_def),
                _input_map(twin_part, forward_part),
                dict(zip(specs[twin_stage].layers, spec.layers)),
            )
            if diff is not None:
                diff.twin_of = twin_stage
        if diff is None:
            diff = _differentiate(template, spec, forward_part, layer_cache) or _differentiate(
                template, spec, forward_part
            )
            differentiated.setdefault(key, (spec.index, forward_part, diff))
        stage_graphs.append(
            _stage_graph(
                template,
                spec,
                forward_part,
                diff,
                rows if stack_weight_gradients else None,
                spec.index in transposed_stages,
                row_ops_per_micro_batch=len(specs) > 1,
                defer_weights=defer_weight_gradients,
            )
        )
    return stage_graphs


def _forward_part(
    template: Template, spec: StageSpec, node_by_name, library, rows: int | None
) -> graphdefs.Subgraph:
    """The stage's template ops; outside inputs as Placeholders, variable handles copied in."""
    variable_nodes = {v: node_by_name[v] for v in spec.variables}
    return graphdefs.extract(
        (node_by_name[op] for op in spec.ops),
        template.graph,
        FORWARD_INPUT_PREFIX,
        keep_outside=variable_nodes,
        library=library if len(library.function) else None,
        static_rows=rows,
        batch_tensors=template.batch_tensors,
        row_factor=template.row_factor,
    )


@dataclasses.dataclass
class _Differentiated:
    """A stage's forward ops plus their gradient ops, and where the gradients are."""

    graph_def: graph_pb2.GraphDef
    tensors: object  # get_tensor_by_name (dtype, shape), graph_def_versions
    forward_names: set[str]
    grad_inputs: dict[str, str]
    loss_grad_input: str | None
    input_grads: dict[str, str]
    variable_grads: dict[str, GradRef]
    twin_of: int | None = None  # the stage whose gradient graph this one renames
    by_layers: bool = False  # assembled layer by layer (else one tf.gradients)


def _differentiate(
    template: Template,
    spec: StageSpec,
    forward_part: graphdefs.Subgraph,
    layer_cache: layer_gradients.LayerGradientCache | None = None,
) -> _Differentiated | None:
    """The stage's gradient ops in a scratch graph holding its forward part: one
    `tf.gradients` call, or, given `layer_cache`, assembled layer by layer
    (graph_rewrite/layer_gradients.py; None if the stage cannot be)."""
    boundary_inputs = _boundary_inputs(template, forward_part)
    scratch = tf.Graph()
    with scratch.as_default():
        tf.graph_util.import_graph_def(forward_part.graph_def, name="")
        forward_names = {n.name for n in forward_part.graph_def.node}
        ys, grad_ys, grad_inputs = [], [], {}
        for k, t in enumerate(spec.outputs):
            tensor = scratch.get_tensor_by_name(t)
            if is_differentiable(tensor.dtype):
                ph = v1.placeholder(tensor.dtype, tensor.shape, name=f"{GRAD_INPUT_PREFIX}/{k}")
                ys.append(tensor)
                grad_ys.append(ph)
                grad_inputs[t] = ph.name
        loss_grad_input = None
        if spec.has_loss:
            loss = scratch.get_tensor_by_name(template.loss)
            seed = v1.placeholder(loss.dtype, [], name=f"{GRAD_INPUT_PREFIX}/loss")
            ys.append(loss)
            grad_ys.append(seed)
            loss_grad_input = seed.name
        float_inputs = [
            t
            for t in spec.inputs
            if is_differentiable(scratch.get_tensor_by_name(boundary_inputs[t]).dtype)
        ]
        xs = [scratch.get_tensor_by_name(boundary_inputs[t]) for t in float_inputs]
        handles = [scratch.get_tensor_by_name(f"{v}:0") for v in spec.variables]
        if not ys:
            grads = [None] * (len(xs) + len(handles))
        elif layer_cache is None:
            grads = tf.gradients(ys, xs + handles, grad_ys)
        else:
            layered = layer_gradients.differentiate_by_layers(
                scratch,
                forward_part.graph_def,
                template.layer_of_op,
                spec.layers,
                [(y.name, g) for y, g in zip(ys, grad_ys)],
                [x.name for x in xs],
                layer_cache,
            )
            if layered is None:
                return None
            input_grads_of, variable_grads_of = layered
            grads = [input_grads_of[x.name] for x in xs] + [
                variable_grads_of.get(v) for v in spec.variables
            ]
        input_grads = {}
        for t, x, g in zip(float_inputs, xs, grads[: len(xs)]):
            if g is None:
                g = tf.zeros_like(x)
            elif isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            input_grads[t] = g.name
        variable_grads = {}
        for v, g in zip(spec.variables, grads[len(xs) :]):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                dense_shape = (
                    g.dense_shape
                    if g.dense_shape is not None
                    else tf.constant(template.variables[v].shape, tf.int64)
                )
                variable_grads[v] = GradRef(
                    indices=g.indices.name, values=g.values.name, dense_shape=dense_shape.name
                )
            else:
                variable_grads[v] = GradRef(dense=g.name)
    return _Differentiated(
        scratch.as_graph_def(),
        scratch,
        forward_names,
        grad_inputs,
        loss_grad_input,
        input_grads,
        variable_grads,
        by_layers=layer_cache is not None,
    )


def _boundary_inputs(template: Template, forward_part: graphdefs.Subgraph) -> dict[str, str]:
    features = set(template.features.values())
    return {t: ph for t, ph in forward_part.placeholder_of.items() if t not in features}


def _structure_key(forward_part: graphdefs.Subgraph, spec: StageSpec, template: Template) -> bytes:
    """Equal for two stages iff their forward parts differ in names only (see
    graphdefs.structure_key), with the stage's outputs, loss, boundary inputs and variables at
    the same positions."""
    graph_def = forward_part.graph_def
    where = graphdefs.positions(graph_def)
    return graphdefs.structure_key(
        graph_def,
        [
            *(where(t) for t in spec.outputs),
            where(template.loss) if spec.has_loss else "no loss",
            *(where(forward_part.placeholder_of[t]) for t in spec.inputs),
            *(where(v) for v in spec.variables),
        ],
    )


def _name_map(twin: graph_pb2.GraphDef, own: graph_pb2.GraphDef) -> dict[str, str]:
    """Node names of the twin stage's forward part -> this stage's, by position."""
    return {a.name: b.name for a, b in zip(twin.node, own.node) if a.name != b.name}


def _input_map(twin: graphdefs.Subgraph, own: graphdefs.Subgraph) -> dict[str, str]:
    """The twin stage's outside input tensors -> this stage's, by their placeholder."""
    own_tensor = {ph: t for t, ph in own.placeholder_of.items()}
    return {t: own_tensor[ph] for t, ph in twin.placeholder_of.items()}


class _RenamedTensors:
    """Tensor lookup of a renamed gradient graph: dtype and shape come from the twin's graph."""

    def __init__(self, tensors, inverse: dict[str, str]):
        self.tensors, self.inverse = tensors, inverse
        self.graph_def_versions = tensors.graph_def_versions

    def get_tensor_by_name(self, name: str):
        op, index = graphdefs.split_tensor_name(name)
        return self.tensors.get_tensor_by_name(f"{self.inverse.get(op, op)}:{index}")


def _renamed(
    twin: _Differentiated,
    name_map: dict[str, str],
    input_map: dict[str, str],
    layer_map: dict[str, str],
) -> _Differentiated | None:
    """The twin's forward + gradient graph for this stage: forward node names replaced by this
    stage's (`name_map`), the twin's layer names in the other node names (gradient ops) by this
    stage's (`layer_map`, so traces name the right layers), input tensors by this stage's
    (`input_map`). None if the new names are not unique."""

    def op_name(name: str) -> str:
        if name in name_map:
            return name_map[name]
        return graphdefs.renamed_scopes(name, layer_map)

    new_name = {n.name: op_name(n.name) for n in twin.graph_def.node}
    if len(set(new_name.values())) != len(new_name):
        return None
    name_map = new_name

    def tensor(name: str) -> str:
        control = name.startswith("^")
        op, index = graphdefs.split_tensor_name(name.lstrip("^"))
        op = name_map.get(op, op)
        return f"^{op}" if control else f"{op}:{index}"

    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(twin.graph_def)
    for node in graph_def.node:
        node.name = name_map.get(node.name, node.name)
        inputs = [tensor(t) for t in node.input]
        del node.input[:]
        node.input.extend(inputs)
        graphdefs.strip_placement(node)  # colocation attributes name the twin's ops

    def ref(r: GradRef) -> GradRef:
        return GradRef(
            *(tensor(x) if x else None for x in (r.dense, r.indices, r.values, r.dense_shape))
        )

    return _Differentiated(
        graph_def=graph_def,
        tensors=_RenamedTensors(twin.tensors, {b: a for a, b in name_map.items()}),
        forward_names={name_map.get(n, n) for n in twin.forward_names},
        grad_inputs={tensor(t): tensor(ph) for t, ph in twin.grad_inputs.items()},
        loss_grad_input=twin.loss_grad_input and tensor(twin.loss_grad_input),
        input_grads={input_map[t]: tensor(g) for t, g in twin.input_grads.items()},
        variable_grads={name_map.get(v, v): ref(r) for v, r in twin.variable_grads.items()},
        by_layers=twin.by_layers,
    )


def _stage_graph(
    template: Template,
    spec: StageSpec,
    forward_part: graphdefs.Subgraph,
    diff: _Differentiated,
    stack_rows: int | None = None,
    transpose_weights: bool = False,
    row_ops_per_micro_batch: bool = False,
    defer_weights: bool = False,
) -> StageGraph:
    """Split the forward + gradient graph into the forward and backward GraphDefs and their
    functions; with `stack_rows` (the rows of each call), the weight gradients that are sums
    over rows apart (stacked_gradients.py; `row_ops_per_micro_batch`: only their sums over
    rows, see plan_stacking); with `transpose_weights`, forward matmuls read their weights
    transposed (transposed_weights.py); with `defer_weights`, the variable gradients the input
    gradients do not need apart, for W actions (backward_split.split_weight_gradients)."""
    feature_of_tensor = {t: name for name, t in template.features.items()}
    feature_inputs = {
        feature_of_tensor[t]: ph
        for t, ph in forward_part.placeholder_of.items()
        if t in feature_of_tensor
    }
    boundary_inputs = _boundary_inputs(template, forward_part)
    scratch, scratch_def = diff.tensors, diff.graph_def
    grad_inputs, loss_grad_input = diff.grad_inputs, diff.loss_grad_input
    input_grads, variable_grads = diff.input_grads, diff.variable_grads
    forward_names = _with_ancestors(diff.forward_names, scratch_def)
    forward = graph_pb2.GraphDef()
    forward.versions.CopyFrom(scratch_def.versions)
    backward_nodes = []
    for node in scratch_def.node:
        if node.name in forward_names:
            copy = forward.node.add()
            copy.CopyFrom(node)
            graphdefs.strip_placement(copy)
        else:
            backward_nodes.append(node)
    if len(scratch_def.library.function):
        forward.library.CopyFrom(scratch_def.library)
        graphdefs.strip_library_placement(forward.library)
    handle_nodes = {n.name: n for n in forward.node if n.op == "VarHandleOp"}
    backward_part = graphdefs.extract(
        backward_nodes,
        scratch,
        FORWARD_REF_PREFIX,
        keep_outside=handle_nodes,
        library=scratch_def.library if len(scratch_def.library.function) else None,
    )
    backward_variables = tuple(
        n.name for n in backward_part.graph_def.node if n.op == "VarHandleOp"
    )
    # The input nodes (placeholders, variable handles) become function arguments.
    _drop_input_nodes(forward)
    _drop_input_nodes(backward_part.graph_def)
    forward_refs = {ph: t for t, ph in backward_part.placeholder_of.items()}
    spec_of = _SpecLookup(scratch, forward_refs)
    forward_refs = {
        ph: _resource_source(forward, t) if spec_of(t).dtype == tf.resource else t
        for ph, t in forward_refs.items()
    }
    transposed = (
        transposed_weights.transpose_weight_reads(forward, spec.variables)
        if transpose_weights
        else {}
    )
    for t, v in transposed.items():
        spec_of.added[t] = tf.TensorSpec(list(reversed(template.variables[v].shape)), tf.float32)
    forward_inputs = [
        *feature_inputs.values(),
        *boundary_inputs.values(),
        *(f"{v}:0" for v in spec.variables),
        *transposed,
    ]
    forward_function = _stage_function(
        forward,
        "forward",
        spec.index,
        forward_inputs,
        [
            *spec.outputs,
            *([template.loss] if spec.has_loss else []),
            *spec.statistics,  # batch norm's, per micro-batch (graph_rewrite/moving_statistics.py)
            *forward_refs.values(),
        ],
        spec_of,
    )
    backward = backward_part.graph_def
    backward_inputs = [
        *forward_refs,
        *grad_inputs.values(),
        *([loss_grad_input] if loss_grad_input else []),
        *(f"{v}:0" for v in backward_variables),
    ]
    op_of = {n.name: n.op for n in forward.node}
    variable_reads = {
        ph
        for ph, t in forward_refs.items()
        if op_of.get(graphdefs.split_tensor_name(t)[0]) == "ReadVariableOp"
    }
    loss_seed = {loss_grad_input} if loss_grad_input else set()  # the slot's loss scale
    stacking = stack_rows and stacked_gradients.plan_stacking(
        backward,
        input_grads,
        variable_grads,
        stack_rows,
        spec_of,
        set(backward_variables),
        variable_reads | loss_seed,
        row_ops_per_micro_batch,
    )
    weight_gradient_function, weight_outputs = None, []
    deferred_weights = None
    split = defer_weights and backward_split.split_weight_gradients(
        backward,
        input_grads.values(),
        variable_grads,
        can_pass=lambda t: spec_of(t).dtype not in (tf.resource, tf.variant),
    )
    if split:
        backward = split.input_graph_def
        deferred_weights = _deferred_weights(
            split, {v: variable_grads[v] for v in split.variables}, spec.index, spec_of
        )
        deferred_weights = dataclasses.replace(
            deferred_weights,
            forward_bytes=_held_bytes(forward_refs, spec_of, variable_reads),
            input_bytes=_held_bytes(deferred_weights.inputs, spec_of, variable_reads),
        )
        variable_grads = {v: r for v, r in variable_grads.items() if v not in split.variables}
        weight_outputs = list(split.input_results)
    if stacking:
        backward = stacking.input_graph_def
        variable_grads = {v: r for v, r in variable_grads.items() if v not in stacking.variables}
        weight_outputs = list(stacking.backward_row_outputs)
        weight_gradient_function = _stage_function(
            stacking.weight_graph_def,
            "weight_gradients",
            spec.index,
            [*stacking.row_inputs, *stacking.constant_inputs, *stacking.handle_inputs],
            list(stacking.outputs),
            spec_of,
        )
    backward_function = _stage_function(
        backward,
        "backward",
        spec.index,
        backward_inputs,
        _backward_outputs(input_grads, variable_grads, {}) + weight_outputs,
        spec_of,
    )
    running_sum_inputs = {
        v: f"{RUNNING_SUM_PREFIX}/{k}:0"
        for k, (v, ref) in enumerate(variable_grads.items())
        if ref.dense
    }
    running_sum_outputs = {}
    backward_accumulate_function = None
    if running_sum_inputs:
        accumulating, running_sum_outputs = _with_running_sums(
            backward, variable_grads, running_sum_inputs, spec_of
        )
        backward_accumulate_function = _stage_function(
            accumulating,
            "backward_accumulate",
            spec.index,
            backward_inputs + list(running_sum_inputs.values()),
            _backward_outputs(input_grads, variable_grads, running_sum_outputs) + weight_outputs,
            spec_of,
        )
    library = {f.signature.name: f for part in (forward, backward) for f in part.library.function}
    return StageGraph(
        spec=spec,
        forward=forward,
        feature_inputs=feature_inputs,
        boundary_inputs=boundary_inputs,
        forward_variables=tuple(spec.variables),
        loss=template.loss if spec.has_loss else None,
        backward=backward,
        forward_refs=forward_refs,
        backward_variables=backward_variables,
        grad_inputs=grad_inputs,
        loss_grad_input=loss_grad_input,
        input_grads=input_grads,
        variable_grads=variable_grads,
        forward_function=forward_function,
        backward_function=backward_function,
        backward_accumulate_function=backward_accumulate_function,
        running_sum_inputs=running_sum_inputs,
        running_sum_outputs=running_sum_outputs,
        library=tuple(library.values()),
        gradient_twin=diff.twin_of,
        gradient_by_layers=diff.by_layers,
        stacked_gradients=dict(zip(stacking.variables, stacking.outputs)) if stacking else {},
        weight_gradient_function=weight_gradient_function,
        weight_gradient_inputs=stacking.row_inputs if stacking else (),
        weight_gradient_constants=stacking.constant_inputs if stacking else (),
        weight_gradient_variables=tuple(
            graphdefs.split_tensor_name(t)[0] for t in stacking.handle_inputs
        )
        if stacking
        else (),
        transposed_weights=transposed,
        deferred_weights=deferred_weights,
    )


def _deferred_weights(
    split: backward_split.WeightSplit, variable_grads: dict[str, GradRef], stage: int, spec_of
) -> DeferredWeights:
    """The functions of a stage's weight graph, plain and adding to running sums."""
    outputs = _backward_outputs({}, variable_grads, {})
    function = _stage_function(
        split.weight_graph_def, "deferred_weights", stage, split.weight_inputs, outputs, spec_of
    )
    running_sum_inputs = {
        v: f"{WEIGHT_RUNNING_SUM_PREFIX}/{k}:0"
        for k, (v, ref) in enumerate(variable_grads.items())
        if ref.dense
    }
    accumulate_function, running_sum_outputs = None, {}
    if running_sum_inputs:
        accumulating, running_sum_outputs = _with_running_sums(
            split.weight_graph_def,
            variable_grads,
            running_sum_inputs,
            spec_of,
            WEIGHT_ACCUMULATE_SCOPE,
        )
        accumulate_function = _stage_function(
            accumulating,
            "deferred_weights_accumulate",
            stage,
            [*split.weight_inputs, *running_sum_inputs.values()],
            _backward_outputs({}, variable_grads, running_sum_outputs),
            spec_of,
        )
    return DeferredWeights(
        variable_grads=variable_grads,
        inputs=function.inputs,
        function=function,
        accumulate_function=accumulate_function,
        running_sum_inputs=running_sum_inputs,
        running_sum_outputs=running_sum_outputs,
    )


def _held_bytes(tensors, spec_of, variable_reads) -> int:
    """Bytes of `tensors` (names in the stage's GraphDefs) one micro-batch's call holds: static
    shapes only; variable reads (the same buffer for every micro-batch), resources and variants
    count 0."""
    total = 0
    for name in tensors:
        if name in variable_reads:
            continue
        spec = spec_of(name)
        if spec.dtype in (tf.resource, tf.variant) or not spec.shape.is_fully_defined():
            continue
        total += spec.shape.num_elements() * spec.dtype.size
    return total


class _SpecLookup:
    """dtype and static shape of a tensor of the stage's GraphDefs, by name."""

    def __init__(self, scratch: tf.Graph, forward_refs: dict[str, str]):
        self.scratch = scratch
        self.forward_refs = forward_refs
        self.added: dict[str, tf.TensorSpec] = {}

    def __call__(self, name: str) -> tf.TensorSpec:
        name = graphdefs.canonical_tensor_name(name)
        if name in self.added:
            return self.added[name]
        if name in self.forward_refs:
            name = self.forward_refs[name]
        tensor = self.scratch.get_tensor_by_name(name)
        return tf.TensorSpec(tensor.shape, tensor.dtype)


def _stage_function(
    graph_def, kind: str, stage: int, inputs, outputs, spec_of: _SpecLookup
) -> StageFunction:
    """The function of one part of a stage. Inputs that no node reads are left out; outputs
    that are inputs are not returned (the caller has them)."""
    reads = _reads(graph_def)
    names = {n.name for n in graph_def.node}
    produced = {t for t in reads if graphdefs.split_tensor_name(t)[0] in names}
    outside = set(inputs) | (reads - produced)
    inputs = [t for t in dict.fromkeys(inputs) if t in reads]
    outputs = [t for t in dict.fromkeys(outputs) if t not in outside]
    specs = tuple(spec_of(t) for t in outputs)
    function = functions.function_def(
        graph_def,
        functions.function_name("dapple", f"stage{stage}", kind),
        [(t, spec_of(t).dtype) for t in inputs],
        [(t, s.dtype) for t, s in zip(outputs, specs)],
    )
    return StageFunction(function, tuple(inputs), tuple(outputs), specs)


_PASS_THROUGH_OPS = frozenset({"Identity", "IdentityN", "While", "StatelessWhile"})


def _resource_source(graph_def, tensor: str) -> str:
    """The forward input (variable handle or received tensor) that a resource tensor of the
    forward passes through (Identity, While loop variables), so the backward is called with
    that input instead of the forward returning a resource: a function result is placed on the
    call's device, and a resource must stay with its variable."""
    node_by_name = {n.name: n for n in graph_def.node}
    op, index = graphdefs.split_tensor_name(tensor)
    while op in node_by_name:
        node = node_by_name[op]
        if node.op not in _PASS_THROUGH_OPS:
            raise ValueError(
                f"the backward reads resource tensor {tensor!r}, made by "
                f"{node.op} {node.name!r}: only variable handles passed through "
                f"Identity or while loops are supported"
            )
        data_inputs = [i for i in node.input if not i.startswith("^")]
        op, index = graphdefs.split_tensor_name(data_inputs[0 if node.op == "Identity" else index])
    return f"{op}:{index}"


def _backward_outputs(input_grads, variable_grads, running_sum_outputs) -> list[str]:
    """The backward's results: input gradients, then per variable its gradient (its running
    sum where `running_sum_outputs` has one; IndexedSlices as indices, values, dense_shape)."""
    outputs = list(input_grads.values())
    for v, ref in variable_grads.items():
        if ref.dense:
            outputs.append(running_sum_outputs.get(v, ref.dense))
        else:
            outputs += [ref.indices, ref.values, ref.dense_shape]
    return outputs


def _with_running_sums(
    backward, variable_grads, running_sum_inputs, spec_of: _SpecLookup, scope=ACCUMULATE_SCOPE
):
    """A copy of `backward` with an AddV2(running sum input, gradient) per dense variable
    gradient, named `<scope>/<k>`; returns it and variable -> sum tensor."""
    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(backward)
    sum_of = {}
    for k, (v, running_sum) in enumerate(running_sum_inputs.items()):
        grad = variable_grads[v].dense
        spec = spec_of(grad)
        node = graph_def.node.add()
        node.name = f"{scope}/{k}"
        node.op = "AddV2"
        node.input.extend([running_sum, grad])
        node.attr["T"].type = spec.dtype.as_datatype_enum
        sum_of[v] = f"{node.name}:0"
        spec_of.added[running_sum] = spec
        spec_of.added[sum_of[v]] = spec
    return graph_def, sum_of


def _with_ancestors(names: set[str], graph_def) -> set[str]:
    """`names` plus every node they read from. Gradients of while_v2 add inputs (accumulators)
    to the forward While op; those belong to the forward part."""
    node_by_name = {n.name: n for n in graph_def.node}
    closed = set(names)
    stack = list(names)
    while stack:
        for name in node_by_name[stack.pop()].input:
            op = graphdefs.split_tensor_name(name.lstrip("^"))[0]
            if op not in closed:
                closed.add(op)
                stack.append(op)
    return closed


def _drop_input_nodes(graph_def) -> None:
    for k in reversed(
        [k for k, n in enumerate(graph_def.node) if n.op in ("Placeholder", "VarHandleOp")]
    ):
        del graph_def.node[k]


def _reads(graph_def) -> frozenset[str]:
    return frozenset(
        graphdefs.canonical_tensor_name(name)
        for node in graph_def.node
        for name in node.input
        if not name.startswith("^")
    )
