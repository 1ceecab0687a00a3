"""Cost model "hpgo": the published DAPPLE planner's (HPGO 0.9.2) scoring, number for number.

See ../shared/reference/hpgo-cost-model.md. Times are seconds for the whole global batch on one
GPU (profile ms / 1000 x GBS/PBS), activation bytes scale by GBS/PBS, parameter bytes do not.
A plan here is `HpgoPlan`: contiguous state ranges, `slots` per stage, the pipeline replicated
`rp` times (a stage has slots*rp devices), micro-batches of `mbs` rows per pipeline replica.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from planner.cluster import Cluster
from planner.states import States


def allreduce_time(cluster: Cluster, devices: Sequence[int], nbytes: float) -> float:
    n = len(devices)
    if n <= 1:
        return 0.0
    ring = nbytes * 2.0 * (n - 1) / n
    if not cluster.within_one_host(devices):
        return ring / cluster.inter_host_allreduce_bandwidth
    return ring / cluster.intra_host_bandwidth / (n // 2)


def transfer_time(cluster: Cluster, src: Sequence[int], dst: Sequence[int], nbytes: float) -> float:
    if not cluster.within_one_host(dst):
        return nbytes / cluster.inter_host_allreduce_bandwidth
    host = cluster.host_of(dst[0])
    outside = len(src) - _count_on_host(cluster, src, host)
    if outside:
        return nbytes * outside / len(src) / cluster.inter_host_bandwidth
    return nbytes / cluster.intra_host_bandwidth


def _count_on_host(cluster: Cluster, devices: Sequence[int], host: int) -> int:
    first, last = devices[0], devices[-1]
    if last - first + 1 == len(devices):  # a contiguous range: count by arithmetic
        lo, hi = cluster.host_start(host), cluster.seps[host]
        return max(0, min(last + 1, hi) - max(first, lo))
    return sum(1 for d in devices if cluster.host_of(d) == host)


@dataclasses.dataclass(frozen=True)
class HpgoPlan:
    ends: tuple[int, ...]  # last state of each stage
    devices: tuple[tuple[int, ...], ...]  # device set of each stage (slots * rp devices)
    rp: int  # pipeline replicas
    mbs: int = 1  # rows per micro-batch per pipeline replica
    two_stage_split: bool = False  # scored as the exhaustive 2-stage split (no factor 2)

    @property
    def begins(self) -> tuple[int, ...]:
        return (0,) + tuple(e + 1 for e in self.ends[:-1])

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(len(d) // self.rp for d in self.devices)


@dataclasses.dataclass(frozen=True)
class HpgoScore:
    speedup: float
    total_s: float  # T: whole global batch on one GPU
    bottleneck_s: float  # P
    num_micro_batches: int  # M per pipeline replica
    block_s: float
    latency_s: float  # Lat
    delta_s: float  # allreduce not hidden by the pipeline drain
    stage_times_s: tuple[float, ...]
    input_transfers_s: tuple[float, ...]  # into stage s (0 for stage 0)
    boundary_transfers_s: tuple[float, ...]  # per micro-batch, after stage s < S-1
    allreduce_s: tuple[float, ...]

    @property
    def step_time_s(self) -> float:
        return self.latency_s + self.delta_s


class HpgoModel:
    """The scaled cost tables of one (profile states, PBS, GBS) and the cluster."""

    def __init__(
        self, states: States, cluster: Cluster, profile_batch_size: int, global_batch_size: int
    ):
        scale = global_batch_size / profile_batch_size
        self.states = states
        self.cluster = cluster
        self.gbs = global_batch_size
        self.L = len(states)
        self.cum_compute = states.compute_s * scale
        self.cum_params = np.asarray(states.params, dtype=float)
        self.out = states.out_bytes * scale
        self.T = float(self.cum_compute[-1])

    def compute(self, b: int, e: int) -> float:
        return States.range_sum(self.cum_compute, b, e)

    def params(self, b: int, e: int) -> float:
        return States.range_sum(self.cum_params, b, e)

    def dp_speedup(self, num_devices: int | None = None) -> float:
        n = num_devices or self.cluster.num_devices
        ar = allreduce_time(self.cluster, range(n), self.params(0, self.L - 1))
        return self.T / (self.T / n + ar)

    def score(self, plan: HpgoPlan) -> HpgoScore:
        c, L = self.cluster, self.L
        S, rp, G = len(plan.ends), plan.rp, plan.devices
        M = self.gbs // rp // plan.mbs
        begins = plan.begins
        stage_times = tuple(
            self.compute(b, e) / len(G[s]) for s, (b, e) in enumerate(zip(begins, plan.ends))
        )
        factor = 1.0 if plan.two_stage_split else 2.0
        inputs = (0.0,) + tuple(
            transfer_time(c, G[s - 1], G[s], factor * self.out[plan.ends[s - 1]])
            for s in range(1, S)
        )
        P = max(max(stage_times), max(inputs))
        allreduces = tuple(
            allreduce_time(c, G[s], self.params(b, min(e + 1, L - 1) if s < S - 1 else L - 1))
            for s, (b, e) in enumerate(zip(begins, plan.ends))
        )
        if M <= 0:
            return HpgoScore(
                0.0,
                self.T,
                P,
                0,
                float("inf"),
                float("inf"),
                0.0,
                stage_times,
                inputs,
                (),
                allreduces,
            )
        block = P / M
        boundary = tuple(
            transfer_time(c, G[s], G[s + 1], self.out[plan.ends[s]] / (rp * M))
            for s in range(S - 1)
        )
        lat = block * (M - 1) + self.T / (rp * M) + sum(boundary)
        delta = max(0.0, max(ar - s * block for s, ar in enumerate(allreduces)))
        f = float
        return HpgoScore(
            f(self.T / (lat + delta)),
            f(self.T),
            f(P),
            M,
            f(block),
            f(lat),
            f(delta),
            tuple(map(f, stage_times)),
            tuple(map(f, inputs)),
            tuple(map(f, boundary)),
            tuple(map(f, allreduces)),
        )
