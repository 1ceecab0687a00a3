"""The schedule pass's data: what each stage of a plan runs in one step, and the order in which
the rewriter builds those actions.

The orders are the schedule library's (`planner/schedules.py`, the only place that spells one
out); this module picks the plan's. The rewriter builds the actions in the checker's simulated
order (`ScheduleReport.order`), so each action's start ops can be created under a control
dependency on the end op of its slot's previous action (`rewrite._Builder.build_action`).
"""

from __future__ import annotations

import dataclasses

from planner import schedules
from planner.plan_format import Plan
from planner.schedules import Action, ScheduleError


@dataclasses.dataclass(frozen=True)
class PlanSchedule:
    lists: list[list[Action]]  # per stage: the actions every replica of it runs, in order
    build_order: tuple[Action, ...]  # every action once, each after what it needs


def plan_schedule(plan: Plan) -> PlanSchedule:
    """The action lists of `plan` and their build order. Only schedules the rewriter executes
    (`schedules.EXECUTABLE`: one stage per device group; full backwards B, or I and W: zb-h1);
    a Plan refuses others."""
    if plan.schedule not in schedules.EXECUTABLE:
        raise ScheduleError(
            f"the rewriter runs schedules {', '.join(schedules.EXECUTABLE)}, not '{plan.schedule}'"
        )
    lists = schedules.action_lists(plan.schedule, plan.num_stages, plan.num_micro_batches)
    report = schedules.check_schedule(lists, plan.num_stages, plan.num_micro_batches)
    return PlanSchedule(lists, report.order)
