"""Event-level simulation of one training step of a pipeline schedule.

A schedule is data: for each device group, the ordered actions F(i) / B(i), or F(i) / I(i) /
W(i), of its stages, from the schedule library (planner/schedules.py; one stage per group, or
under interleaved-1f1b `chunks` stages per group, stage s on group s mod P). `simulate` plays
them: a group runs one action at a time in its order; F(i) on stage s starts once F(i) left
stage s-1 and crossed the boundary, B(i) or I(i) once the input gradient of (s+1, i) left stage
s+1 and crossed back (on the last stage, once its own F(i) is done), W(i) once the group is free
(its I(i) came before it). Transfers occupy the boundary link, not the groups (send/recv run
beside compute); each direction of a link carries one micro-batch at a time, in order (full
duplex). After its last action a group allreduces its stages' gradients across their replicas,
overlapping the other groups' drain.

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


@functools.lru_cache(maxsize=64)
def _cached_actions(schedule: str, num_stages: int, num_micro_batches: int, chunks: int = 1):
    """Per device group, its actions as (kind, stage, micro-batch), what the simulation loop
    reads."""
    lists = schedules.action_lists(schedule, num_stages, num_micro_batches, chunks)
    groups = len(lists)
    for g, actions in enumerate(lists):
        if any(a.stage % groups != g for a in actions):
            raise ValueError(
                f"simulate plays schedules with stage s on device group s mod P; '{schedule}' "
                f"is not one"
            )
    return tuple(tuple((a.kind, a.stage, a.micro_batch) for a in actions) for actions in lists)


def chunks_of(schedule: str, devices: Sequence[Sequence[int]]) -> int:
    """Stages per device group of a candidate (its stages' device lists): 1 but under an
    interleaved schedule, where the distinct lists are the groups."""
    if schedule not in schedules.CHUNKED:
        return 1
    return len(devices) // len({tuple(d) for d in devices})


@dataclasses.dataclass(frozen=True)
class SimResult:
    step_time_s: float
    compute_end_s: tuple[float, ...]  # per device group (stage): end of its last action
    busy_s: tuple[float, ...]  # per device group (stage): compute time per step

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
    (S-1), one micro-batch one way (the gradient going back takes as long); allreduce_s: per stage
    (a device group runs its stages' allreduces one after another after its last action).
    `chunks`: stages per device group (interleaved-1f1b).

    Beyond EXTRAPOLATE_ABOVE micro-batches the pipeline is in (or near) its steady state, where
    each further micro-batch adds about the same time to each stage's end: the ends are
    extrapolated linearly from runs with EXTRAPOLATE_ABOVE/2 and EXTRAPOLATE_ABOVE micro-batches
    (within 0.1% of the full simulation on random pipelines; see the tests)."""
    M = num_micro_batches
    if M > EXTRAPOLATE_ABOVE:
        lo, hi = EXTRAPOLATE_ABOVE // 2, EXTRAPOLATE_ABOVE
        a = _simulate(schedule, forward_s, backward_s, transfer_s, allreduce_s, lo, chunks)
        b = _simulate(schedule, forward_s, backward_s, transfer_s, allreduce_s, hi, chunks)
        ends = tuple(
            eb + (eb - ea) * (M - hi) / (hi - lo)
            for ea, eb in zip(a.compute_end_s, b.compute_end_s)
        )
        return _result(ends, forward_s, backward_s, allreduce_s, M)
    return _simulate(schedule, forward_s, backward_s, transfer_s, allreduce_s, M, chunks)


def _result(ends, forward_s, backward_s, allreduce_s, num_micro_batches) -> SimResult:
    """The step from each device group's compute end: group g holds stages g, g + P, ..."""
    groups = len(ends)
    tails = [sum(allreduce_s[g::groups]) for g in range(groups)]
    busy = [
        num_micro_batches * (sum(forward_s[g::groups]) + sum(backward_s[g::groups]))
        for g in range(groups)
    ]
    step = max(e + r for e, r in zip(ends, tails))
    return SimResult(step, tuple(ends), tuple(busy))


def _simulate(
    schedule, forward_s, backward_s, transfer_s, allreduce_s, num_micro_batches, chunks=1
):
    S, M = len(forward_s), num_micro_batches
    actions = _cached_actions(schedule, S, M, chunks)
    G = len(actions)
    unset = -1.0
    f_arrive = [[unset] * M for _ in range(S)]  # F(i) output available at stage s+1
    b_arrive = [[unset] * M for _ in range(S)]  # B(i) gradient available at stage s-1
    f_own = [[unset] * M for _ in range(S)]
    link_f = [0.0] * S  # forward link s -> s+1 free at
    link_b = [0.0] * S  # backward link s -> s-1 free at
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
            current = -1  # the stage whose numbers are loaded (a group's list may switch)
            while p < n:
                kind, s, i = acts[p]
                if s != current:
                    current = s
                    prev_f = f_arrive[s - 1] if s > 0 else None
                    next_b = b_arrive[s + 1] if s < S - 1 else None
                    fwd, bwd = forward_s[s], backward_s[s]
                    input_part = bwd * INPUT_GRADIENT_SHARE
                    tr_out = transfer_s[s] if s < S - 1 else 0.0
                    tr_in = transfer_s[s - 1] if s > 0 else 0.0
                if kind == "F":
                    ready = 0.0 if prev_f is None else prev_f[i]
                    if ready == unset:
                        break
                    t = (ready if ready > t else t) + fwd
                    f_own[s][i] = t
                    if s < S - 1:
                        start = t if t > link_f[s] else link_f[s]
                        link_f[s] = f_arrive[s][i] = start + tr_out
                elif kind == "W":
                    t += bwd - input_part
                else:  # B, or I: the backward's input gradient, then sent back
                    ready = f_own[s][i] if next_b is None else next_b[i]
                    if ready == unset:
                        break
                    t = (ready if ready > t else t) + (bwd if kind == "B" else input_part)
                    if s > 0:
                        start = t if t > link_b[s] else link_b[s]
                        link_b[s] = b_arrive[s][i] = start + tr_in
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
    return _result(free_at, forward_s, backward_s, allreduce_s, M)
