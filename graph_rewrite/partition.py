"""Partition: which stage every template op belongs to, and what crosses each stage boundary.

A tensor crossing a boundary is sent whole (it does not depend on the batch), or split by row
ranges (its first dimension is k x rows: k = 1 for [batch, ...], k = seq for a flattened
[batch * seq, ...]; `Template.row_factor`), or, if it depends on the batch through shapes only
(`tf.shape(x)[0]`, a batch size scalar), recomputed: the receiving stage gets the value it has
for that stage's rows per clone (`StageSpec.derived_inputs`), never the global batch's. Any other
batch tensor is refused, naming it, its shape and the layers on each side.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.plan_format import Plan, PlanError

from .template import Template, shape_only_cone, values_at_rows


class PartitionError(PlanError):
    """The plan's stage split cannot run this model (e.g. data flowing backwards)."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    index: int
    layers: tuple[str, ...]
    ops: tuple[str, ...]  # template op names, topological order
    inputs: tuple[str, ...]  # tensors received from earlier stages
    input_source: dict[str, int]  # input tensor -> producing stage
    outputs: tuple[str, ...]  # tensors sent to later stages
    output_consumers: dict[str, tuple[int, ...]]
    features: tuple[str, ...]  # feature names this stage reads
    variables: tuple[str, ...]  # variables this stage reads
    has_loss: bool
    # batch-shape-derived tensors of earlier stages, as constants for this stage's clone rows
    derived_inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # batch norm: the statistics each forward returns (graph_rewrite/batch_norm.py), the
    # moving-statistics updates evaluated once per step (assign op names) and their variables
    statistics: tuple[str, ...] = ()
    moving_updates: tuple[str, ...] = ()
    moving_variables: tuple[str, ...] = ()

    @property
    def held_variables(self) -> tuple[str, ...]:
        """The variables a replica of this stage holds: those it reads, then the moving
        statistics it updates."""
        return (*self.variables, *self.moving_variables)

    def outputs_to(self, stage: int) -> tuple[str, ...]:
        return tuple(t for t in self.outputs if stage in self.output_consumers[t])

    def inputs_from(self, stage: int) -> tuple[str, ...]:
        return tuple(t for t in self.inputs if self.input_source[t] == stage)

    @property
    def source_stages(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.input_source.values())))

    @property
    def consumer_stages(self) -> tuple[int, ...]:
        return tuple(sorted({b for c in self.output_consumers.values() for b in c}))


def partition(template: Template, plan: Plan) -> list[StageSpec]:
    """Split the template's ops into the plan's stages. Raises PlanError naming the model's
    layers when the plan does not cover them exactly, in order."""
    plan.check_layers(template.layers)
    stage_of_layer = plan.stage_of_layer()
    stage_of_op = {op: stage_of_layer[layer] for op, layer in template.layer_of_op.items()}
    feature_of_tensor = {t: name for name, t in template.features.items()}
    graph = template.graph
    num_stages = plan.num_stages

    ops: list[list[str]] = [[] for _ in range(num_stages)]
    inputs: list[dict[str, int]] = [{} for _ in range(num_stages)]
    consumers: list[dict[str, list[int]]] = [{} for _ in range(num_stages)]
    features: list[dict[str, None]] = [{} for _ in range(num_stages)]
    variables: list[dict[str, None]] = [{} for _ in range(num_stages)]
    derived: list[dict[str, None]] = [{} for _ in range(num_stages)]
    for layer in template.layers:
        for name in template.ops_of_layer[layer]:
            s = stage_of_op[name]
            ops[s].append(name)
            for t in graph.get_operation_by_name(name).inputs:
                producer = t.op.name
                if t.name in feature_of_tensor:
                    features[s][feature_of_tensor[t.name]] = None
                elif producer in template.variables:
                    variables[s][producer] = None
                elif stage_of_op[producer] != s:
                    a = stage_of_op[producer]
                    if a > s:
                        raise PartitionError(
                            f"layer '{template.layer_of_op[name]}' (stage {s}) consumes "
                            f"{t.name} of layer '{template.layer_of_op[producer]}' (stage {a}); "
                            f"data may only flow to later stages"
                        )
                    if _is_derived(t, template, name, s, a):
                        derived[s][t.name] = None
                        continue
                    inputs[s][t.name] = a
                    users = consumers[a].setdefault(t.name, [])
                    if s not in users:
                        users.append(s)
    loss_stage = stage_of_op[template.loss.split(":")[0]]
    if loss_stage != num_stages - 1:
        raise PartitionError(
            f"the loss {template.loss} is in stage {loss_stage}, but it must be "
            f"computed by the last stage ({num_stages - 1})"
        )
    # Keep each stage's ops in template (topological) order.
    position = {op: k for k, op in enumerate(template.layer_of_op)}
    moving = moving_updates_by_stage(template, stage_of_op, variables)
    return [
        StageSpec(
            index=s,
            layers=plan.stages[s].layers,
            ops=tuple(sorted(ops[s], key=position.__getitem__)),
            inputs=tuple(inputs[s]),
            input_source=dict(inputs[s]),
            outputs=tuple(consumers[s]),
            output_consumers={t: tuple(sorted(c)) for t, c in consumers[s].items()},
            features=tuple(features[s]),
            variables=tuple(variables[s]),
            has_loss=(s == num_stages - 1),
            derived_inputs=values_at_rows(template, list(derived[s]), _clone_rows(plan, s))
            if derived[s]
            else {},
            **moving.get(s, {}),
        )
        for s in range(num_stages)
    ]


def moving_updates_by_stage(template: Template, stage_of_op, variables_of_stage) -> dict:
    """Stage -> its StageSpec fields of batch norm (`statistics`, `moving_updates`,
    `moving_variables`): an update belongs to the stage computing its statistics (stage 0 if it
    reads none), and may read only that stage's variables and moving statistics."""
    out: dict[int, dict[str, dict]] = {}
    for update in template.moving_updates:
        stages = {stage_of_op[t.split(":")[0]] for t in update.statistics} or {0}
        (s,) = stages  # the template checked: one layer's statistics
        fields = out.setdefault(s, {"statistics": {}, "moving_updates": {}, "moving_variables": {}})
        fields["moving_updates"][update.assign] = None
        fields["moving_variables"][update.variable] = None
        for t in update.statistics:
            mean = template.statistics[t].mean
            fields["statistics"].update(dict.fromkeys([t] + ([mean] if mean else [])))
    for s, fields in out.items():
        own = set(fields["moving_variables"]) | set(variables_of_stage[s])
        for update in template.moving_updates:
            if update.assign not in fields["moving_updates"]:
                continue
            foreign = [v for v in update.reads if v not in own]
            used_elsewhere = [
                t for t, vs in enumerate(variables_of_stage) if t != s and update.variable in vs
            ]
            if foreign or used_elsewhere:
                raise PartitionError(
                    f"update {update.assign} of {update.variable} runs with stage {s} (its "
                    f"statistics' layer), but reads variables of other stages {foreign} or "
                    f"its variable is read by stages {used_elsewhere}; put those layers in "
                    f"one stage"
                )
    return {s: {k: tuple(v) for k, v in fields.items()} for s, fields in out.items()}


def _clone_rows(plan: Plan, stage: int) -> int:
    return plan.micro_batch_size // plan.stages[stage].num_replicas


def _is_derived(tensor, template: Template, consumer: str, stage: int, source: int) -> bool:
    """Whether `tensor` (from stage `source` to `consumer`'s stage `stage`) is recomputed per
    clone rather than sent: a batch tensor whose first axis is not k x rows and whose value
    depends on the batch through shapes only. Raises PartitionError for one that can neither be
    split by rows nor recomputed."""
    if tensor.name not in template.batch_tensors:
        return False
    shape = tensor.shape
    splittable = (
        tensor.name not in template.not_batch_major
        and shape.rank is not None
        and shape.rank > 0
        and shape[0] is None
    )
    if splittable:
        return False
    if shape_only_cone(template, tensor.name)[1]:
        return True
    probed = template.not_batch_major.get(tensor.name)
    raise PartitionError(
        f"tensor {tensor.name} (shape {shape}"
        f"{f', {list(probed)} with a batch of 7 rows' if probed is not None else ''}) crosses "
        f"the stage boundary from layer '{template.layer_of_op[tensor.op.name]}' (stage "
        f"{source}) to layer '{template.layer_of_op[consumer]}' (stage {stage}), but it can "
        f"neither be split by rows (its first axis is not k x the batch rows) nor recomputed "
        f"per micro-batch (its value depends on the batch through more than shapes); tensors "
        f"leaving a layer must be [k x batch, ...]: reshape or transpose inside the layer, or "
        f"choose a cut elsewhere"
    )
