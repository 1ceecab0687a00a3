"""Schedule generators: the action lists themselves, no TensorFlow."""

import pytest

from graph_rewrite import schedule
from graph_rewrite.schedule import ScheduleError, execution_order, format_actions


def test_gpipe_runs_all_forwards_then_all_backwards_on_every_stage():
    lists = schedule.gpipe(3, 4)
    assert len(lists) == 3
    for actions in lists:
        assert format_actions(actions) == "F0 F1 F2 F3 B0 B1 B2 B3"


def test_1f1b_lists_for_four_stages_and_eight_micro_batches():
    lists = schedule.one_f_one_b(4, 8)
    assert format_actions(lists[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    assert format_actions(lists[2]) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"
    assert format_actions(lists[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"


@pytest.mark.parametrize("num_stages,num_micro_batches", [(4, 8), (4, 2), (3, 1), (8, 16)])
def test_1f1b_stage_s_runs_min_of_stages_left_and_micro_batches_warmup_forwards(
    num_stages, num_micro_batches
):
    for s, actions in enumerate(schedule.one_f_one_b(num_stages, num_micro_batches)):
        first_backward = actions.index(("B", 0))
        assert first_backward == min(num_stages - s, num_micro_batches)


@pytest.mark.parametrize("num_stages,num_micro_batches", [(4, 8), (2, 2), (5, 3)])
def test_1f1b_keeps_at_most_warmup_micro_batches_in_flight(num_stages, num_micro_batches):
    for s, actions in enumerate(schedule.one_f_one_b(num_stages, num_micro_batches)):
        in_flight, peak = 0, 0
        for kind, _ in actions:
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == schedule.warmup_forwards(s, num_stages, num_micro_batches)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages,num_micro_batches", [(1, 1), (2, 4), (4, 8), (8, 16)])
def test_generated_schedules_are_deadlock_free(name, num_stages, num_micro_batches):
    lists = schedule.schedule_for(name, num_stages, num_micro_batches)
    order = execution_order(lists, num_micro_batches)
    assert len(order) == num_stages * 2 * num_micro_batches


def test_execution_order_respects_pipeline_dependencies():
    order = execution_order(schedule.one_f_one_b(3, 4), 4)
    position = {item: k for k, item in enumerate(order)}
    for s in range(3):
        for i in range(4):
            if s > 0:
                assert position[(s - 1, ("F", i))] < position[(s, ("F", i))]
            if s < 2:
                assert position[(s + 1, ("B", i))] < position[(s, ("B", i))]


def test_a_backward_before_its_forward_is_reported_as_deadlock():
    lists = [[("B", 0), ("F", 0)], [("F", 0), ("B", 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        execution_order(lists, 1)


def test_a_list_missing_an_action_is_rejected():
    with pytest.raises(ScheduleError, match="stage 1"):
        execution_order([[("F", 0), ("B", 0)], [("F", 0)]], 1)


def test_unknown_schedule_name_is_rejected_with_the_known_names():
    with pytest.raises(ScheduleError, match="gpipe, 1f1b"):
        schedule.schedule_for("zigzag", 2, 2)
