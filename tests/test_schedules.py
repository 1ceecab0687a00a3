"""The schedule library (planner/schedules.py): generators, the checker, printing. No TensorFlow.

Golden files `tests/data/schedules/<name>-S<s>-M<m>[-v<v>].txt` hold the printed lists of a few
small cases and are compared exactly. After an intended change of an order, rewrite them with
`python tests/test_schedules.py` and review the diff; the tests never write them.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

from planner import schedules  # noqa: E402
from planner.plan_format import PlanError, even_plan  # noqa: E402
from planner.schedules import (  # noqa: E402
    Action,
    ScheduleError,
    action_lists,
    check_schedule,
    format_actions,
    format_lists,
)

GOLDEN_DIR = os.path.join(ROOT, "tests", "data", "schedules")
GOLDEN_CASES = [
    (name, s, m, 1) for name in ("gpipe", "1f1b", "zb-h1") for s, m in ((4, 8), (2, 4))
] + [("interleaved-1f1b", 4, 8, 2), ("interleaved-1f1b", 2, 4, 2), ("interleaved-1f1b", 8, 8, 2)]
GOLDEN_NAME = re.compile(r"^(?P<name>.+)-S(?P<s>\d+)-M(?P<m>\d+)(?:-v(?P<v>\d+))?\.txt$")


def grid(name):
    """Every (S, M, v) with S <= 8, M <= 16 the schedule serves (interleaved: v <= 4 dividing
    S, M a multiple of S / v)."""
    for s in range(1, 9):
        for m in range(1, 17):
            if name not in schedules.CHUNKED:
                yield s, m, 1
                continue
            for v in range(1, 5):
                if s % v == 0 and m % (s // v) == 0:
                    yield s, m, v


def F(stage, i):
    return Action("F", stage, i)


def B(stage, i):
    return Action("B", stage, i)


# ---- every schedule -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_every_schedule_passes_the_checker_on_the_whole_grid(name):
    for s, m, v in grid(name):
        lists = action_lists(name, s, m, v)
        report = check_schedule(lists, s, m)
        assert len(report.order) == sum(len(actions) for actions in lists), (s, m, v)


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_the_checkers_order_puts_every_action_after_what_it_needs(name):
    for s, m, v in [(4, 8, 2), (3, 6, 1), (8, 16, 4)]:
        if (s, m, v) not in set(grid(name)):
            continue
        order = check_schedule(action_lists(name, s, m, v), s, m).order
        position = {action: k for k, action in enumerate(order)}
        for action in order:
            kind, stage, i = action
            if kind == "F" and stage > 0:
                assert position[F(stage - 1, i)] < position[action]
            if kind in "BI":
                assert position[F(stage, i)] < position[action]
            if kind in "BI" and stage < s - 1:
                gradient = [a for a in order if a[1:] == (stage + 1, i) and a.kind in "BI"]
                assert position[gradient[0]] < position[action]
            if kind == "W":
                assert position[Action("I", stage, i)] < position[action]


@pytest.mark.parametrize("path", sorted(os.listdir(GOLDEN_DIR)))
def test_printed_lists_equal_the_golden_file(path):
    match = GOLDEN_NAME.match(path)
    assert match, f"{path} is not named <schedule>-S<s>-M<m>[-v<v>].txt"
    lists = action_lists(match["name"], int(match["s"]), int(match["m"]), int(match["v"] or 1))
    with open(os.path.join(GOLDEN_DIR, path)) as f:
        assert format_lists(lists) + "\n" == f.read()


def test_every_schedule_has_golden_files():
    named = {GOLDEN_NAME.match(p)["name"] for p in os.listdir(GOLDEN_DIR)}
    assert named == set(schedules.SCHEDULES)


def test_the_library_imports_no_tensorflow():
    code = "import sys, planner.schedules; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_unknown_schedule_name_is_rejected_with_the_known_names():
    with pytest.raises(ScheduleError, match="gpipe, 1f1b, interleaved-1f1b, zb-h1, pipedream-2bw"):
        action_lists("zigzag", 2, 2)


def test_the_rewriter_runs_gpipe_1f1b_zb_h1_interleaved_1f1b_and_pipedream_2bw():
    assert schedules.EXECUTABLE == ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "pipedream-2bw")
    assert set(schedules.EXECUTABLE) <= set(schedules.SCHEDULES)
    assert schedules.ASYNC == ("pipedream-2bw",)


def test_pipedream_2bw_runs_1f1bs_order_within_a_step():
    for s, m in [(2, 4), (4, 8), (3, 2)]:
        assert action_lists("pipedream-2bw", s, m) == action_lists("1f1b", s, m)


def test_an_async_schedule_is_refused_unless_allowed_naming_the_flag():
    with pytest.raises(ScheduleError, match="asynchronous.*pass --allow_async to use it"):
        schedules.check_async_allowed("pipedream-2bw", False, "--allow_async")
    schedules.check_async_allowed("pipedream-2bw", True)
    schedules.check_async_allowed("1f1b", False)


def test_a_plan_with_a_schedule_the_rewriter_cannot_run_yet_is_refused(monkeypatch):
    # every schedule of the library runs today: pretend one does not
    monkeypatch.setattr(schedules, "EXECUTABLE", ("gpipe", "1f1b", "zb-h1"))
    with pytest.raises(
        PlanError,
        match="'interleaved-1f1b' is in the schedule library, but the rewriter cannot run it "
        "yet; runnable schedules: gpipe, 1f1b, zb-h1",
    ):
        even_plan(["a", "b"], [1, 1], 8, 4, "interleaved-1f1b")


def test_a_plan_with_an_unknown_schedule_is_refused_naming_the_runnable_ones():
    with pytest.raises(
        PlanError,
        match="'zigzag' is unknown; runnable schedules: gpipe, 1f1b, zb-h1, interleaved-1f1b, "
        "pipedream-2bw",
    ):
        even_plan(["a", "b"], [1, 1], 8, 4, "zigzag")


def test_chunks_are_refused_by_a_schedule_with_one_stage_per_group():
    with pytest.raises(ScheduleError, match="one stage on each device group"):
        action_lists("1f1b", 4, 8, chunks=2)


# ---- gpipe and 1f1b: the orders the rewriter has always built ------------------------------------
def test_gpipe_runs_all_forwards_then_all_backwards_on_every_stage():
    lists = schedules.gpipe(3, 4)
    assert len(lists) == 3
    for actions in lists:
        assert format_actions(actions) == "F0 F1 F2 F3 B0 B1 B2 B3"


def test_1f1b_lists_for_four_stages_and_eight_micro_batches():
    lists = schedules.one_f_one_b(4, 8)
    assert format_actions(lists[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    assert format_actions(lists[2]) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"
    assert format_actions(lists[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"


@pytest.mark.parametrize("num_stages,num_micro_batches", [(4, 8), (4, 2), (3, 1), (8, 16)])
def test_1f1b_stage_s_runs_min_of_stages_left_and_micro_batches_warmup_forwards(
    num_stages, num_micro_batches
):
    for s, actions in enumerate(schedules.one_f_one_b(num_stages, num_micro_batches)):
        assert actions.index(B(s, 0)) == min(num_stages - s, num_micro_batches)


def test_1f1b_keeps_its_warmup_forwards_in_flight_and_gpipe_all_micro_batches():
    for s, m, _ in grid("1f1b"):
        expected = tuple(schedules.warmup_forwards(k, s, m) for k in range(s))
        assert schedules.in_flight_peaks("1f1b", s, m) == expected
        assert schedules.in_flight_peaks("gpipe", s, m) == (m,) * s


def test_1f1b_build_order_on_three_stages_is_the_rewriters():
    order = check_schedule(schedules.one_f_one_b(3, 2), 3, 2).order
    # groups take turns; a group's action may use what an earlier group did in the same turn
    assert " ".join(map(str, order)) == "0F0 1F0 2F0 0F1 1F1 2B0 1B0 2F1 0B0 2B1 1B1 0B1"


# ---- zb-h1 ----------------------------------------------------------------------------------------
def test_zb_h1_splits_every_backward_into_input_and_weight_gradient():
    for actions in schedules.zero_bubble_h1(4, 8):
        assert {a.kind for a in actions} == {"F", "I", "W"}


def test_zb_h1_peak_in_flight_is_1f1bs():
    for s, m, _ in grid("zb-h1"):
        zb = schedules.in_flight_peaks("zb-h1", s, m)
        assert max(zb) == max(schedules.in_flight_peaks("1f1b", s, m)), (s, m)
        # holding back s weight gradients on stage s levels every stage at stage 0's count
        assert zb == (min(s, m),) * s, (s, m)


def test_zb_h1_with_any_held_back_counts_passes_the_checker_on_the_grid():
    """Held-back W counts h_s (memory_bounded_held_back's) change only where each stage's W's
    sit: every count, from none to more than s, still gives a complete, deadlock-free ZB-H1,
    in which stage s has at most h_s W's waiting after each I; the default is the paper's
    h_s = s."""
    import random

    rng = random.Random(3)
    for s, m, _ in grid("zb-h1"):
        held_back = [rng.randint(0, s + 1) for _ in range(s)]
        lists = action_lists("zb-h1", s, m, held_back=held_back)
        check_schedule(lists, s, m)
        for stage, actions in enumerate(lists):
            waiting = 0
            for k, a in enumerate(actions):
                waiting += {"I": 1, "W": -1}.get(a.kind, 0)
                if a.kind == "F" and k and actions[k - 1].kind in "IW":
                    assert waiting <= held_back[stage], (s, m, held_back, stage)
        assert action_lists("zb-h1", s, m, held_back=range(s)) == action_lists("zb-h1", s, m)


def test_held_back_counts_are_refused_for_other_schedules_and_when_malformed():
    with pytest.raises(ScheduleError, match="held_back counts are zb-h1's"):
        action_lists("1f1b", 2, 4, held_back=[0, 1])
    with pytest.raises(ScheduleError, match="one count >= 0 per stage"):
        action_lists("zb-h1", 2, 4, held_back=[0])
    with pytest.raises(ScheduleError, match="one count >= 0 per stage"):
        action_lists("zb-h1", 2, 4, held_back=[0, -1])


def test_peak_bytes_adds_forwards_until_i_and_weight_inputs_until_w():
    actions = [F(0, 0), F(0, 1), Action("I", 0, 0), F(0, 2), Action("I", 0, 1)]
    actions += [Action("W", 0, 0), Action("I", 0, 2), Action("W", 0, 1), Action("W", 0, 2)]
    # held: 3, 6, 3+5, 6+5, 3+10 (peak), 3+5, 10, 5, 0
    assert schedules.peak_bytes(actions, 3.0, 5.0) == 13.0
    assert schedules.peak_bytes([F(0, 0), B(0, 0), F(0, 1), B(0, 1)], 3.0, 0.0) == 3.0


@pytest.mark.parametrize("num_stages,num_micro_batches", [(4, 8), (8, 16), (3, 2), (6, 6)])
def test_memory_bounded_held_back_keeps_each_stage_within_s_forwards(num_stages, num_micro_batches):
    """A pending W holding no more than a forward: the paper's h_s = s. Holding more (twice, as
    an MLP layer's input and output gradient against its input), the largest h_s <= s whose
    list stays within min(S, M) forwards' bytes (or 0): one more W would not."""
    S, M = num_stages, num_micro_batches
    assert schedules.memory_bounded_held_back(S, M, [3.0] * S, [3.0] * S) == tuple(range(S))
    assert schedules.memory_bounded_held_back(S, M, [3.0] * S, [2.0] * S) == tuple(range(S))
    forward = [3.0 + s for s in range(S)]
    weight = [2 * f for f in forward]
    held_back = schedules.memory_bounded_held_back(S, M, forward, weight)
    assert held_back[0] == 0 and held_back != tuple(range(S))
    for s in range(S):
        budget = min(S, M) * forward[s]

        def peak(h):
            counts = list(held_back)
            counts[s] = h
            return schedules.peak_bytes(
                schedules.zero_bubble_h1(S, M, counts)[s], forward[s], weight[s]
            )

        assert held_back[s] == 0 or peak(held_back[s]) <= budget, s
        assert held_back[s] == s or peak(held_back[s] + 1) > budget, s
    # unknown sizes (None): the paper's count
    unknown = schedules.memory_bounded_held_back(S, M, [None] * S, [None] * S)
    assert unknown == tuple(range(S))


@pytest.mark.parametrize("num_stages,num_micro_batches", [(4, 8), (8, 16), (2, 4)])
def test_zb_h1_bubble_is_a_third_of_1f1bs_with_equal_f_i_w(num_stages, num_micro_batches):
    def step(name):
        lists = action_lists(name, num_stages, num_micro_batches)
        starts = schedules.start_times(lists, num_stages)
        return max(
            starts[g][-1] + schedules.UNIT_DURATIONS[lists[g][-1].kind] for g in range(num_stages)
        )

    work = 3 * num_micro_batches  # F + I + W = F + B per micro-batch
    assert step("1f1b") - work == 3 * (num_stages - 1)
    assert step("zb-h1") - work == num_stages - 1


# ---- interleaved-1f1b ---------------------------------------------------------------------------
def test_interleaved_puts_stage_s_on_group_s_mod_p():
    lists = schedules.interleaved_one_f_one_b(8, 8, chunks=2)
    assert len(lists) == 4
    for g, actions in enumerate(lists):
        assert {a.stage for a in actions} == {g, g + 4}


def test_interleaved_runs_chunk_0_of_p_micro_batches_before_chunk_1():
    lists = schedules.interleaved_one_f_one_b(4, 4, chunks=2)  # P = 2
    forwards = [a for a in lists[0] if a.kind == "F"]
    assert " ".join(map(str, forwards)) == "0F0 0F1 2F0 2F1 0F2 0F3 2F2 2F3"
    backwards = [a for a in lists[0] if a.kind == "B"]
    assert " ".join(map(str, backwards)) == "2B0 2B1 0B0 0B1 2B2 2B3 0B2 0B3"


def test_interleaved_needs_micro_batches_a_multiple_of_the_device_groups():
    with pytest.raises(ValueError, match="needs a multiple of 4 micro-batches, got 6"):
        action_lists("interleaved-1f1b", 8, 6, chunks=2)


def test_interleaved_needs_stages_divisible_by_the_chunks():
    with pytest.raises(ValueError, match="the 6 stages must divide by 4"):
        action_lists("interleaved-1f1b", 6, 4, chunks=4)


# ---- the checker refuses what is not a schedule ---------------------------------------------------
def test_a_cycle_of_waits_between_groups_is_refused_as_a_deadlock():
    lists = [[F(0, 0), B(0, 0), F(0, 1), B(0, 1)], [F(1, 1), B(1, 1), F(1, 0), B(1, 0)]]
    with pytest.raises(ScheduleError, match=r"deadlocks.*group 0 at 0B0 waits for 1B0"):
        check_schedule(lists, 2, 2)


def test_the_timeline_of_a_deadlocked_schedule_is_refused_not_looped_on():
    lists = [[F(0, 0), B(0, 0), F(0, 1), B(0, 1)], [F(1, 1), B(1, 1), F(1, 0), B(1, 0)]]
    with pytest.raises(ScheduleError, match="deadlocks"):
        schedules.start_times(lists, 2)


def test_a_missing_action_is_refused_naming_it():
    lists = [[F(0, 0), B(0, 0)], [F(1, 0)]]
    with pytest.raises(ScheduleError, match="stage 1 must run F and B.*micro-batch 0.*runs F$"):
        check_schedule(lists, 2, 1)


def test_an_action_run_twice_is_refused():
    lists = [[F(0, 0), F(0, 0), B(0, 0)]]
    with pytest.raises(ScheduleError, match="micro-batch 0 exactly once; it runs B F F"):
        check_schedule(lists, 1, 1)


def test_a_backward_before_its_forward_on_the_same_group_is_a_dependency_violation():
    lists = [[B(0, 0), F(0, 0)], [F(1, 0), B(1, 0)]]
    with pytest.raises(ScheduleError, match=r"dependency violated on device group 0: 0B0"):
        check_schedule(lists, 2, 1)


def test_a_weight_gradient_before_its_input_gradient_is_a_dependency_violation():
    lists = [[F(0, 0), Action("W", 0, 0), Action("I", 0, 0)]]
    with pytest.raises(ScheduleError, match="0W0 .position 1. comes before 0I0"):
        check_schedule(lists, 1, 1)


def test_a_stage_split_over_two_groups_is_refused():
    lists = [[F(0, 0), B(0, 1)], [F(0, 1), B(0, 0)]]
    with pytest.raises(ScheduleError, match="stage 0 has actions on device groups 0 and 1"):
        check_schedule(lists, 1, 2)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ScheduleError, match="device group 0 runs Action.kind='X'"):
        check_schedule([[Action("X", 0, 0)]], 1, 1)


# ---- printing -----------------------------------------------------------------------------------
def test_timeline_draws_each_group_per_time_unit_and_reports_the_bubble():
    lists = schedules.gpipe(2, 2)
    assert schedules.format_timeline(lists, 2) == "\n".join(
        [
            "group 0 |F0 F1 .  .  .  B0    B1",
            "group 1 |.  F0 F1 B0    B1    .  .",
            "step: 9 time units (F=1, B=2, I=1, W=1), bubble 33.3%",
        ]
    )


def write_golden_files():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for name, s, m, v in GOLDEN_CASES:
        path = os.path.join(GOLDEN_DIR, f"{name}-S{s}-M{m}{f'-v{v}' if v > 1 else ''}.txt")
        with open(path, "w") as f:
            f.write(format_lists(action_lists(name, s, m, v)) + "\n")
        print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    write_golden_files()


@pytest.mark.parametrize("S,M", [(2, 4), (4, 8), (4, 16)])
def test_unit_bubble_is_the_closed_form_for_1f1b_gpipe_and_zb_h1(S, M):
    theory = (S - 1) / (M + S - 1)
    for name in ("1f1b", "gpipe"):
        lists = schedules.action_lists(name, S, M)
        assert schedules.unit_bubble(lists, S) == pytest.approx(theory), name
    # ZB-H1 with F = I = W = 1: the step is 3M + S - 1 units, each group busy 3M of them
    zb = schedules.unit_bubble(schedules.action_lists("zb-h1", S, M), S)
    assert zb == pytest.approx((S - 1) / (3 * M + S - 1))
