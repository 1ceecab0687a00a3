"""The schedule pass's data (graph_rewrite/schedule.py): a plan's action lists and the order the
rewriter builds them in, no session. The orders themselves are tested in tests/test_schedules.py;
the executed order in tests/test_trainer_order.py and tests/test_timeline.py."""

import pytest

from graph_rewrite.schedule import ScheduleError, plan_schedule
from planner.plan_format import even_plan
from planner.schedules import (
    check_schedule,
    format_actions,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    zero_bubble_h1,
)

LAYERS = [f"layer_{k}" for k in range(8)]


def plan_of(schedule, num_stages, num_micro_batches):
    return even_plan(LAYERS, [1] * num_stages, 4 * num_micro_batches, num_micro_batches, schedule)


@pytest.mark.parametrize(
    "name,generator", [("gpipe", gpipe), ("1f1b", one_f_one_b), ("zb-h1", zero_bubble_h1)]
)
@pytest.mark.parametrize("num_stages,num_micro_batches", [(1, 1), (2, 4), (4, 8), (8, 16)])
def test_a_plans_lists_are_its_schedules_one_per_stage(
    name, generator, num_stages, num_micro_batches
):
    lists = plan_schedule(plan_of(name, num_stages, num_micro_batches)).lists
    assert lists == generator(num_stages, num_micro_batches)


def test_the_build_order_is_the_checkers_simulated_order():
    built = plan_schedule(plan_of("1f1b", 4, 8))
    assert built.build_order == check_schedule(built.lists, 4, 8).order


# The rewriter has built 1f1b and gpipe in these orders since the first schedule pass: graph
# construction order decides op creation order, so it must not change by accident.
def test_1f1b_build_order_on_three_stages():
    order = plan_schedule(plan_of("1f1b", 3, 4)).build_order
    assert " ".join(map(str, order)) == (
        "0F0 1F0 2F0 0F1 1F1 2B0 0F2 1B0 2F1 0B0 1F2 2B1 0F3 1B1 2F2 0B1 1F3 2B2 1B2 2F3 0B2 "
        "2B3 1B3 0B3"
    )


def test_gpipe_build_order_on_two_stages():
    order = plan_schedule(plan_of("gpipe", 2, 3)).build_order
    assert " ".join(map(str, order)) == "0F0 1F0 0F1 1F1 0F2 1F2 1B0 0B0 1B1 0B1 1B2 0B2"


def test_each_stage_runs_its_list_in_build_order():
    built = plan_schedule(plan_of("1f1b", 4, 8))
    for s, actions in enumerate(built.lists):
        in_order = [a for a in built.build_order if a.stage == s]
        assert format_actions(in_order) == format_actions(actions)


def test_zb_h1_build_order_on_two_stages():
    order = plan_schedule(plan_of("zb-h1", 2, 3)).build_order
    assert " ".join(map(str, order)) == (
        "0F0 1F0 0F1 1I0 0I0 1F1 0W0 1I1 0F2 1W0 0I1 1F2 0W1 1I2 0I2 1W1 0W2 1W2"
    )


def test_a_schedule_the_rewriter_cannot_run_is_refused():
    plan = plan_of("1f1b", 2, 2)
    object.__setattr__(plan, "schedule", "zigzag")  # a Plan itself refuses it
    with pytest.raises(
        ScheduleError,
        match="the rewriter runs schedules gpipe, 1f1b, zb-h1, interleaved-1f1b, pipedream-2bw, "
        "not 'zigzag'",
    ):
        plan_schedule(plan)


@pytest.mark.parametrize(
    "replicas,chunks,num_micro_batches", [([1, 1], 2, 4), ([2, 2], 2, 8), ([1, 1, 1, 1], 2, 4)]
)
def test_an_interleaved_plans_lists_are_the_librarys_one_per_device_group(
    replicas, chunks, num_micro_batches
):
    """v, the chunk count, is the plan's stages per device group."""
    plan = even_plan(LAYERS, replicas, 48, num_micro_batches, "interleaved-1f1b", chunks)
    built = plan_schedule(plan)
    num_stages = len(replicas) * chunks
    assert plan.num_stages == num_stages and plan.chunks == chunks
    assert built.lists == interleaved_one_f_one_b(num_stages, num_micro_batches, chunks)
    assert built.build_order == check_schedule(built.lists, num_stages, num_micro_batches).order
    for g, actions in enumerate(built.lists):
        assert {a.stage for a in actions} == set(range(g, num_stages, len(replicas)))
