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

from planner import schedules
from planner.plan_format import Plan
from planner.schedules import Action, ScheduleError


@dataclasses.dataclass(frozen=True)
class PlanSchedule:
    # per device group (Plan.device_groups): the actions every replica of its stages runs, in
    # order; with one stage per group, group s is stage s
    lists: list[list[Action]]
    build_order: tuple[Action, ...]  # every action once, each after what it needs


def plan_schedule(plan: Plan) -> PlanSchedule:
    """The action lists of `plan` and their build order. Only schedules the rewriter executes
    (`schedules.EXECUTABLE`); a Plan refuses others. The chunk count of interleaved-1f1b is the
    plan's stages per device group."""
    if plan.schedule not in schedules.EXECUTABLE:
        raise ScheduleError(
            f"the rewriter runs schedules {', '.join(schedules.EXECUTABLE)}, not '{plan.schedule}'"
        )
    chunks = plan.chunks if plan.schedule in schedules.CHUNKED else 1
    lists = schedules.action_lists(plan.schedule, plan.num_stages, plan.num_micro_batches, chunks)
    report = schedules.check_schedule(lists, plan.num_stages, plan.num_micro_batches)
    return PlanSchedule(lists, report.order)
