"""Cost model "dapple-tf" (the default): memory-checked, schedule-simulated step time.

A candidate: stages over contiguous cut points of a topological layer order, stage s with
`r_s` replicas on a device set, micro-batch size `b` (rows; b divisible by every r_s, so the
runtime can execute it), `M = GBS / b` micro-batches, a schedule of the library ("zb-h1": its I
and W each half of the stage's backward, planner/simulate.py; "interleaved-1f1b": stages
round-robin on device groups, `chunks_of`).

Per micro-batch and replica: forward/backward time = profile ms/1000 x (b / r_s) / PBS (linear in
rows). A boundary moves `out x b / PBS` bytes one way per micro-batch (activations forward,
gradients back); with split/concat between r and r' replicas the busiest link carries
max(1/r, 1/r') of it, over intra-host p2p bandwidth when both stages sit on one host, else
inter-host p2p. Gradients: ring allreduce 2(r-1)/r x parameter bytes over intra-host bandwidth
inside a host, else the inter-host allreduce bandwidth; it starts when the stage's last backward
ends. Step time comes from `simulate`.

Memory per device of stage s:
    parameters x (weight versions + 1 gradients + optimizer_slots)   (versions: 1; pipedream-2bw 2)
  + activations of one micro-batch on this replica x the micro-batches the schedule keeps in
        flight on the stage (`planner.schedules.in_flight_peaks`; 1f1b: min(S - s, M), gpipe: M)
  + 2 x the larger boundary buffer (input or output, one micro-batch: activation + gradient)
A device group holding several stages (interleaved) holds all their parameters and buffers, and
its in-flight micro-batch chunks each at its largest stage's activations (`device_group_memory`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from planner.cluster import Cluster
from planner.profile import Profile
from planner.schedules import SPLIT_BACKWARD, in_flight_peaks, weight_versions
from planner.simulate import group_busy_s, simulate
from planner.states import States, topological_states


@dataclasses.dataclass(frozen=True)
class DappleEval:
    step_time_s: float
    speedup: float
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    transfer_s: tuple[float, ...]
    allreduce_s: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]
    fits: bool
    bubble_fraction: float
    simulated: bool = True  # False: skipped (does not fit, or cannot beat `skip_above`)


def chunks_of(devices: Sequence[Sequence[int]]) -> int:
    """Stages per device group of a layout: 1 when every stage has devices of its own; v when
    the S stages sit round-robin on P = S / v groups (stage s on the devices of stage s mod P,
    interleaved-1f1b's contract). ValueError for any other sharing of devices."""
    layout = [tuple(d) for d in devices]
    groups = len(set(layout))
    if groups == len(layout):
        return 1
    if len(layout) % groups or any(d != layout[s % groups] for s, d in enumerate(layout)):
        raise ValueError(
            f"stages share devices other than round-robin (stage s on the devices of stage "
            f"s mod {groups}): {layout}"
        )
    return len(layout) // groups


def device_group_memory(
    stage_memory, begins, ends, devices, micro_batch_size: int, in_flight: Sequence[int]
) -> list[float]:
    """Per stage, the peak memory of the device group holding it. One stage per group: its
    `stage_memory` with the group's in-flight count. Several (interleaved): the sum of its
    stages' memory with nothing in flight, plus the group's in-flight micro-batch chunks each
    holding as much as its largest stage keeps for one."""
    S, groups = len(ends), len(in_flight)
    spans = list(zip(begins, ends, (len(d) for d in devices)))
    if groups == S:
        return [
            stage_memory(b, e, r, micro_batch_size, in_flight[s])
            for s, (b, e, r) in enumerate(spans)
        ]
    fixed = [stage_memory(b, e, r, micro_batch_size, 0) for b, e, r in spans]
    per_chunk = [
        stage_memory(b, e, r, micro_batch_size, 1) - f for (b, e, r), f in zip(spans, fixed)
    ]
    group = [
        sum(fixed[g::groups]) + in_flight[g] * max(per_chunk[g::groups]) for g in range(groups)
    ]
    return [group[s % groups] for s in range(S)]


class DappleModel:
    def __init__(
        self,
        profile: Profile,
        cluster: Cluster,
        global_batch_size: int,
        optimizer_slots: float = 2.0,
        states: States | None = None,
    ):
        self.profile = profile
        self.cluster = cluster
        self.gbs = global_batch_size
        self.pbs = profile.batch_size
        self.optimizer_slots = optimizer_slots
        self.states = states if states is not None else topological_states(profile)
        st = self.states
        self.L = len(st)
        self.cum_fwd = np.asarray(st.forward_s, dtype=float)
        self.cum_bwd = np.asarray(st.backward_s, dtype=float)
        self.cum_params = np.asarray(st.params, dtype=float)
        self.cum_act = np.asarray(st.activations, dtype=float)
        self.out = np.asarray(st.out_bytes, dtype=float)
        # one device, whole global batch, no communication
        self.single_device_s = float(self.cum_fwd[-1] + self.cum_bwd[-1]) * self.gbs / self.pbs

    # ---- building blocks (also used by the search, vectorised there) ------------------------------
    def rng(self, cum: np.ndarray, b: int, e: int) -> float:
        return States.range_sum(cum, b, e)

    def link_bandwidth(self, a: Sequence[int], b: Sequence[int]) -> float:
        c = self.cluster
        return (
            c.intra_host_bandwidth
            if c.within_one_host(list(a) + list(b))
            else c.inter_host_bandwidth
        )

    def allreduce_s(self, devices: Sequence[int], nbytes: float) -> float:
        n = len(devices)
        if n <= 1:
            return 0.0
        c = self.cluster
        bw = (
            c.intra_host_bandwidth
            if c.within_one_host(devices)
            else c.inter_host_allreduce_bandwidth
        )
        return 2.0 * (n - 1) / n * nbytes / bw

    def stage_memory(
        self,
        b_state: int,
        e_state: int,
        replicas: int,
        micro_batch_size: int,
        in_flight: int,
        versions: int = 1,
    ) -> float:
        rows = micro_batch_size / replicas / self.pbs
        params = self.rng(self.cum_params, b_state, e_state)
        act = self.rng(self.cum_act, b_state, e_state)
        boundary_in = self.out[b_state - 1] if b_state > 0 else 0.0
        boundary_out = self.out[e_state] if e_state < self.L - 1 else 0.0
        return (
            params * (versions + 1.0 + self.optimizer_slots)
            + in_flight * act * rows
            + 2.0 * max(boundary_in, boundary_out) * rows
        )

    def dp_speedup(self, num_devices: int) -> float:
        """Plain data parallelism on the largest device count <= num_devices dividing GBS."""
        n = max(d for d in range(1, num_devices + 1) if self.gbs % d == 0)
        ar = self.allreduce_s(range(n), float(self.cum_params[-1]))
        return self.single_device_s / (self.single_device_s / n + ar)

    # ---- a whole candidate ------------------------------------------------------------------------
    def evaluate(
        self,
        ends: Sequence[int],
        devices: Sequence[Sequence[int]],
        micro_batch_size: int,
        schedule: str,
        device_memory: float | None = None,
        skip_above: float | None = None,
    ) -> DappleEval:
        """Simulated step time, speedup and per-stage peak memory of one candidate. With
        `skip_above`, a candidate that does not fit, or whose lower bound (each stage's own work
        plus the fill and drain through the stages before it) is above it, is not simulated:
        its step_time_s is then that bound (inf when it does not fit)."""
        S = len(ends)
        M = self.gbs // micro_batch_size
        begins = [0] + [e + 1 for e in ends[:-1]]
        chunks = chunks_of(devices)
        in_flight = in_flight_peaks(schedule, S, M, chunks)
        fwd, bwd, ar = [], [], []
        for s, (b, e) in enumerate(zip(begins, ends)):
            r = len(devices[s])
            rows = micro_batch_size / r / self.pbs
            fwd.append(self.rng(self.cum_fwd, b, e) * rows)
            bwd.append(self.rng(self.cum_bwd, b, e) * rows)
            ar.append(self.allreduce_s(devices[s], self.rng(self.cum_params, b, e)))
        mem = device_group_memory(
            functools.partial(self.stage_memory, versions=weight_versions(schedule)),
            begins,
            ends,
            devices,
            micro_batch_size,
            in_flight,
        )
        transfer = []
        for s in range(S - 1):
            nbytes = self.out[ends[s]] * micro_batch_size / self.pbs
            busiest = nbytes / min(len(devices[s]), len(devices[s + 1]))
            transfer.append(busiest / self.link_bandwidth(devices[s], devices[s + 1]))
        limit = device_memory if device_memory is not None else self.cluster.device_memory_bytes
        fits = max(mem) <= limit
        if skip_above is not None:
            # Stage s starts once micro-batch 0 went through the stages before it and, where its
            # last action is a backward (not a W held back: zb-h1), ends before they drain.
            drains = schedule not in SPLIT_BACKWARD
            bound = max(group_busy_s(fwd, bwd, M, chunks))  # a device group's own work
            through = 0.0
            for s in range(S):
                bound = max(
                    bound, through + M * (fwd[s] + bwd[s]), M * transfer[s - 1] if s else 0.0
                )
                out = transfer[s] if s < S - 1 else 0.0
                through += fwd[s] + out + (bwd[s] + out if drains else 0.0)
            if not fits or bound > skip_above:
                step = bound if fits else float("inf")
                return DappleEval(
                    step,
                    self.single_device_s / step if step else 0.0,
                    tuple(fwd),
                    tuple(bwd),
                    tuple(transfer),
                    tuple(ar),
                    tuple(mem),
                    fits,
                    0.0,
                    simulated=False,
                )
        sim = simulate(schedule, fwd, bwd, transfer, ar, M, chunks)
        return DappleEval(
            sim.step_time_s,
            self.single_device_s / sim.step_time_s,
            tuple(fwd),
            tuple(bwd),
            tuple(transfer),
            tuple(ar),
            tuple(mem),
            fits,
            sim.bubble_fraction,
        )
