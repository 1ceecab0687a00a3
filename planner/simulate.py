"""Event-level simulation of one training step of a pipeline schedule.

A schedule is data: for each device group, the ordered actions F(s, i) / B(s, i), or
F / I(s, i) / W(s, i), it runs, from the schedule library (planner/schedules.py: gpipe, 1f1b and
zb-h1 put one stage on each group, interleaved-1f1b several). `simulate` plays them: a group runs
one action at a time in its order; F(s, i) starts once F(s-1, i) ended and crossed the boundary,
B(s, i) or I(s, i) once the input gradient of (s+1, i) ended and crossed back (on the last stage,
once its own F(i) is done), W(s, i) once the group is free (its I(s, i) came before it).
Transfers occupy a link between two groups, not the groups (send/recv run beside compute); each
direction of a link carries one micro-batch at a time, in order (full duplex). After its last
action a stage allreduces its gradients across its replicas, overlapping the other stages'
drain.

A split backward's times are not measured: I takes `INPUT_GRADIENT_SHARE` of the stage's
backward time and W the rest. Half each is the rule of the zero-bubble paper (Qi et al., ICLR
2024) for matmul layers: the input gradient and the weight gradient of `x @ w` are one matmul
each, of the forward's FLOPs. (In this runtime a first stage, which sends no input gradient,
runs its whole backward in W; zb-h1 runs its W right after its I, so that changes no end time.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from planner import schedules


INPUT_GRADIENT_SHARE = 0.5  # of a stage's backward time, for I; W takes the rest


F, B, I, W = 0, 1, 2, 3  # action kinds as the simulation loop reads them


@functools.lru_cache(maxsize=1024)
def _cached_actions(schedule: str, num_stages: int, num_micro_batches: int, chunks: int):
    """Per device group, its actions as (kind code, stage, micro-batch, link) tuples, what the
    simulation loop reads: `link` numbers the direction of the link the action's result
    crosses (from group g to group h: g * groups + h), -1 when it crosses none."""
    lists = schedules.action_lists(schedule, num_stages, num_micro_batches, chunks)
    groups = len(lists)
    code = {"F": F, "B": B, "I": I, "W": W}
    played = []
    for g, actions in enumerate(lists):
        if any(a.stage % groups != g for a in actions):
            raise ValueError(
                f"simulate plays schedules with stage s on device group s mod P; '{schedule}' "
                f"is not one"
            )
        row = []
        for a in actions:
            s = a.stage
            link = -1
            if a.kind == "F" and s < num_stages - 1:
                link = g * groups + (s + 1) % groups
            elif a.kind in "BI" and s > 0:
                link = g * groups + (s - 1) % groups
            row.append((code[a.kind], s, a.micro_batch, link))
        played.append(tuple(row))
    return tuple(played)


@dataclasses.dataclass(frozen=True)
class SimResult:
    step_time_s: float
    compute_end_s: tuple[float, ...]  # per stage: end of its last backward (or W)
    busy_s: tuple[float, ...]  # per device group: compute time per step

    @property
    def bubble_fraction(self) -> float:
        span = max(self.compute_end_s)
        return 1.0 - sum(self.busy_s) / (span * len(self.busy_s)) if span > 0 else 0.0


EXTRAPOLATE_ABOVE = 256


def simulate(
    schedule: str,
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    transfer_s: Sequence[float],
    allreduce_s: Sequence[float],
    num_micro_batches: int,
    chunks: int = 1,
) -> SimResult:
    """forward_s/backward_s: per stage, one micro-batch on one replica; transfer_s: per boundary
    (S-1), one micro-batch one way (the gradient going back takes as long); allreduce_s: per stage.
    `chunks` > 1 (interleaved-1f1b): stage s on device group s mod (S / chunks); a group runs
    its stages' actions one at a time, and all transfers from one group to another share that
    direction of their link.

    Beyond EXTRAPOLATE_ABOVE micro-batches the pipeline is in (or near) its steady state, where
    each further micro-batch adds about the same time to each stage's end: the ends are
    extrapolated linearly from runs with EXTRAPOLATE_ABOVE/2 and EXTRAPOLATE_ABOVE micro-batches
    (within 0.1% of the full simulation on random pipelines for 1f1b and gpipe, 0.5% for zb-h1
    and interleaved-1f1b; see the tests). Interleaved schedules, whose micro-batch count must
    divide by the groups, are extrapolated from the nearest multiples."""
    M = num_micro_batches
    times = (forward_s, backward_s, transfer_s, allreduce_s)
    if M > EXTRAPOLATE_ABOVE:
        groups = len(forward_s) // chunks if chunks > 1 else 1
        hi = EXTRAPOLATE_ABOVE - EXTRAPOLATE_ABOVE % groups
        lo = hi // 2 - (hi // 2) % groups
        a = _simulate(schedule, *times, lo, chunks)
        b = _simulate(schedule, *times, hi, chunks)
        ends = tuple(
            eb + (eb - ea) * (M - hi) / (hi - lo)
            for ea, eb in zip(a.compute_end_s, b.compute_end_s)
        )
        step = max(e + r for e, r in zip(ends, allreduce_s))
        return SimResult(step, ends, group_busy_s(forward_s, backward_s, M, chunks))
    return _simulate(schedule, *times, M, chunks)


def group_busy_s(forward_s, backward_s, num_micro_batches, chunks) -> tuple[float, ...]:
    """Per device group (stage s on group s mod S/chunks): its compute time per step."""
    groups = len(forward_s) // chunks
    busy = [0.0] * groups
    for s, (f, b) in enumerate(zip(forward_s, backward_s)):
        busy[s % groups] += num_micro_batches * (f + b)
    return tuple(busy)


def _simulate(schedule, forward_s, backward_s, transfer_s, allreduce_s, num_micro_batches, chunks):
    S, M = len(forward_s), num_micro_batches
    actions = _cached_actions(schedule, S, M, chunks)
    G = len(actions)
    unset = -1.0
    f_arrive = [[unset] * M for _ in range(S)]  # F(s, i)'s output available at stage s+1
    b_arrive = [[unset] * M for _ in range(S)]  # B/I(s, i)'s gradient available at stage s-1
    f_own = [[unset] * M for _ in range(S)]
    # per kind code (F, B, I, W) and stage: how long the action takes
    duration = (
        list(forward_s),
        list(backward_s),
        [b * INPUT_GRADIENT_SHARE for b in backward_s],
        [b * (1.0 - INPUT_GRADIENT_SHARE) for b in backward_s],
    )
    stage_end = [0.0] * S
    link_free = [0.0] * (G * G)  # per direction of a link between two groups
    pos = [0] * G
    free_at = [0.0] * G
    remaining = sum(len(acts) for acts in actions)
    descending = False
    while remaining:
        progressed = False
        # sweep up the pipeline for forwards, down for backwards, alternately
        for g in range(G - 1, -1, -1) if descending else range(G):
            acts, p, t = actions[g], pos[g], free_at[g]
            n = len(acts)
            while p < n:
                kind, s, i, link = acts[p]
                if kind == F:
                    ready = 0.0 if s == 0 else f_arrive[s - 1][i]
                    if ready == unset:
                        break
                    t = (ready if ready > t else t) + duration[F][s]
                    f_own[s][i] = t
                    if link >= 0:
                        free = link_free[link]
                        link_free[link] = f_arrive[s][i] = (t if t > free else free) + transfer_s[s]
                elif kind == W:
                    t += duration[W][s]
                else:  # B, or I: the backward's input gradient, then sent back
                    ready = f_own[s][i] if s == S - 1 else b_arrive[s + 1][i]
                    if ready == unset:
                        break
                    t = (ready if ready > t else t) + duration[kind][s]
                    if link >= 0:
                        free = link_free[link]
                        link_free[link] = b_arrive[s][i] = (t if t > free else free) + transfer_s[
                            s - 1
                        ]
                stage_end[s] = t
                p += 1
            if p != pos[g]:
                remaining -= p - pos[g]
                pos[g], free_at[g] = p, t
                progressed = True
        descending = not descending
        if not progressed and not descending:
            raise RuntimeError(
                f"schedule {schedule} deadlocks with {S} stages and {M} micro-batches"
            )
    ends = tuple(stage_end)
    step = max(e + a for e, a in zip(ends, allreduce_s))
    return SimResult(step, ends, group_busy_s(forward_s, backward_s, M, chunks))
