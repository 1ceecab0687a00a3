"""Cost model "runtime": what one step of this project's runtime costs on a given cluster.

Beside "dapple-tf" (`dapple_cost.py`, linear in rows, devices independent) and "hpgo" (the
published planner's), this model reads what `dapple_tf.profiler.profile_for_runtime` measures
and prices what the runtime really does (graph_rewrite/, dapple_tf/):

* Compute per micro-batch and replica of stage s, `q = b / r_s` rows: for each layer
  `fixed + per_row x q` (ms, the profile's fit; a layer without a fit is linear in rows as in
  "dapple-tf"). The fixed part is paid once per micro-batch, so small micro-batches cost more.
* Gradient accumulation: the runtime keeps a running sum per variable, so every micro-batch
  after the first adds the stage's parameter bytes once: `(M-1)/M x params / accumulate_bw`
  per backward.
* Boundary transfer per micro-batch and direction: `latency + bytes / bandwidth` (busiest link
  of a split/concat carries 1/min(r, r') of the bytes).
* Once per step, after the stage's last backward (the runtime's order): the sum over replicas
  (in one process an add of `r-1` gradient copies, across ranks a ring allreduce
  `2(r-1)/r x params / bw`) and the optimizer update (`apply_ms` of the stage's layers).
* Shared processors: devices of one processor (`Cluster.devices_per_processor`) share its cores,
  so the step is at least the sum of the busy time of every device on that processor (compute,
  transfers, accumulation, summing, update). On one CPU running two stages in parallel is not
  free: the model never prefers more logical CPU devices for speed.
* The step is the larger of the schedule simulation (`simulate`) and that bound.

Memory per device of stage s: parameters x (weights, twice under pipedream-2bw: its previous
version, + running gradient sum) + the measured
optimizer slot bytes (else `optimizer_slots` x parameters) + the bytes each layer keeps for its
backward (`saved_bytes`, else its output activations) x rows/PBS x micro-batches in flight
(`planner.schedules.in_flight_peaks`; 1f1b: min(S-s, M), gpipe: M) + 2 x the larger boundary
buffer of one micro-batch + the largest `workspace_bytes` of the stage's layers (temporaries of
its two ops with the most: a convolution's backward workspace can dwarf the saved
activations), all scaled by rows/PBS.
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import numpy as np

from planner.cluster import Cluster
from planner.dapple_cost import DappleEval, DappleModel, chunks_of, device_group_memory
from planner.profile import Profile
from planner.schedules import in_flight_peaks, weight_versions
from planner.simulate import simulate
from planner.states import States


def _per_state(profile: Profile, states: States, values: Sequence[float]) -> np.ndarray:
    """Cumulative sum over states of a per-layer value (each layer counted in the first state
    that covers it)."""
    out, seen = np.zeros(len(states)), 0
    for k, mask in enumerate(states.covered):
        new = mask & ~seen
        out[k] = sum(values[i] for i in range(len(profile.layers)) if new >> i & 1)
        seen |= mask
    return np.cumsum(out)


class RuntimeModel(DappleModel):
    """Same interface as DappleModel (the search uses either); `evaluate` prices this runtime."""

    def __init__(
        self,
        profile: Profile,
        cluster: Cluster,
        global_batch_size: int,
        optimizer_slots: float = 2.0,
        states: States | None = None,
    ):
        super().__init__(profile, cluster, global_batch_size, optimizer_slots, states)
        pbs, layers = profile.batch_size, profile.layers

        def fit(layer, which):
            if layer.has_fit:
                return (
                    (layer.forward_fixed_ms, layer.forward_per_row_ms)
                    if which == "f"
                    else (layer.backward_fixed_ms, layer.backward_per_row_ms)
                )
            total = layer.forward_ms if which == "f" else layer.backward_ms
            return 0.0, total / pbs

        st = self.states
        self.cum_fwd_fixed = _per_state(profile, st, [fit(l, "f")[0] / 1e3 for l in layers])
        self.cum_fwd_row = _per_state(profile, st, [fit(l, "f")[1] / 1e3 for l in layers])
        self.cum_bwd_fixed = _per_state(profile, st, [fit(l, "b")[0] / 1e3 for l in layers])
        self.cum_bwd_row = _per_state(profile, st, [fit(l, "b")[1] / 1e3 for l in layers])
        self.cum_apply = _per_state(profile, st, [(l.apply_ms or 0.0) / 1e3 for l in layers])
        self.cum_slots = _per_state(
            profile,
            st,
            [
                l.optimizer_slot_bytes
                if l.optimizer_slot_bytes is not None
                else optimizer_slots * l.parameter_bytes
                for l in layers
            ],
        )
        # What a micro-batch keeps for its backward; the search's memory check reads cum_act.
        self.cum_act = _per_state(
            profile,
            st,
            [l.saved_bytes if l.saved_bytes is not None else l.activation_bytes for l in layers],
        )
        # The largest workspace of each state's own layers
        self.workspace = np.zeros(len(st))
        seen = 0
        for k, mask in enumerate(st.covered):
            new = mask & ~seen
            self.workspace[k] = max(
                [layers[i].workspace_bytes or 0.0 for i in range(len(layers)) if new >> i & 1],
                default=0.0,
            )
            seen |= mask
        self.single_device_s = self.one_device_step_s()

    # ---- pieces ------------------------------------------------------------------------------
    def stage_compute_s(self, b: int, e: int, rows: float) -> tuple[float, float]:
        """(forward s, backward s) of states b..e on `rows` rows, one micro-batch."""
        fwd = self.rng(self.cum_fwd_fixed, b, e) + self.rng(self.cum_fwd_row, b, e) * rows
        bwd = self.rng(self.cum_bwd_fixed, b, e) + self.rng(self.cum_bwd_row, b, e) * rows
        return fwd, bwd

    def replica_sum_s(self, devices: Sequence[int], nbytes: float) -> float:
        """Summing a stage's gradients over its replicas once per step."""
        r = len(devices)
        if r <= 1:
            return 0.0
        c = self.cluster
        if len({c.processor_of(d) for d in devices}) == 1:
            return (r - 1) * nbytes / c.accumulate_bandwidth
        return self.allreduce_s(devices, nbytes)

    def one_device_step_s(self) -> float:
        """One device, the whole global batch as one micro-batch."""
        fwd, bwd = self.stage_compute_s(0, self.L - 1, float(self.gbs))
        return fwd + bwd + self.rng(self.cum_apply, 0, self.L - 1)

    def dp_speedup(self, num_devices: int) -> float:
        """Plain data parallelism, one micro-batch, on the largest device count <= num_devices
        dividing GBS."""
        n = max(d for d in range(1, num_devices + 1) if self.gbs % d == 0)
        return self.evaluate(
            [self.L - 1], [tuple(range(n))], self.gbs, "1f1b", device_memory=float("inf")
        ).speedup

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
        slots = self.rng(self.cum_slots, b_state, e_state)
        kept = self.rng(self.cum_act, b_state, e_state)
        boundary_in = self.out[b_state - 1] if b_state > 0 else 0.0
        boundary_out = self.out[e_state] if e_state < self.L - 1 else 0.0
        workspace = float(self.workspace[b_state : e_state + 1].max())
        return (
            (versions + 1.0) * params
            + slots
            + in_flight * kept * rows
            + 2.0 * max(boundary_in, boundary_out) * rows
            + workspace * rows
        )

    # ---- a whole candidate -------------------------------------------------------------------
    def evaluate(
        self,
        ends: Sequence[int],
        devices: Sequence[Sequence[int]],
        micro_batch_size: int,
        schedule: str,
        device_memory: float | None = None,
        skip_above: float | None = None,
    ) -> DappleEval:
        c = self.cluster
        S = len(ends)
        M = self.gbs // micro_batch_size
        begins = [0] + [e + 1 for e in ends[:-1]]
        chunks = chunks_of(devices)
        in_flight = in_flight_peaks(schedule, S, M, chunks)
        fwd, bwd, tail = [], [], []
        for s, (b, e) in enumerate(zip(begins, ends)):
            r = len(devices[s])
            f, bw = self.stage_compute_s(b, e, micro_batch_size / r)
            params = self.rng(self.cum_params, b, e)
            accumulate = (M - 1) / M * params / c.accumulate_bandwidth
            fwd.append(f)
            bwd.append(bw + accumulate)
            tail.append(self.replica_sum_s(devices[s], params) + self.rng(self.cum_apply, b, e))
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
            transfer.append(
                c.transfer_latency_s + busiest / self.link_bandwidth(devices[s], devices[s + 1])
            )
        limit = device_memory if device_memory is not None else c.device_memory_bytes
        fits = max(mem) <= limit
        shared = self.shared_processor_s(devices, fwd, bwd, transfer, tail, M)
        if not fits or (skip_above is not None and shared > skip_above):
            step = shared if fits else float("inf")
            return DappleEval(
                step,
                self.single_device_s / step if step else 0.0,
                tuple(fwd),
                tuple(bwd),
                tuple(transfer),
                tuple(tail),
                tuple(mem),
                fits,
                0.0,
                simulated=False,
            )
        sim = simulate(schedule, fwd, bwd, transfer, tail, M, chunks)
        step = max(sim.step_time_s, shared)
        busy = sum(M * (f + b) for f, b in zip(fwd, bwd)) / max(1, S // chunks)  # per group
        return DappleEval(
            step,
            self.single_device_s / step,
            tuple(fwd),
            tuple(bwd),
            tuple(transfer),
            tuple(tail),
            tuple(mem),
            fits,
            max(0.0, 1.0 - busy / step) if step else 0.0,
        )

    def shared_processor_s(self, devices, fwd, bwd, transfer, tail, M) -> float:
        """The busiest processor's total work in a step: what its devices do one after another
        because they share its cores (0 when every device has a processor of its own)."""
        c = self.cluster
        if c.devices_per_processor == 1:
            return 0.0
        work: dict[int, float] = {}
        for s, stage_devices in enumerate(devices):
            # activations forward and gradients back over each of the stage's boundaries
            moved = 2.0 * (
                (transfer[s - 1] if s > 0 else 0.0) + (transfer[s] if s < len(devices) - 1 else 0.0)
            )
            for d in stage_devices:
                p = c.processor_of(d)
                work[p] = work.get(p, 0.0) + M * (fwd[s] + bwd[s] + moved)
            # the replica sum and the update run once per stage, on one of its devices
            p = c.processor_of(stage_devices[0])
            work[p] = work.get(p, 0.0) + tail[s]
        devices_on = collections.Counter(c.processor_of(d) for st in devices for d in st)
        if max(devices_on.values()) <= 1:
            return 0.0
        return max(work.values())
