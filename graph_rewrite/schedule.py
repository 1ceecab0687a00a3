"""The schedule pass's data: what each device group of a plan runs in one step, and the order in
which the rewriter builds those actions.

The orders are the schedule library's (`planner/schedules.py`, the only place that spells one
out); this module picks the plan's. A device group is one stage's device list, or, under
interleaved-1f1b, the device list of the v = `Plan.chunks` stages s, s + P, ... (stage s on
group s mod P); its list mixes the actions of all its stages. The rewriter builds the actions in
the checker's simulated order (`ScheduleReport.order`), so each action's start ops can be
created under a control dependency on the end op of the previous action on its device
(`rewrite._Builder.build_action`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from planner import schedules
from planner.plan_format import Plan
from planner.schedules import Action, ScheduleError

from .stage_graph import StageGraph


@dataclasses.dataclass(frozen=True)
class PlanSchedule:
    # per device group (Plan.device_groups): the actions every replica of its stages runs, in
    # order; with one stage per group, group s is stage s
    lists: list[list[Action]]
    build_order: tuple[Action, ...]  # every action once, each after what it needs


def plan_schedule(plan: Plan, held_back: Sequence[int] | None = None) -> PlanSchedule:
    """The action lists of `plan` and their build order. Only schedules the rewriter executes
    (`schedules.EXECUTABLE`); a Plan refuses others. The chunk count of interleaved-1f1b is the
    plan's stages per device group. `held_back`: zb-h1's per-stage counts
    (`zero_bubble_held_back`)."""
    if plan.schedule not in schedules.EXECUTABLE:
        raise ScheduleError(
            f"the rewriter runs schedules {', '.join(schedules.EXECUTABLE)}, not '{plan.schedule}'"
        )
    chunks = plan.chunks if plan.schedule in schedules.CHUNKED else 1
    lists = schedules.action_lists(
        plan.schedule, plan.num_stages, plan.num_micro_batches, chunks, held_back=held_back
    )
    report = schedules.check_schedule(lists, plan.num_stages, plan.num_micro_batches)
    return PlanSchedule(lists, report.order)


def zero_bubble_held_back(plan: Plan, stage_graphs: Sequence[StageGraph | None]) -> tuple[int, ...]:
    """ZB-H1's held-back W counts that keep each stage built here within 1F1B's peak memory,
    from what its pending micro-batches hold (`DeferredWeights.forward_bytes`, `input_bytes`;
    planner.schedules.memory_bounded_held_back). Stages not built here (other ranks'), or with
    no weight part, keep the paper's count: W actions have no cross-stage dependency, so a
    stage's count changes only its own list."""
    forward_bytes, input_bytes = [], []
    for graph in stage_graphs:
        deferred = graph.deferred_weights if graph is not None else None
        known = deferred is not None and deferred.forward_bytes > 0
        forward_bytes.append(deferred.forward_bytes if known else None)
        input_bytes.append(deferred.input_bytes if known else None)
    return schedules.memory_bounded_held_back(
        plan.num_stages, plan.num_micro_batches, forward_bytes, input_bytes
    )
