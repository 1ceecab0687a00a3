"""`rewrite(template, plan, ...)`: run the passes in order and return the training graph.

Passes (one module each): partition -> stage_graph (differentiate each distinct stage once;
its forward and backward become library functions) -> place -> variables -> clone (one call
per micro-batch and slot) + boundary, built in the schedule's simulated execution order so each
action's start ops are created under a control dependency on the end op of the previous action
on its device (its slot's; under interleaved-1f1b, of any of the device's slots: the device
follows its group's list) -> accumulate (per slot, over micro-batches, inside the backward
calls) -> allreduce (over a stage's replicas, then over the stages of tied variables) -> clip ->
one optimizer apply. Under pipedream-2bw (weight_versions.py) every call reads each trainable
variable's previous weights instead, and the apply waits for the copy of the variables into
them.

An action's start ops: its recv ops and, for a forward, the IdentityN gating the micro-batch's
feature rows (`dapple/mb<i>/s<s>r<k>/features`); for the last stage's backward, the loss
gradient seed (`.../loss_grad`); for a W action (zb-h1), its call `.../wgrad` itself. Its end
op: a NoOp `dapple/mb<i>/s<s>r<k>/F_end|B_end|I_end|W_end` after its send ops (and loss /
variable gradients / call). So the executor runs each device's actions in list order, and
nothing of action k+1 that depends on its inputs starts before action k ended.

Split backwards (zb-h1): I(i) is the backward call as for B, without the weight gradients the
input gradients do not need (`StageGraph.deferred_weights`); W(i) calls those on micro-batch i's
tensors of the I(i) call and adds them to the slot's running sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

import tensorflow as tf

from planner import schedules
from planner.plan_format import Plan

from . import clone, functions, graphdefs, transposed_weights, variables, weight_versions
from .moving_statistics import moving_statistics_updates
from .accumulate import SlotAccumulator
from .allreduce import GradientSync, LocalGradientSync
from .boundary import ROWS, WHOLE, BoundaryTransfer, LocalTransport, Transport, identity_n
from .partition import StageSpec, partition
from .place import Slot, all_slots, slot_devices, variable_devices
from .schedule import Action, plan_schedule, zero_bubble_held_back
from .stage_graph import StageGraph, build_stage_graphs, is_differentiable
from .template import Template

v1 = tf.compat.v1

FEATURE_PREFIX = "dapple/features"


@dataclasses.dataclass
class TrainingGraph:
    graph: tf.Graph
    plan: Plan
    features: dict[str, tf.Tensor]  # placeholders of the features local slots read
    feature_rows: dict[str, tuple[tuple[int, int], ...]]  # each one's global rows, in order
    loss: tf.Tensor  # global-batch mean loss (sum of scaled clone losses)
    train_op: tf.Operation
    variables: dict[str, tf.Variable]  # model variables by single-device name
    global_step: tf.Variable
    optimizer: object
    gradients: dict[str, object]  # variable -> final gradient (after sync, clipping)
    schedule: list[list[Action]]  # per device group (graph_rewrite/schedule.py)
    device_of_slot: dict[Slot, str]
    device_of_variable: dict[str, str]
    local_slots: tuple[Slot, ...]
    start_ops: dict[tuple[Slot, Action], list[tf.Operation]]
    end_ops: dict[tuple[Slot, Action], tf.Operation]
    stage_graphs: list[StageGraph | None]  # by stage; None where no slot of it is local
    phase_seconds: dict[str, float]  # wall time of each phase of the rewrite
    # pipedream-2bw (graph_rewrite/weight_versions.py): variable -> its previous weights, which
    # the step's calls read; and the op setting them to the variables' values (W(-1) = W(0):
    # the trainer runs it once the variables hold their initial values). Empty / None otherwise.
    previous_weights: dict[str, tf.Variable] = dataclasses.field(default_factory=dict)
    reset_previous_weights: tf.Operation | None = None


def rewrite(
    template: Template,
    plan: Plan,
    optimizer_fn: Callable[[], object],
    *,
    device_name: Callable[[int], str],
    clip_norm: float | None = None,
    local_slots: Iterable[Slot] | None = None,
    transport: Transport | None = None,
    gradient_sync: GradientSync | None = None,
    input_fn: Callable[[dict], object] | None = None,
    stack_weight_gradients: bool = False,
    bound_zero_bubble_memory: bool = False,
) -> TrainingGraph:
    """Build the training graph of the slots in `local_slots` (default: all, one process).
    `device_name` maps a plan device id to a device string of this process. The features are
    placeholders of the rows the local slots read (`TrainingGraph.feature_rows`); given
    `input_fn(feature_rows) -> tf.data.Dataset` (one element per step: a dict of those rows of
    each feature), they default to the dataset's next element (prefetched).
    `stack_weight_gradients`: compute each slot's weight gradients that are sums over rows once
    per step, after its last backward, over the stacked rows of all its micro-batches
    (graph_rewrite/stacked_gradients.py); their inputs stay alive until then. Not with a
    schedule that splits backwards into I and W (zb-h1): its W actions compute the weight
    gradients the input gradients do not need, once per micro-batch, where the schedule puts
    them (`StageGraph.deferred_weights`). `bound_zero_bubble_memory`: zb-h1 holds back on
    each stage only as many W's as keep its bytes within 1F1B's peak
    (`schedule.zero_bubble_held_back`), instead of the paper's s on stage s."""
    clock = PhaseClock()
    pipeline_schedule = plan_schedule(plan)
    defer_weights = any(a.kind == "W" for actions in pipeline_schedule.lists for a in actions)
    if defer_weights and stack_weight_gradients:
        raise ValueError(
            f"stack_weight_gradients=True computes weight gradients once per step after a "
            f"slot's last backward; schedule '{plan.schedule}' computes them in its W actions, "
            f"one per micro-batch, where its order puts them: use one or the other"
        )
    specs = partition(template, plan)
    two_weight_versions = schedules.weight_versions(plan.schedule) == 2
    if two_weight_versions:
        _check_two_weight_versions(plan, specs)
    local = tuple(sorted(local_slots)) if local_slots is not None else tuple(all_slots(plan))
    device_of_slot = slot_devices(plan, device_name)
    rows_of_stage = [plan.micro_batch_size // stage.num_replicas for stage in plan.stages]
    stage_graphs = build_stage_graphs(
        template,
        specs,
        rows_of_stage,
        stages={slot.stage for slot in local},
        stack_weight_gradients=stack_weight_gradients and plan.num_micro_batches > 1,
        transposed_stages=frozenset(
            slot.stage
            for slot in local
            if transposed_weights.prefers_transposed_weights(
                device_of_slot[slot], rows_of_stage[slot.stage]
            )
        ),
        defer_weight_gradients=defer_weights,
    )
    if defer_weights and bound_zero_bubble_memory:  # zb-h1 within 1F1B's peak memory
        pipeline_schedule = plan_schedule(plan, zero_bubble_held_back(plan, stage_graphs))
    transport = transport or LocalTransport(device_of_slot)
    gradient_sync = gradient_sync or LocalGradientSync()
    builder = _Builder(
        template, plan, specs, stage_graphs, device_of_slot, local, transport, input_fn
    )
    graph = tf.Graph()
    functions.register(
        graph, [f for stage in stage_graphs if stage is not None for f in stage.functions()]
    )
    clock.mark("partition + stage functions")
    with graph.as_default():
        builder.create_inputs_and_variables()
        reset_previous_weights = None
        if two_weight_versions:
            reset_previous_weights = builder.create_previous_weights()
        clock.mark("variables")
        for action in pipeline_schedule.build_order:
            for slot in local:
                if slot.stage == action.stage:
                    builder.build_action(slot, action)
        clock.mark("clones, boundaries, schedule")
        gradients = builder.final_gradients(clip_norm, gradient_sync)
        loss = builder.global_loss()
        clock.mark("gradient sums")
        train_op, optimizer, global_step = builder.apply(optimizer_fn, gradients)
        clock.mark("optimizer apply_gradients")
        train_op = builder.with_moving_statistics(train_op, gradient_sync)
    return TrainingGraph(
        graph=graph,
        plan=plan,
        features=builder.features,
        feature_rows=builder.feature_rows,
        loss=loss,
        train_op=train_op,
        variables=builder.variables,
        global_step=global_step,
        optimizer=optimizer,
        gradients=gradients,
        schedule=pipeline_schedule.lists,
        device_of_slot=device_of_slot,
        device_of_variable=builder.device_of_variable,
        local_slots=local,
        start_ops=builder.start_ops,
        end_ops=builder.end_ops,
        stage_graphs=stage_graphs,
        phase_seconds=clock.seconds,
        previous_weights=builder.previous_weights,
        reset_previous_weights=reset_previous_weights,
    )


def _check_two_weight_versions(plan: Plan, specs: list[StageSpec]) -> None:
    """pipedream-2bw keeps two versions of the trainable weights only: refuse moving
    statistics (batch norm), whose update rule under it is not defined."""
    moving = sorted({v for spec in specs for v in spec.moving_variables})
    if moving:
        raise ValueError(
            f"schedule '{plan.schedule}' does not support moving statistics (batch norm's "
            f"UPDATE_OPS) yet; the model updates {moving[:4]}"
            f"{' ...' if len(moving) > 4 else ''}: use a synchronous schedule"
        )


class PhaseClock:
    """Wall time of each phase of one build (TrainingGraph.phase_seconds for a rewrite, for logs
    and bench/bench_rewriter.py; Trainer.setup_seconds for a trainer's set-up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


class _Builder:
    def __init__(
        self,
        template: Template,
        plan: Plan,
        specs: list[StageSpec],
        stage_graphs: list[StageGraph],
        device_of_slot,
        local,
        transport,
        input_fn=None,
    ):
        self.template, self.plan, self.specs = template, plan, specs
        self.input_fn = input_fn
        self.stage_graphs = stage_graphs
        self.device_of_slot = device_of_slot
        self.local = local
        self.transport = transport
        self.device_of_variable = variable_devices(specs, local, device_of_slot)
        self.features: dict[str, tf.Tensor] = {}
        self.feature_rows: dict[str, tuple[tuple[int, int], ...]] = {}
        self.variables: dict[str, tf.Variable] = {}
        # pipedream-2bw: variable -> the previous weights the step's calls read in its place
        self.previous_weights: dict[str, tf.Variable] = {}
        self.forward_tensors: dict[tuple[Slot, int], dict[str, tf.Tensor]] = {}
        self.forward_transfers: dict[tuple[int, int, int], BoundaryTransfer] = {}
        self.backward_transfers: dict[tuple[int, int, int], BoundaryTransfer] = {}
        self.accumulators = {
            slot: SlotAccumulator(f"dapple/accumulate/{slot.tag}") for slot in local
        }
        self.scaled_losses: list[tf.Tensor] = []
        # slot -> its forwards' batch-norm statistics, in micro-batch order
        self.statistics: dict[Slot, list[dict[str, tf.Tensor]]] = {}
        # slot -> per finished backward: its inputs of the stacked weight gradients
        self.weight_gradient_rows: dict[Slot, list[dict[str, tf.Tensor]]] = {
            slot: [] for slot in local
        }
        # (slot, micro-batch) -> its backward's inputs of the W call still to come
        self.deferred_inputs: dict[tuple[Slot, int], dict[str, tf.Tensor]] = {}
        self.start_ops: dict = {}
        self.end_ops: dict = {}
        # plan device id -> end op of the last action built on it
        self.last_end: dict[int, tf.Operation] = {}
        # every forward, backward and W call of the step, in build order: the variable updates
        # wait for all of them (see `apply`)
        self.stage_calls: list[tf.Operation] = []
        self.transposed: dict[Slot, dict[str, tf.Tensor]] = {}

    # ---- inputs and variables -------------------------------------------------------------
    def create_inputs_and_variables(self):
        holds_loss = any(slot.stage == self.plan.num_stages - 1 for slot in self.local)
        whole = (
            self._denominator_features()
            if self.template.loss_denominator is not None and holds_loss
            else ()
        )
        self.feature_rows = local_feature_rows(self.plan, self.specs, self.local, whole)
        from_dataset = self._dataset_features() if self.input_fn is not None else {}
        for name, rows in self.feature_rows.items():
            shape, dtype = self.template.feature_spec[name]
            full_shape = [sum(hi - lo for lo, hi in rows)] + list(shape)
            if name in from_dataset:
                self.features[name] = v1.placeholder_with_default(
                    from_dataset[name], full_shape, name=f"{FEATURE_PREFIX}/{name}"
                )
            else:
                self.features[name] = v1.placeholder(
                    dtype, full_shape, name=f"{FEATURE_PREFIX}/{name}"
                )
        self.variables = variables.create_variables(
            {
                name: (info.shape, info.dtype, info.trainable, self.device_of_variable[name])
                for name, info in self.template.variables.items()
                if name in self.device_of_variable
            },
            tf.compat.v1.get_default_graph(),
        )
        self.global_denominator = None
        if self.template.loss_denominator is not None and any(
            slot.stage == self.plan.num_stages - 1 for slot in self.local
        ):
            self.global_denominator = self._global_denominator()

    def create_previous_weights(self) -> tf.Operation:
        """pipedream-2bw: create each trainable variable's previous weights, which every call
        of the step reads instead of it (graph_rewrite/weight_versions.py); return the op
        setting them to the variables' values."""
        self.previous_weights = weight_versions.create_previous_weights(
            self.variables, tf.compat.v1.get_default_graph()
        )
        return weight_versions.copy_to_previous_weights(
            self.previous_weights, self.variables, [], "dapple/reset_previous_weights"
        )

    def _weights_read(self, name: str) -> tf.Variable:
        """The variable the step's calls read for `name`: its previous weights under
        pipedream-2bw, else itself."""
        return self.previous_weights.get(name, self.variables[name])

    def _denominator_features(self) -> tuple[str, ...]:
        """The features a WeightedLoss's denominator reads: the last stage needs all their rows
        (the denominator is over the whole global batch)."""
        cone = _ancestors(self.template.graph.get_tensor_by_name(self.template.loss_denominator).op)
        return tuple(name for name, t in self.template.features.items() if t.split(":")[0] in cone)

    def _global_denominator(self) -> tf.Tensor:
        """A WeightedLoss's denominator on the whole global batch: its ops (features only, no
        variables) imported once, reading the global feature placeholders."""
        template = self.template
        graph = template.graph
        feature_ops = {t.split(":")[0]: name for name, t in template.features.items()}
        cone = _ancestors(graph.get_tensor_by_name(template.loss_denominator).op)
        part = graphdefs.extract(
            [n for n in graph.as_graph_def().node if n.name in cone and n.name not in feature_ops],
            graph,
            "dapple_denominator_in",
        )
        input_map = {
            ph: self.features[feature_ops[t.split(":")[0]]] for t, ph in part.placeholder_of.items()
        }
        last = [s for s in self.local if s.stage == self.plan.num_stages - 1][0]
        with tf.device(self.device_of_slot[last]):
            (denominator,) = tf.graph_util.import_graph_def(
                part.graph_def,
                input_map=input_map,
                return_elements=[template.loss_denominator],
                name="dapple/loss_denominator",
            )
        return denominator

    def _dataset_features(self) -> dict[str, tf.Tensor]:
        """The next element of `input_fn(feature_rows)`, prefetched, checked against the rows."""
        with tf.device(self.device_of_slot[self.local[0]].replace("GPU", "CPU")):
            dataset = self.input_fn(dict(self.feature_rows)).prefetch(2)
            element = v1.data.make_one_shot_iterator(dataset).get_next(name="dapple/input")
        if not isinstance(element, dict) or set(element) < set(self.feature_rows):
            raise ValueError(
                f"input_fn must return a dataset of dicts holding the features "
                f"{sorted(self.feature_rows)}; its elements are {element!r}"
            )
        out = {}
        for name, rows in self.feature_rows.items():
            count = sum(hi - lo for lo, hi in rows)
            shape, dtype = self.template.feature_spec[name]
            tensor = element[name]
            expected = tf.TensorShape([count] + list(shape))
            if tensor.dtype != dtype or not tensor.shape.is_compatible_with(expected):
                raise ValueError(
                    f"input_fn's feature '{name}' is {tensor.dtype.name}"
                    f"{tensor.shape}, expected {tf.as_dtype(dtype).name}{expected} "
                    f"(this process's rows {list(rows)} of each global batch)"
                )
            out[name] = tf.cast(tensor, dtype)
        return out

    # ---- one action of one slot -----------------------------------------------------------
    def build_action(self, slot: Slot, action: Action):
        """Build `action` of `slot` after the previous action on the slot's device: the
        device's chain follows its group's list, which under interleaved-1f1b mixes the
        actions of the group's stages."""
        kind, i = action.kind, action.micro_batch
        device_id = self.plan.stages[slot.stage].devices[slot.replica]
        previous = self.last_end.get(device_id)
        deps = [previous] if previous is not None else []
        if kind == "F":
            start, end = self._forward(slot, i, deps)
        elif kind == "W":
            start, end = self._deferred_weights(slot, i, deps)
        else:  # B, or I: the backward without its deferred weight gradients
            start, end = self._backward(slot, i, deps, kind)
        self.start_ops[(slot, action)] = start
        self.end_ops[(slot, action)] = end
        self.last_end[device_id] = end

    def _forward(self, slot: Slot, i: int, deps):
        stage = self.stage_graphs[slot.stage]
        spec = stage.spec
        device = self.device_of_slot[slot]
        prefix = clone.clone_prefix(i, slot.tag)
        start_ops, received = [], {}
        with tf.control_dependencies(deps):
            for a in spec.source_stages:
                transfer = self._forward_transfer(i, a, slot.stage)  # sender may be remote
                tensors = transfer.recv(slot.replica)
                start_ops.append(tensors[0].op)
                received.update(zip(transfer.tensors, tensors))
            features = {}
            if spec.features:
                with tf.device(device), tf.name_scope(prefix + "/"):
                    sliced = []
                    for f in spec.features:
                        lo, hi = self._feature_rows(slot, i, f)
                        sliced.append(self.features[f][lo:hi])
                    gated = identity_n(sliced, f"{prefix}/features")
                start_ops.append(gated[0].op)
                features = dict(zip(spec.features, gated))
            for t, value in spec.derived_inputs.items():  # shape-derived: this clone's value
                with tf.device(device):
                    received[t] = tf.constant(value, name=f"{prefix}/derived")
        handles = {v: self._weights_read(v).handle for v in spec.variables}
        tensors, call = clone.call_forward(
            stage, device, prefix, features, received, handles, self._transposed_weights(slot)
        )
        self.stage_calls.append(call)
        self.forward_tensors[(slot, i)] = tensors
        if spec.moving_updates:
            self.statistics.setdefault(slot, []).append({t: tensors[t] for t in spec.statistics})
        end_deps = []
        for b in spec.consumer_stages:
            transfer = self._forward_transfer(i, slot.stage, b)
            with self._gated_sends(end_deps):
                end_deps.append(transfer.send(slot.replica, [tensors[t] for t in transfer.tensors]))
        if spec.has_loss:
            with tf.device(device), tf.name_scope(prefix + "/"):
                loss = tensors[stage.loss]
                scaled = tf.multiply(loss, self._loss_scale(slot, loss.dtype), name="scaled_loss")
            self.scaled_losses.append(scaled)
            end_deps.append(scaled.op)
        with tf.device(device):
            end = tf.group(*end_deps, name=f"{prefix}/F_end")
        return start_ops, end

    def _transposed_weights(self, slot: Slot) -> dict[str, tf.Tensor]:
        """variable -> its value transposed, read once per step for all of the slot's forwards
        (graph_rewrite/transposed_weights.py); made at the slot's first forward."""
        if slot not in self.transposed:
            names = self.stage_graphs[slot.stage].transposed_weights.values()
            with tf.control_dependencies(None), tf.device(self.device_of_slot[slot]):
                self.transposed[slot] = {
                    v: tf.transpose(
                        self._weights_read(v).value(), name=f"dapple/transposed/{slot.tag}/{v}"
                    )
                    for v in names
                }
        return self.transposed[slot]

    def _backward(self, slot: Slot, i: int, deps, kind: str = "B"):
        stage = self.stage_graphs[slot.stage]
        spec = stage.spec
        device = self.device_of_slot[slot]
        prefix = clone.clone_prefix(i, slot.tag)
        forward = self.forward_tensors.pop((slot, i))
        start_ops = []
        grads_in: dict[str, list[tf.Tensor]] = {}
        loss_grad = None
        with tf.control_dependencies(deps):
            for b in spec.consumer_stages:
                transfer = self._backward_transfer(i, b, slot.stage)  # sender may be remote
                if not transfer.tensors:
                    continue
                tensors = transfer.recv(slot.replica, like=[forward[t] for t in transfer.tensors])
                start_ops.append(tensors[0].op)
                for t, g in zip(transfer.tensors, tensors):
                    grads_in.setdefault(t, []).append(g)
            if spec.has_loss:
                with tf.device(device):
                    loss_grad = tf.identity(
                        self._loss_scale(slot, forward[stage.loss].dtype),
                        name=f"{prefix}/loss_grad",
                    )
                start_ops.append(loss_grad.op)
        with tf.device(device), tf.name_scope(prefix + "/"):
            grad_inputs = {t: (g[0] if len(g) == 1 else tf.add_n(g)) for t, g in grads_in.items()}
        handles = {v: self._weights_read(v).handle for v in spec.variables}
        accumulator = self.accumulators[slot]
        backward = clone.call_backward(
            stage,
            device,
            prefix,
            forward,
            grad_inputs,
            loss_grad,
            handles,
            accumulator.running_sums(),
            call_name="igrad" if kind == "I" else "bwd",
        )
        self.stage_calls.append(backward.op)
        for v, g in backward.variable_grads.items():
            accumulator.update(v, g)
        # The call itself, also where no running sum or send reads it (stacked weight
        # gradients of a first stage): the next action must wait for this backward's compute.
        # And the start ops, also where the call does not read them (a first stage's I, whose
        # whole backward is deferred to W): the action ends only once its gradients arrived.
        end_deps = [backward.op, *start_ops]
        for a in spec.source_stages:
            transfer = self._backward_transfer(i, slot.stage, a)
            if transfer.tensors:
                with self._gated_sends(end_deps):
                    end_deps.append(
                        transfer.send(
                            slot.replica, [backward.input_grads[t] for t in transfer.tensors]
                        )
                    )
        with tf.device(device):
            end = tf.group(*end_deps, name=f"{prefix}/{kind}_end")
        if stage.deferred_weights is not None:
            self.deferred_inputs[(slot, i)] = backward.weight_inputs
        elif stage.weight_gradient_function is not None:
            self._stack_weight_gradients(slot, backward.weight_inputs, handles, end)
        return start_ops, end

    def _deferred_weights(self, slot: Slot, i: int, deps):
        """W(i): the stage's deferred weight gradients of micro-batch i, one call on the tensors
        of its backward call (I(i)), added to the slot's running sums. The call is the action's
        start op: created under the control dependency, it waits for the previous action's end
        (inlined, every op of its body does). A stage whose backward defers nothing has an
        empty W: its end op only passes the order on."""
        stage = self.stage_graphs[slot.stage]
        device = self.device_of_slot[slot]
        prefix = clone.clone_prefix(i, slot.tag)
        inputs = self.deferred_inputs.pop((slot, i), None)
        if stage.deferred_weights is None:
            with tf.device(device), tf.control_dependencies(deps):
                return [], tf.no_op(name=f"{prefix}/W_end")
        accumulator = self.accumulators[slot]
        with tf.control_dependencies(deps):
            call = clone.call_deferred_weights(
                stage, device, prefix, inputs, accumulator.running_sums()
            )
        self.stage_calls.append(call.op)
        for v, g in call.variable_grads.items():
            accumulator.update(v, g)
        with tf.device(device):
            end = tf.group(call.op, name=f"{prefix}/W_end")
        return [call.op], end

    def _stack_weight_gradients(
        self, slot: Slot, weight_inputs: dict[str, tf.Tensor], handles, backward_end: tf.Operation
    ):
        """Record one backward's weight-gradient inputs; after the slot's last backward has
        ended (its input gradients sent: the previous stage waits for them, not for these),
        call the stage's weight-gradient function once on all of them stacked (micro-batch
        order)."""
        rows = self.weight_gradient_rows[slot]
        rows.append(weight_inputs)
        if len(rows) < self.plan.num_micro_batches:
            return
        stage = self.stage_graphs[slot.stage]
        device = self.device_of_slot[slot]
        scope = f"{self.accumulators[slot].scope}/weight_gradients"
        with tf.device(device), tf.name_scope(scope + "/"), tf.control_dependencies([backward_end]):
            stacked = {
                t: tf.concat([r[t] for r in rows], 0, name=f"rows_{k}")
                for k, t in enumerate(stage.weight_gradient_inputs)
            }
        stacked.update((t, rows[-1][t]) for t in stage.weight_gradient_constants)
        grads = clone.call_weight_gradients(stage, device, f"{scope}/call", stacked, handles)
        for v, g in grads.items():
            self.accumulators[slot].update(v, g)

    @contextlib.contextmanager
    def _gated_sends(self, end_deps: list):
        """Add the cross-rank sending ops created inside to `end_deps` when the transport asks
        for it (`gate_on_sends`): the action then ends only once its sends ran. An executor
        with few threads otherwise runs the next action's compute first and sends late."""
        outgoing = getattr(self.transport, "outgoing", None)
        before = len(outgoing) if outgoing is not None else 0
        yield
        if outgoing is not None and getattr(self.transport, "gate_on_sends", False):
            end_deps.extend(t.op for t in outgoing[before:])

    def _forward_transfer(self, i, a, b) -> BoundaryTransfer:
        key = (i, a, b)
        if key not in self.forward_transfers:
            tensors = self.specs[b].inputs_from(a)
            self.forward_transfers[key] = BoundaryTransfer(
                i,
                a,
                b,
                tensors,
                self._modes(tensors),
                self._specs(tensors),
                self.plan,
                self.transport,
                row_factors=self._row_factors(tensors),
            )
        return self.forward_transfers[key]

    def _backward_transfer(self, i, b, a) -> BoundaryTransfer:
        """Gradients of the differentiable tensors stage a sent to stage b, from b back to a."""
        key = (i, b, a)
        if key not in self.backward_transfers:
            graph = self.template.graph
            tensors = tuple(
                t
                for t in self.specs[b].inputs_from(a)
                if is_differentiable(graph.get_tensor_by_name(t).dtype)
            )
            self.backward_transfers[key] = BoundaryTransfer(
                i,
                b,
                a,
                tensors,
                self._modes(tensors),
                self._specs(tensors),
                self.plan,
                self.transport,
                gradient=True,
                row_factors=self._row_factors(tensors),
            )
        return self.backward_transfers[key]

    def _modes(self, tensors):
        return tuple(ROWS if t in self.template.batch_tensors else WHOLE for t in tensors)

    def _row_factors(self, tensors):
        return tuple(self.template.row_factor.get(t, 1) for t in tensors)

    def _specs(self, tensors):
        specs = []
        for t in tensors:
            tensor = self.template.graph.get_tensor_by_name(t)
            shape = tensor.shape[1:] if t in self.template.batch_tensors else tensor.shape
            specs.append(tf.TensorSpec(shape, tensor.dtype))
        return tuple(specs)

    def _feature_rows(self, slot: Slot, i: int, feature: str) -> tuple[int, int]:
        """Where micro-batch i's rows of `slot` lie in the placeholder of `feature`."""
        lo, hi = self.plan.rows_of_replica(slot.stage, slot.replica)
        base = i * self.plan.micro_batch_size
        return _local_offset(self.feature_rows[feature], base + lo), _local_offset(
            self.feature_rows[feature], base + hi - 1
        ) + 1

    def _loss_scale(self, slot: Slot, dtype) -> tf.Tensor:
        """What a clone's loss counts for in the global loss (and its gradient seed): its rows'
        share of the global batch for a mean loss; 1 / the global denominator for a
        WeightedLoss, whose numerator is a sum."""
        if self.global_denominator is not None:
            return tf.math.reciprocal(tf.cast(self.global_denominator, dtype))
        lo, hi = self.plan.rows_of_replica(slot.stage, slot.replica)
        return tf.constant((hi - lo) / self.plan.global_batch_size, dtype)

    # ---- gradients and the update ---------------------------------------------------------
    def final_gradients(self, clip_norm, gradient_sync: GradientSync) -> dict:
        """variable -> its gradient for the update: summed over micro-batches, replicas and
        the stages reading it, clipped by the global norm; trainable variables in template
        order."""
        per_stage: dict[int, dict[int, dict]] = {}
        for slot in self.local:
            with tf.device(self.device_of_slot[slot]):
                summed = self.accumulators[slot].result()
            per_stage.setdefault(slot.stage, {})[slot.replica] = summed
        by_stage = {
            s: gradient_sync.sum_replicas(s, replicas, self.device_of_variable)
            for s, replicas in per_stage.items()
        }
        final = gradient_sync.sum_stages(by_stage, self.device_of_variable)
        order = [
            v
            for v in self.template.variables
            if v in final and self.template.variables[v].trainable
        ]
        grads = [final[v] for v in order]
        if clip_norm is not None:
            with tf.name_scope("dapple/clip"):
                norm = gradient_sync.global_norm(dict(zip(order, grads)))
                grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=norm)
        return dict(zip(order, grads))

    def apply(self, optimizer_fn, gradients: dict):
        """One `apply_gradients` of the user's optimizer, with `global_step`."""
        first_device = self.device_of_slot[self.local[0]]
        with tf.device(first_device):
            global_step = v1.train.get_or_create_global_step()
        optimizer = optimizer_fn()
        with self._after_every_stage_call(), self._after_copying_previous_weights(gradients):
            train_op = optimizer.apply_gradients(
                [(g, self.variables[v]) for v, g in gradients.items()], global_step=global_step
            )
        return train_op, optimizer, global_step

    def _after_copying_previous_weights(self, gradients: dict):
        """pipedream-2bw: control dependencies on the copy of W(t) into the previous weights,
        made after every call of the step and the final gradients (every read of W(t-1),
        also a stacked weight-gradient call's); the update writes W(t+1) only after it. No
        dependencies otherwise."""
        if not self.previous_weights:
            return contextlib.nullcontext()
        gradient_ops = [
            (g.values if isinstance(g, tf.IndexedSlices) else g).op for g in gradients.values()
        ]
        copied = weight_versions.copy_to_previous_weights(
            self.previous_weights,
            self.variables,
            self.stage_calls + gradient_ops,
            "dapple/copy_previous_weights",
        )
        return tf.control_dependencies([copied])

    def _after_every_stage_call(self):
        """Control dependencies on every forward and backward call of the step, for the ops
        that write variables. A call may read a variable for a result the update does not
        wait for: a forward's read of a weight that only its backward uses (the forward's
        matmul reads the transposed copy, graph_rewrite/transposed_weights.py), a backward's
        read for the gradient it sends to the previous stage. Updates run in place, so such a
        read that ran after the update would compute with the next step's weights (seen: the
        first layer's gradient off by up to 5.7e-4 in 3 of 399 five-step runs on a loaded
        machine; tests/test_variable_update_order.py). A control edge from a call waits for all its
        results (graph_rewrite/functions.py), and every read whose value matters feeds one of them."""
        return tf.control_dependencies(self.stage_calls)

    def with_moving_statistics(self, train_op, gradient_sync: GradientSync):
        """`train_op` grouped with the local stages' batch-norm updates, evaluated once per step
        on the global batch's statistics (graph_rewrite/moving_statistics.py)."""
        with self._after_every_stage_call():
            updates = moving_statistics_updates(
                self.template,
                self.plan,
                self.specs,
                self.statistics,
                self.variables,
                self.device_of_variable,
                gradient_sync,
            )
        if not updates:
            return train_op
        return tf.group(train_op, *updates, name="dapple/train_and_update_moving_statistics")

    def global_loss(self) -> tf.Tensor:
        if not self.scaled_losses:
            return tf.constant(float("nan"), name="dapple/loss")  # no last-stage slot here
        last = [s for s in self.local if s.stage == self.plan.num_stages - 1][0]
        with tf.device(self.device_of_slot[last]):
            return tf.add_n(self.scaled_losses, name="dapple/loss")


def local_feature_rows(
    plan: Plan, specs: list[StageSpec], local: Iterable[Slot], whole: Iterable[str] = ()
) -> dict[str, tuple[tuple[int, int], ...]]:
    """Feature -> the global-batch rows the local slots read of it, as sorted, merged [lo, hi)
    ranges (features no local slot reads are left out). A rank holding one slot of the first
    stage gets its input rows, one of the last stage its label rows, a middle stage none (under
    interleaved-1f1b a rank's slots may include both); one process holding every slot gets the
    whole batch. Features in `whole` are read whole (e.g.
    the weights a WeightedLoss's global denominator sums)."""
    ranges: dict[str, list[tuple[int, int]]] = {f: [(0, plan.global_batch_size)] for f in whole}
    b = plan.micro_batch_size
    for slot in local:
        lo, hi = plan.rows_of_replica(slot.stage, slot.replica)
        for feature in specs[slot.stage].features:
            ranges.setdefault(feature, []).extend(
                (i * b + lo, i * b + hi) for i in range(plan.num_micro_batches)
            )
    out = {}
    for feature, parts in ranges.items():
        merged: list[list[int]] = []
        for lo, hi in sorted(parts):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out[feature] = tuple((lo, hi) for lo, hi in merged)
    return out


def _local_offset(rows: tuple[tuple[int, int], ...], global_row: int) -> int:
    """Position of `global_row` among the rows of `rows` (which must hold it)."""
    before = 0
    for lo, hi in rows:
        if lo <= global_row < hi:
            return before + global_row - lo
        before += hi - lo
    raise ValueError(f"row {global_row} is not among the local rows {rows}")


def _ancestors(op: tf.Operation) -> set[str]:
    seen, stack = {op.name}, [op]
    while stack:
        for t in stack.pop().inputs:
            if t.op.name not in seen:
                seen.add(t.op.name)
                stack.append(t.op)
    return seen
