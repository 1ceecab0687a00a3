"""Moving statistics (batch norm's UPDATE_OPS): evaluated once per step, from the statistics of
the whole global batch (as torchgpipe's deferred batch norm does).

Each forward call of a stage returns the statistics its updates read (StageSpec.statistics,
recognised by graph_rewrite/batch_norm.py), computed on that clone's rows: normalisation inside
a micro-batch uses the micro-batch's own statistics (that is the model's forward, unchanged).
Over the step, with w_i = rows of clone i / global batch rows:
  - a MEAN statistic:  global m = sum_i w_i m_i;
  - a VARIANCE (biased, tf.nn.moments): global v = sum_i w_i (v_i + (m_i - m)^2), the law of
    total variance, exact; summed in two rounds (first the means, then the spreads around the
    global mean), never as E[x^2] - m^2, which loses precision when |m| >> std;
  - an UNBIASED_VARIANCE (FusedBatchNormV3, n_i = rows_i x H x W values a channel): each u_i
    made biased (x (n_i - 1) / n_i), combined as above, corrected with the global N/(N - 1).
Each sum runs over the slot's micro-batches in-graph, then over the stage's replicas with the
gradient sums' mechanism (`GradientSync.sum_statistics`: in-graph, or an allreduce over the
stage's ranks). The update's ops, imported from the template with its statistics replaced by
the global ones and its variable handles by the training graph's, then run once per step, with
the optimizer's update (`with_moving_statistics`). The moving statistics then equal
single-device training's on the global batch whenever the tensors they summarise do (M = 1 and
one replica per stage; otherwise each micro-batch's normalisation differs, by design).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from planner.plan_format import Plan

from . import graphdefs
from .batch_norm import MEAN, UNBIASED_VARIANCE, Statistic
from .partition import StageSpec
from .place import Slot
from .template import Template

SCOPE = "dapple/moving_statistics"
INPUT_PREFIX = "dapple_update_in"


def weighted_sum(parts: Sequence[tf.Tensor], weight: float, name: str) -> tf.Tensor:
    """sum_i weight x parts[i] (one slot's micro-batches, each weighing its rows' share)."""
    with tf.name_scope(name):
        total = parts[0] if len(parts) == 1 else tf.add_n(list(parts))
        return tf.multiply(total, tf.cast(weight, total.dtype))


def biased(statistic: Statistic, value: tf.Tensor, rows: int) -> tf.Tensor:
    """A variance statistic of one clone of `rows` rows as the biased variance of its values."""
    if statistic.kind != UNBIASED_VARIANCE:
        return value
    n = rows * statistic.values_per_row
    return value * tf.cast((n - 1) / n, value.dtype)


def global_statistics(
    statistics: Mapping[str, Statistic],
    per_slot: Mapping[Slot, list[dict[str, tf.Tensor]]],
    rows_of_slot: Mapping[Slot, int],
    global_rows: int,
    sum_replicas,
) -> dict[str, tf.Tensor]:
    """Statistic tensor -> its value on the whole global batch (module doc). `per_slot`: each
    local slot's statistics per micro-batch, in micro-batch order; `sum_replicas(partial sums
    by slot, name)` sums them over the stage's replicas (local and remote)."""
    names = sorted({t for stats in per_slot.values() for t in stats[0]})
    means = [t for t in names if statistics[t].kind == MEAN]
    spreads = [t for t in names if statistics[t].kind != MEAN]
    partial = {
        slot: {
            t: weighted_sum(
                [s[t] for s in stats], rows_of_slot[slot] / global_rows, f"{SCOPE}/{slot.tag}/sum"
            )
            for t in means
        }
        for slot, stats in per_slot.items()
    }
    out = sum_replicas(partial, "mean")
    partial = {}
    for slot, stats in per_slot.items():
        rows = rows_of_slot[slot]
        partial[slot] = {}
        for t in spreads:
            statistic = statistics[t]
            with tf.name_scope(f"{SCOPE}/{slot.tag}/spread"):
                terms = [
                    biased(statistic, s[t], rows)
                    + tf.square(s[statistic.mean] - out[statistic.mean])
                    for s in stats
                ]
            partial[slot][t] = weighted_sum(terms, rows / global_rows, f"{SCOPE}/{slot.tag}/sum")
    out.update(sum_replicas(partial, "spread"))
    for t in spreads:
        if statistics[t].kind == UNBIASED_VARIANCE:
            n = global_rows * statistics[t].values_per_row
            out[t] = out[t] * tf.cast(n / (n - 1), out[t].dtype)
    return out


def import_updates(
    template: Template,
    assigns: Sequence[str],
    global_values: Mapping[str, tf.Tensor],
    variables: Mapping[str, tf.Variable],
    device_of_variable: Mapping[str, str],
) -> list[tf.Operation]:
    """The updates `assigns` (template assign ops), imported into the default graph: their
    statistics read `global_values`, their variable handles the training graph's variables;
    each on its variable's device."""
    graph = template.graph
    node_by_name = {n.name: n for n in graph.as_graph_def().node}
    update_of = {u.assign: u for u in template.moving_updates}
    ops = []
    for k, assign in enumerate(assigns):
        update = update_of[assign]
        part = graphdefs.extract(
            (node_by_name[op] for op in update.ops), graph, f"{INPUT_PREFIX}/{k}"
        )
        input_map = {}
        for outside, placeholder in part.placeholder_of.items():
            op = outside.split(":")[0]
            input_map[placeholder] = (
                variables[op].handle if op in variables else global_values[outside]
            )
        with tf.device(device_of_variable[update.variable]):
            (op,) = tf.graph_util.import_graph_def(
                part.graph_def,
                input_map=input_map,
                return_elements=[assign],
                name=f"{SCOPE}/update_{k}",
            )
        ops.append(op)
    return ops


def moving_statistics_updates(
    template: Template,
    plan: Plan,
    specs: Sequence[StageSpec],
    per_slot: Mapping[Slot, list[dict[str, tf.Tensor]]],
    variables: Mapping[str, tf.Variable],
    device_of_variable: Mapping[str, str],
    gradient_sync,
) -> list[tf.Operation]:
    """Every local stage's moving-statistics updates, evaluated on the global batch's
    statistics (module doc); [] for a model without UPDATE_OPS. `per_slot`: every local slot ->
    its forwards' statistics, in micro-batch order."""
    ops = []
    for stage in sorted({slot.stage for slot in per_slot if specs[slot.stage].moving_updates}):
        spec = specs[stage]
        slots = {slot: stats for slot, stats in per_slot.items() if slot.stage == stage}
        device = device_of_variable[spec.moving_variables[0]]
        ranks = plan.stages[stage].devices

        def sum_replicas(partial, kind):
            order = sorted({t for values in partial.values() for t in values})
            key = {t: f"dapple_statistics/s{stage}/{kind}_{k}" for k, t in enumerate(order)}
            named = {
                slot.replica: {key[t]: v for t, v in values.items()}
                for slot, values in partial.items()
            }
            summed = gradient_sync.sum_statistics(stage, named, ranks, device)
            return {t: summed[key[t]] for t in order}

        rows = {slot: _rows(plan, slot) for slot in slots}
        values = {}
        if spec.statistics:
            with tf.device(device):
                values = global_statistics(
                    template.statistics, slots, rows, plan.global_batch_size, sum_replicas
                )
        ops += import_updates(template, spec.moving_updates, values, variables, device_of_variable)
    return ops


def _rows(plan: Plan, slot: Slot) -> int:
    lo, hi = plan.rows_of_replica(slot.stage, slot.replica)
    return hi - lo
