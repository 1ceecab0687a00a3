"""Pipeline schedules as data: the one place that spells out the order of a step's actions.

A schedule's generator returns, for each device group, the ordered list of actions the group
runs in one step. The rewriter builds its graph from these lists (graph_rewrite/schedule.py),
the event simulation plays them (planner/simulate.py), and the cost models read their peak
in-flight counts (`in_flight_peaks`). No TensorFlow here.

Terms. `S` stages, numbered 0..S-1 from the input side; `M` micro-batches. A device group holds
one stage (gpipe, 1f1b, zb-h1: group s is stage s), or, under interleaved schedules with `v`
chunks, `v` stages: `P = S / v` groups, stage s on group `s mod P`. Every replica of a group's
stages runs the group's list.

Actions (`Action(kind, stage, micro_batch)`):
  F  forward;
  B  full backward;
  I  input gradient, the part of a backward the stage before needs;
  W  weight gradient, the rest; a split schedule runs I and W instead of B.

What an action needs (`check_schedule` proves every list respects it and none deadlocks):
  F(s, i) needs F(s-1, i);
  B(s, i) and I(s, i) need F(s, i) and the input gradient (B or I) of (s+1, i);
  W(s, i) needs I(s, i).
A micro-batch is in flight on a stage from its F until its B (or W) is done: its activations
are kept that long, so peak in-flight counts bound activation memory.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Mapping, NamedTuple, Sequence

KINDS = ("F", "B", "I", "W")


class Action(NamedTuple):
    kind: str  # one of KINDS
    stage: int
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"


ActionLists = list[list[Action]]


class ScheduleError(ValueError):
    """A schedule's action lists are incomplete, break a dependency or deadlock; or a schedule
    is asked for with sizes it cannot serve."""


# ---- generators ---------------------------------------------------------------------------------
def gpipe(num_stages: int, num_micro_batches: int) -> ActionLists:
    """GPipe: every stage runs all forwards in micro-batch order, then all backwards in the
    same order (the order of backwards does not change the result; this one frees the oldest
    activations first). Every stage keeps all M micro-batches in flight."""
    _check_sizes(num_stages, num_micro_batches)
    return [
        [Action("F", s, i) for i in range(num_micro_batches)]
        + [Action("B", s, i) for i in range(num_micro_batches)]
        for s in range(num_stages)
    ]


def warmup_forwards(stage: int, num_stages: int, num_micro_batches: int) -> int:
    """Forwards stage `stage` (0-based) runs before its first backward under 1F1B: min(S-s, M).
    The last stage runs 1, so it alternates F, B from the start; stage 0 runs S (or M)."""
    return min(num_stages - stage, num_micro_batches)


def one_f_one_b(num_stages: int, num_micro_batches: int) -> ActionLists:
    """DAPPLE early backward (1F1B): stage s runs `warmup_forwards(s)` forwards, then alternates
    one backward and one forward until its forwards are used up, then drains the backwards.
    At most `warmup_forwards(s)` micro-batches are in flight on stage s at any time."""
    _check_sizes(num_stages, num_micro_batches)
    lists = []
    for s in range(num_stages):
        warmup = warmup_forwards(s, num_stages, num_micro_batches)
        actions = [Action("F", s, i) for i in range(warmup)]
        next_f = warmup
        for i in range(num_micro_batches):
            actions.append(Action("B", s, i))
            if next_f < num_micro_batches:
                actions.append(Action("F", s, next_f))
                next_f += 1
        lists.append(actions)
    return lists


def zero_bubble_h1(
    num_stages: int, num_micro_batches: int, held_back: Sequence[int] | None = None
) -> ActionLists:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): 1F1B with each backward
    split into I, on the critical path back through the stages, and W, which nothing waits for.
    Stage s runs 1F1B's warm-up forwards; then for each micro-batch its I, then the oldest
    waiting W once more than h_s are waiting, then the next forward; the W's still waiting fill
    the drain. The paper's h_s = s (`held_back` None) keeps s more micro-batches in flight on
    stage s than 1F1B does: every stage peaks at min(S, M) micro-batches, 1F1B's count on stage
    0. In bytes that is 1F1B's peak only if a pending W holds no more than a forward's tensors;
    `memory_bounded_held_back` gives the h_s that keep each stage within it when it holds more.
    With F, I and W equally long and h_s = s the bubble is (S-1)/(3M+S-1) against 1F1B's
    (S-1)/(M+S-1)."""
    _check_sizes(num_stages, num_micro_batches)
    if held_back is None:
        held_back = range(num_stages)
    elif len(held_back) != num_stages or any(h < 0 for h in held_back):
        raise ScheduleError(
            f"held_back needs one count >= 0 per stage ({num_stages}), got {list(held_back)}"
        )
    lists = []
    for s, hold in zip(range(num_stages), held_back):
        warmup = warmup_forwards(s, num_stages, num_micro_batches)
        actions = [Action("F", s, i) for i in range(warmup)]
        next_f = warmup
        waiting_w: collections.deque[int] = collections.deque()
        for i in range(num_micro_batches):
            actions.append(Action("I", s, i))
            waiting_w.append(i)
            if len(waiting_w) > hold:
                actions.append(Action("W", s, waiting_w.popleft()))
            if next_f < num_micro_batches:
                actions.append(Action("F", s, next_f))
                next_f += 1
        actions.extend(Action("W", s, i) for i in waiting_w)
        lists.append(actions)
    return lists


def peak_bytes(actions: Sequence[Action], forward_bytes: float, weight_bytes: float) -> float:
    """The most bytes one stage's pending micro-batches hold along its list: from F to I (or B)
    a micro-batch holds `forward_bytes` (the forward's tensors its backward reads), from I to W
    `weight_bytes` (the tensors its W reads)."""
    held = peak = 0.0
    for action in actions:
        if action.kind == "F":
            held += forward_bytes
        elif action.kind == "I":
            held += weight_bytes - forward_bytes
        elif action.kind == "B":
            held -= forward_bytes
        else:
            held -= weight_bytes
        peak = max(peak, held)
    return peak


def memory_bounded_held_back(
    num_stages: int,
    num_micro_batches: int,
    forward_bytes: Sequence[float | None],
    weight_bytes: Sequence[float | None],
) -> tuple[int, ...]:
    """ZB-H1's held-back W counts h_s that keep its peak memory at 1F1B's: per stage, the largest
    h_s <= s whose list's `peak_bytes` stays within min(S, M) forwards' bytes (what 1F1B's
    first stage holds, and every stage of a balanced pipeline under the paper's ZB-H1 when a
    pending W holds no more than a forward). A stage whose bytes are unknown (None) keeps the
    paper's h_s = s. When a pending W holds more than a forward (an MLP's: a layer's input and
    output gradient, against its input alone), later stages hold back fewer W's: less memory,
    more bubble."""
    S, M = num_stages, num_micro_batches
    held_back = list(range(S))
    for s in range(S):
        f, w = forward_bytes[s], weight_bytes[s]
        if f is None or w is None:
            continue
        budget = min(S, M) * f * (1 + 1e-9)
        while held_back[s] > 0:
            actions = zero_bubble_h1(S, M, held_back)[s]
            if peak_bytes(actions, f, w) <= budget:
                break
            held_back[s] -= 1
    return tuple(held_back)


def interleaved_one_f_one_b(num_stages: int, num_micro_batches: int, chunks: int) -> ActionLists:
    """Megatron-LM's interleaved 1F1B (Narayanan et al., SC'21), depth-first: `chunks` = v
    stages per device group, P = S / v groups, stage s on group s mod P, M a multiple of P.
    Each group works through its (micro-batch, chunk) pairs P micro-batches at a time: chunk 0
    of micro-batches 0..P-1, then chunk 1 of the same, ..., then chunk 0 of micro-batches
    P..2P-1; backwards go through the chunks in reverse. Group p runs
    min(2(P-p-1) + (v-1)P, vM) warm-up forwards, then alternates one forward and one backward,
    then drains the backwards."""
    groups = interleaved_groups(num_stages, num_micro_batches, chunks)
    passes = num_micro_batches * chunks  # forwards (and backwards) per group
    lists = []
    for p in range(groups):
        forwards = [_interleaved_action("F", k, p, groups, chunks) for k in range(passes)]
        backwards = [_interleaved_action("B", k, p, groups, chunks) for k in range(passes)]
        warmup = min(2 * (groups - p - 1) + (chunks - 1) * groups, passes)
        actions = forwards[:warmup]
        for k in range(passes - warmup):
            actions += [forwards[warmup + k], backwards[k]]
        actions += backwards[passes - warmup :]
        lists.append(actions)
    return lists


def interleaved_groups(num_stages: int, num_micro_batches: int, chunks: int) -> int:
    """P = S / v device groups of an interleaved schedule; ScheduleError unless v divides S and
    P divides M."""
    _check_sizes(num_stages, num_micro_batches)
    if chunks < 1 or num_stages % chunks:
        raise ScheduleError(
            f"an interleaved schedule puts {chunks} chunks (stages) on each device group, so "
            f"the {num_stages} stages must divide by {chunks}"
        )
    groups = num_stages // chunks
    if num_micro_batches % groups:
        raise ScheduleError(
            f"interleaved-1f1b with {num_stages} stages in {chunks} chunks runs on {groups} "
            f"device groups and needs a multiple of {groups} micro-batches, got "
            f"{num_micro_batches}"
        )
    return groups


def _interleaved_action(kind: str, k: int, group: int, groups: int, chunks: int) -> Action:
    """The k-th forward (or backward) of `group` under depth-first interleaving."""
    round_, position = divmod(k, groups * chunks)
    chunk = position // groups
    if kind == "B":
        chunk = chunks - 1 - chunk
    micro_batch = round_ * groups + position % groups
    return Action(kind, chunk * groups + group, micro_batch)


Generator = Callable[..., ActionLists]

SCHEDULES: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_one_f_one_b,
    "zb-h1": zero_bubble_h1,
    # PipeDream-2BW (Narayanan et al., ICML'21): 1F1B's order within a step; its difference is
    # the update rule (two weight versions per stage, a one-step-stale gradient: docs/async.md)
    "pipedream-2bw": one_f_one_b,
}
CHUNKED = ("interleaved-1f1b",)  # generators that take `chunks`
SPLIT_BACKWARD = ("zb-h1",)  # schedules whose backwards are I and W actions
# Asynchronous schedules: training differs from synchronous training by design, so a plan,
# trainer or planner search uses one only when the user opts in (`allow_async`).
ASYNC = ("pipedream-2bw",)
# what graph_rewrite can build
EXECUTABLE = ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b", *ASYNC)


def weight_versions(schedule: str) -> int:
    """Copies of the weights a stage keeps under `schedule`: 2 under pipedream-2bw (the
    weights and their previous version), else 1."""
    return 2 if schedule == "pipedream-2bw" else 1


def check_async_allowed(schedule: str, allow_async: bool, flag: str = "allow_async=True") -> None:
    """ScheduleError if `schedule` is asynchronous and the user did not opt in with `flag`."""
    if schedule in ASYNC and not allow_async:
        raise ScheduleError(
            f"schedule '{schedule}' is asynchronous: each step's gradient is computed on the "
            f"previous step's weights, so training differs from synchronous training "
            f"(docs/async.md); pass {flag} to use it"
        )


def action_lists(
    name: str,
    num_stages: int,
    num_micro_batches: int,
    chunks: int = 1,
    held_back: Sequence[int] | None = None,
) -> ActionLists:
    """The named schedule's lists, one per device group (`held_back`: zb-h1's per stage)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule '{name}'; known: {', '.join(SCHEDULES)}")
    if held_back is not None:
        if name != "zb-h1":
            raise ScheduleError(f"held_back counts are zb-h1's; schedule '{name}' has none")
        return zero_bubble_h1(num_stages, num_micro_batches, held_back)
    if name not in CHUNKED and chunks != 1:
        raise ScheduleError(
            f"schedule '{name}' puts one stage on each device group; {chunks} chunks need "
            f"{' or '.join(CHUNKED)}"
        )
    return [list(actions) for actions in _generated(name, num_stages, num_micro_batches, chunks)]


@functools.lru_cache(maxsize=1024)
def _generated(name: str, num_stages: int, num_micro_batches: int, chunks: int):
    """A generator's lists as tuples, generated once (the planner asks for the same sizes
    again and again: its memory model and its simulation both read them)."""
    if name in CHUNKED:
        lists = SCHEDULES[name](num_stages, num_micro_batches, chunks)
    else:
        lists = SCHEDULES[name](num_stages, num_micro_batches)
    return tuple(tuple(actions) for actions in lists)


def _check_sizes(num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1:
        raise ScheduleError(
            f"a schedule needs at least one stage and one micro-batch, got "
            f"{num_stages} stages and {num_micro_batches} micro-batches"
        )


# ---- the checker --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScheduleReport:
    # every action once, in an order where each action comes after what it needs: the groups
    # take turns (0, 1, ..., G-1, 0, ...), each running its next action if what that needs is
    # done. The rewriter builds the graph in this order.
    order: tuple[Action, ...]
    peak_in_flight: tuple[int, ...]  # per device group


def check_schedule(
    lists: Sequence[Sequence[Action]], num_stages: int, num_micro_batches: int
) -> ScheduleReport:
    """Prove `lists` (one per device group) are a schedule of S stages and M micro-batches:
    every (stage, micro-batch) runs F and B, or F, I and W, exactly once; each stage's actions
    are on one group; within a group nothing comes before what it needs; and playing the lists
    with blocking receives (an action starts only once what it needs is done) runs every
    action. Raise ScheduleError naming the first problem found."""
    _check_complete(lists, num_stages, num_micro_batches)
    needs = _needs(lists, num_stages)
    _check_group_order(lists, needs)
    return ScheduleReport(tuple(_play(lists, needs)), peak_in_flight(lists))


def _check_complete(lists, num_stages: int, num_micro_batches: int) -> None:
    group_of_stage: dict[int, int] = {}
    kinds_of: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for g, actions in enumerate(lists):
        for action in actions:
            kind, s, i = action
            if kind not in KINDS or not 0 <= s < num_stages or not 0 <= i < num_micro_batches:
                raise ScheduleError(
                    f"device group {g} runs {action!r}: expected a kind in {', '.join(KINDS)}, "
                    f"a stage in 0..{num_stages - 1} and a micro-batch in "
                    f"0..{num_micro_batches - 1}"
                )
            if group_of_stage.setdefault(s, g) != g:
                raise ScheduleError(
                    f"stage {s} has actions on device groups {group_of_stage[s]} and {g}; "
                    f"a stage lives on one device group"
                )
            kinds_of[(s, i)].append(kind)
    for s in range(num_stages):
        for i in range(num_micro_batches):
            kinds = sorted(kinds_of[(s, i)])
            if kinds not in (["B", "F"], ["F", "I", "W"]):
                runs = " ".join(kinds) or "nothing"
                raise ScheduleError(
                    f"stage {s} must run F and B, or F, I and W, of micro-batch {i} exactly "
                    f"once; it runs {runs}"
                )


def _needs(lists, num_stages: int) -> dict[Action, tuple[Action, ...]]:
    """What each action of a complete schedule needs (see the module docstring)."""
    input_gradient = {
        (a.stage, a.micro_batch): a for actions in lists for a in actions if a.kind in "BI"
    }
    needs = {}
    for actions in lists:
        for action in actions:
            kind, s, i = action
            if kind == "F":
                needs[action] = (Action("F", s - 1, i),) if s > 0 else ()
            elif kind == "W":
                needs[action] = (Action("I", s, i),)
            elif s == num_stages - 1:
                needs[action] = (Action("F", s, i),)
            else:
                needs[action] = (Action("F", s, i), input_gradient[(s + 1, i)])
    return needs


def _check_group_order(lists, needs: Mapping[Action, tuple[Action, ...]]) -> None:
    position = {
        action: (g, k) for g, actions in enumerate(lists) for k, action in enumerate(actions)
    }
    for g, actions in enumerate(lists):
        for k, action in enumerate(actions):
            for need in needs[action]:
                need_group, need_k = position[need]
                if need_group == g and need_k > k:
                    raise ScheduleError(
                        f"dependency violated on device group {g}: {action} (position {k}) "
                        f"comes before {need} (position {need_k}), which it needs"
                    )


def _play(lists, needs: Mapping[Action, tuple[Action, ...]]) -> list[Action]:
    """Run the lists with blocking receives; return the order the actions ran in (see
    ScheduleReport.order). Raise ScheduleError if every group waits."""
    done: set[Action] = set()
    position = [0] * len(lists)
    order: list[Action] = []
    total = sum(len(actions) for actions in lists)
    while len(order) < total:
        progressed = False
        for g, actions in enumerate(lists):
            if position[g] < len(actions) and all(n in done for n in needs[actions[position[g]]]):
                action = actions[position[g]]
                done.add(action)
                order.append(action)
                position[g] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(_deadlock_message(lists, position, needs, done))
    return order


def _deadlock_message(lists, position, needs, done) -> str:
    waits = []
    for g, actions in enumerate(lists):
        if position[g] < len(actions):
            action = actions[position[g]]
            missing = " ".join(str(n) for n in needs[action] if n not in done)
            waits.append(f"group {g} at {action} waits for {missing}")
    return "schedule deadlocks: every device group waits: " + "; ".join(waits)


def peak_in_flight(lists: Sequence[Sequence[Action]]) -> tuple[int, ...]:
    """Per device group: the most micro-batches (of all its stages) whose F ran and whose B or
    W has not, at any point of its list: `peak_bytes` with a micro-batch as the unit."""
    return tuple(int(peak_bytes(actions, 1, 1)) for actions in lists)


@functools.lru_cache(maxsize=1024)
def in_flight_peaks(
    name: str, num_stages: int, num_micro_batches: int, chunks: int = 1
) -> tuple[int, ...]:
    """`peak_in_flight` of the named schedule's lists (cached: the planner's memory model asks
    for it once per candidate)."""
    return peak_in_flight(action_lists(name, num_stages, num_micro_batches, chunks))


# ---- printing -----------------------------------------------------------------------------------
def format_actions(actions: Sequence[Action]) -> str:
    """'F0 F1 B0 ...' for a list of one stage; '0F0 2F0 ...' (stage first) when it holds several."""
    if len({a.stage for a in actions}) <= 1:
        return " ".join(f"{a.kind}{a.micro_batch}" for a in actions)
    return " ".join(str(a) for a in actions)


def format_lists(lists: Sequence[Sequence[Action]]) -> str:
    """One line per device group: its stages, then its actions."""
    lines = []
    for g, actions in enumerate(lists):
        stages = sorted({a.stage for a in actions})
        named = (
            f"stage {stages[0]}" if len(stages) == 1 else f"stages {', '.join(map(str, stages))}"
        )
        lines.append(f"group {g} ({named}): {format_actions(actions)}")
    return "\n".join(lines)


# ---- a timeline ---------------------------------------------------------------------------------
UNIT_DURATIONS = {"F": 1, "B": 2, "I": 1, "W": 1}  # a backward is its two halves


def start_times(
    lists: Sequence[Sequence[Action]],
    num_stages: int,
    durations: Mapping[str, int] = UNIT_DURATIONS,
) -> list[list[int]]:
    """Per device group, when each of its actions starts if each takes `durations[kind]` time
    units, transfers take none, and a group starts its next action once it is free and what
    the action needs has ended. The lists must pass `check_schedule`."""
    needs = _needs(lists, num_stages)
    end: dict[Action, int] = {}
    starts: list[list[int]] = [[] for _ in lists]
    free = [0] * len(lists)
    while len(end) < sum(len(actions) for actions in lists):
        ended = len(end)
        for g, actions in enumerate(lists):
            while len(starts[g]) < len(actions):
                action = actions[len(starts[g])]
                if not all(n in end for n in needs[action]):
                    break
                start = max([free[g]] + [end[n] for n in needs[action]])
                starts[g].append(start)
                free[g] = end[action] = start + durations[action.kind]
        if len(end) == ended:
            raise ScheduleError("schedule deadlocks (check_schedule says where)")
    return starts


def unit_bubble(
    lists: Sequence[Sequence[Action]],
    num_stages: int,
    durations: Mapping[str, int] = UNIT_DURATIONS,
) -> float:
    """The idle share of the device groups' time over the step (`start_times`' model): for 1F1B
    and GPipe with B = 2F, (S-1)/(M+S-1); the theory a measured bubble is compared with."""
    starts = start_times(lists, num_stages, durations)
    span = max(t + durations[a.kind] for row, acts in zip(starts, lists) for t, a in zip(row, acts))
    busy = sum(durations[a.kind] for actions in lists for a in actions)
    return 1.0 - busy / (span * len(lists))


def format_timeline(
    lists: Sequence[Sequence[Action]],
    num_stages: int,
    durations: Mapping[str, int] = UNIT_DURATIONS,
) -> str:
    """A text Gantt chart: one row per device group, one column per time unit, '.' idle; then
    the step's length and bubble (idle share of the groups' time)."""
    starts = start_times(lists, num_stages, durations)
    single_stage = all(len({a.stage for a in actions}) == 1 for actions in lists)
    labels = [
        [f"{a.kind}{a.micro_batch}" if single_stage else str(a) for a in actions]
        for actions in lists
    ]
    width = max(len(label) for row in labels for label in row) + 1
    span = max(t + durations[a.kind] for row, acts in zip(starts, lists) for t, a in zip(row, acts))
    rows = []
    for g, actions in enumerate(lists):
        cells = ["."] * span
        for t, action, label in zip(starts[g], actions, labels[g]):
            cells[t] = label
            for u in range(t + 1, t + durations[action.kind]):
                cells[u] = ""
        rows.append(f"group {g} |" + "".join(c.ljust(width) for c in cells).rstrip())
    bubble = unit_bubble(lists, num_stages, durations)
    units = ", ".join(f"{k}={durations[k]}" for k in KINDS)
    rows.append(f"step: {span} time units ({units}), bubble {bubble:.1%}")
    return "\n".join(rows)
