"""Pipeline schedules as data: for each stage, the ordered list of actions it runs in one step.

An action is ("F", i) (forward of micro-batch i) or ("B", i) (backward of micro-batch i).
Stages are numbered 0..S-1 from the input side. Every replica of a stage runs its stage's list.

Invariants every generator keeps (checked by `execution_order`):
  - each stage runs F(i) and B(i) exactly once for every micro-batch i, F(i) before B(i);
  - F(i) on stage s needs F(i) done on stage s-1; B(i) on stage s needs B(i) done on stage s+1;
  - the lists together are deadlock-free: a simulation that runs any stage's next action as
    soon as its inputs are done finishes every list.

`execution_order` returns one such simulated global order; the rewriter builds the graph in that
order, so each action's start ops can be created under a control dependency on the end op of
the stage's previous action (`rewrite._Builder.build_action`).
"""

from __future__ import annotations

from typing import Callable, Sequence

Action = tuple[str, int]


class ScheduleError(ValueError):
    """A schedule's action lists are inconsistent or would deadlock."""


def gpipe(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """GPipe: every stage runs all forwards in micro-batch order, then all backwards in the
    same order (the order of backwards does not change the result; this one frees the oldest
    activations first)."""
    _check_sizes(num_stages, num_micro_batches)
    actions = [("F", i) for i in range(num_micro_batches)] + [
        ("B", i) for i in range(num_micro_batches)
    ]
    return [list(actions) for _ in range(num_stages)]


def warmup_forwards(stage: int, num_stages: int, num_micro_batches: int) -> int:
    """Forwards stage `stage` (0-based) runs before its first backward under 1F1B: min(S-s, M).
    The last stage runs 1, so it alternates F, B from the start; stage 0 runs S (or M)."""
    return min(num_stages - stage, num_micro_batches)


def one_f_one_b(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """DAPPLE early backward (1F1B): stage s runs `warmup_forwards(s)` forwards, then alternates
    one backward and one forward until its forwards are used up, then drains the backwards.
    At most `warmup_forwards(s)` micro-batches are in flight on stage s at any time."""
    _check_sizes(num_stages, num_micro_batches)
    lists = []
    for s in range(num_stages):
        warmup = warmup_forwards(s, num_stages, num_micro_batches)
        actions: list[Action] = [("F", i) for i in range(warmup)]
        next_f, next_b = warmup, 0
        while next_b < num_micro_batches:
            actions.append(("B", next_b))
            next_b += 1
            if next_f < num_micro_batches:
                actions.append(("F", next_f))
                next_f += 1
        lists.append(actions)
    return lists


SCHEDULES: dict[str, Callable[[int, int], list[list[Action]]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def schedule_for(name: str, num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    try:
        generator = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule '{name}'; known: {', '.join(SCHEDULES)}") from None
    lists = generator(num_stages, num_micro_batches)
    execution_order(lists, num_micro_batches)  # fail here, not in the session, if it deadlocks
    return lists


def execution_order(
    lists: Sequence[Sequence[Action]], num_micro_batches: int
) -> list[tuple[int, Action]]:
    """Simulate the stages running their lists; return the (stage, action) pairs in one order in
    which every action's inputs are done before it. Raise ScheduleError if the lists are not a
    complete schedule or deadlock."""
    num_stages = len(lists)
    expected = sorted(
        [("F", i) for i in range(num_micro_batches)] + [("B", i) for i in range(num_micro_batches)]
    )
    for s, actions in enumerate(lists):
        if sorted(actions) != expected:
            raise ScheduleError(
                f"stage {s} must run F and B of each of the {num_micro_batches} "
                f"micro-batches exactly once; its list is {format_actions(actions)}"
            )
    done: set[tuple[int, Action]] = set()
    position = [0] * num_stages
    order: list[tuple[int, Action]] = []

    def ready(s: int, action: Action) -> bool:
        kind, i = action
        if kind == "F":
            return s == 0 or (s - 1, ("F", i)) in done
        return (s, ("F", i)) in done and (s == num_stages - 1 or (s + 1, ("B", i)) in done)

    while len(order) < num_stages * 2 * num_micro_batches:
        progressed = False
        for s in range(num_stages):
            if position[s] < len(lists[s]) and ready(s, lists[s][position[s]]):
                action = lists[s][position[s]]
                done.add((s, action))
                order.append((s, action))
                position[s] += 1
                progressed = True
        if not progressed:
            waiting = {
                s: format_actions([lists[s][position[s]]])
                for s in range(num_stages)
                if position[s] < len(lists[s])
            }
            raise ScheduleError(
                f"schedule deadlocks: every stage waits, next actions are {waiting}"
            )
    return order


def format_actions(actions: Sequence[Action]) -> str:
    return " ".join(f"{kind}{i}" for kind, i in actions)


def _check_sizes(num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1:
        raise ScheduleError(
            f"a schedule needs at least one stage and one micro-batch, got "
            f"{num_stages} stages and {num_micro_batches} micro-batches"
        )
