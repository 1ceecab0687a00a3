"""Plan search under the "dapple-tf" cost model.

For each micro-batch size b (a divisor of GBS; only the lcm of some replica counts is worth
trying, since b larger than that only lengthens the pipeline fill), replica counts are the
divisors of b that fit, so every plan found is executable. A DP over suffixes of the cut points,
`(first boundary, devices used from the end, stages in the suffix)`, keeps the `keep` plans with
the least bottleneck (whole-batch compute per replica, boundary traffic) per cell, rejecting any
stage over the device memory with the micro-batches 1f1b keeps in flight on it (they depend only
on the suffix length; gpipe keeps more). The best finalists are placed (packed from the last
device, or from device 0), simulated under each schedule (interleaved-1f1b: the layout's layers
re-cut into S v stages round-robin on its S groups, `schedule_layouts`), and the fastest that
fits wins (1f1b unless another schedule is OTHER_SCHEDULE_MARGIN faster). Small problems are
enumerated exhaustively instead.

Beyond 128 devices the DP allocates devices in whole hosts (or N/128 blocks) to stay fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from planner.dapple_cost import DappleEval, DappleModel
from planner.schedules import EXECUTABLE, in_flight_peaks
from planner.states import coarsen_cuts

INF = float("inf")
# The schedules the search tries (those the rewriter can run), and the chunk counts v it tries
# for interleaved-1f1b. 1f1b is the reference: another schedule is chosen only if it is at least
# OTHER_SCHEDULE_MARGIN faster (gpipe and zb-h1 hold more activations; interleaving makes v
# times the transfers).
SEARCHED_SCHEDULES = ("1f1b", "gpipe", "zb-h1", "interleaved-1f1b")
INTERLEAVED_CHUNKS = (2, 3, 4)
OTHER_SCHEDULE_MARGIN = 0.01
# Beyond the exhaustive search, the DP's layouts are scored under the reference schedules; the
# others (which only shorten a layout's bubble) are then tried on the REFINED_LAYOUTS best ones.
REFERENCE_SCHEDULES = ("1f1b", "gpipe")
REFINED_LAYOUTS = 8


def schedule_label(schedule: str, num_stages: int, num_groups: int) -> str:
    """How plans and their comparisons name a schedule: interleaved-1f1b with its v, as in
    'interleaved-1f1b v=2'."""
    if schedule == "interleaved-1f1b":
        return f"{schedule} v={num_stages // num_groups}"
    return schedule


@dataclasses.dataclass
class DappleCandidate:
    ends: tuple[int, ...]
    devices: tuple[tuple[int, ...], ...]
    micro_batch_size: int
    schedule: str
    eval: DappleEval
    # the one-stage-per-group layout an interleaved candidate was cut from (else ends, devices)
    base: tuple = ()


@dataclasses.dataclass
class DappleSearchStats:
    simulated: int = 0
    exhaustive: bool = False
    smallest_peak_memory: float = INF  # over every candidate looked at
    notes: list = dataclasses.field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _lcm_closure(values: list[int], limit: int) -> list[int]:
    """All lcms of non-empty subsets of `values` that divide `limit`."""
    found = set()
    for v in values:
        new = {v} | {v * f // math.gcd(v, f) for f in found}
        found |= {x for x in new if limit % x == 0}
    return sorted(found)


def useful_cuts(model: DappleModel) -> list[int]:
    """Cut points worth trying: drop a state that adds nothing (no compute, parameters or
    activations) when the previous kept one sends no more bytes across the cut."""
    st = model.states
    comp = np.diff(np.concatenate([[0.0], model.cum_fwd + model.cum_bwd]))
    par = np.diff(np.concatenate([[0.0], model.cum_params]))
    act = np.diff(np.concatenate([[0.0], model.cum_act]))
    keep = []
    for j in range(len(st) - 1):
        if (
            keep
            and comp[j] == 0
            and par[j] == 0
            and act[j] == 0
            and model.out[j] >= model.out[keep[-1]]
        ):
            continue
        keep.append(j)
    keep.append(len(st) - 1)
    return keep


class DappleSearch:
    def __init__(
        self,
        model: DappleModel,
        micro_batch_size: int | None = None,
        schedule: str | None = None,
        keep: int = 3,
        finalists: int = 8,
        exhaustive_limit: int = 4000,
        max_cuts: int = 96,
        every_micro_batch_size: bool = False,
        use_all_devices: bool = False,
    ):
        self.m = model
        # Under Horovod every rank must hold a slot: then only plans using all devices count.
        self.use_all_devices = use_all_devices
        # With a fixed cost per micro-batch, fewer and larger micro-batches than the lcm of the
        # replica counts can be faster: then every divisor of the global batch is tried, and
        # one device with each of them is a candidate too.
        self.every_micro_batch_size = every_micro_batch_size
        self.c = model.cluster
        self.N = self.c.num_devices
        self.fixed_b = micro_batch_size
        self.schedules = (
            [schedule] if schedule else [s for s in SEARCHED_SCHEDULES if s in EXECUTABLE]
        )
        self.keep = keep
        self.finalists = finalists
        self.exhaustive_limit = exhaustive_limit
        self.limit = self.c.device_memory_bytes
        self.stats = DappleSearchStats()
        self._scores: dict = {}  # (layout, b) -> its best evaluated step time
        self._to_refine: set = set()  # layouts evaluated under the reference schedules only
        self.best: DappleCandidate | None = None
        self.unit = 1 if self.N <= 128 else self._block_size()
        self.cuts = useful_cuts(model)
        if len(self.cuts) > max_cuts:
            self.cuts = coarsen_cuts(self.cuts, model.cum_fwd + model.cum_bwd, model.out, max_cuts)
            self.stats.notes.append(
                f"searched {len(self.cuts)} of {model.L} cut points (coarsened)"
            )
        self.objective = "time"
        self.j_cap = 4

    def _block_size(self) -> int:
        sizes = {b - a for a, b in zip((0,) + self.c.seps[:-1], self.c.seps)}
        if len(sizes) == 1 and self.N // next(iter(sizes)) <= 256:
            return next(iter(sizes))
        return max(1, self.N // 128)

    def micro_batch_sizes(self) -> list[int]:
        gbs = self.m.gbs
        if self.fixed_b is not None:
            return [self.fixed_b]
        if self.every_micro_batch_size:
            return _divisors(gbs)
        replicas = [d for d in _divisors(gbs) if d <= self.N]
        return _lcm_closure(replicas, gbs)

    # ---- scoring --------------------------------------------------------------------------------
    def _offer(self, ends, devices, b, schedules=None) -> None:
        """Evaluate the layout (ends, devices) with micro-batch size b under `schedules` (default
        all searched ones; beyond the exhaustive search only the reference ones, the layout's
        best time remembered for `_refine`), keeping the best candidate."""
        if self.use_all_devices and sum(len(d) for d in devices) != self.N:
            return
        base = (tuple(ends), tuple(tuple(d) for d in devices))
        if schedules is None:
            schedules = self.schedules
            reference = [s for s in schedules if s in REFERENCE_SCHEDULES]
            if reference and not self.stats.exhaustive:
                schedules = reference
                self._to_refine.add((base, b))
        for schedule in schedules:
            for layout_ends, layout in self.schedule_layouts(ends, devices, b, schedule):
                skip = self.best.eval.step_time_s * 1.02 if self.best is not None else INF
                ev = self.m.evaluate(layout_ends, layout, b, schedule, self.limit, skip_above=skip)
                self.stats.simulated += ev.simulated
                self.stats.smallest_peak_memory = min(
                    self.stats.smallest_peak_memory, max(ev.peak_memory_bytes)
                )
                if ev.fits:
                    key = (base, b)
                    self._scores[key] = min(self._scores.get(key, INF), ev.step_time_s)
                if not ev.fits or not ev.simulated:
                    continue
                cand = DappleCandidate(layout_ends, layout, b, schedule, ev, base)
                if self.best is None or self._better(cand, self.best):
                    self.best = cand

    def _refine(self) -> None:
        """The searched schedules other than the reference ones, on the REFINED_LAYOUTS layouts
        that the reference ones scored best (they only shorten a layout's bubble)."""
        others = [s for s in self.schedules if s not in REFERENCE_SCHEDULES]
        ranked = sorted(self._to_refine, key=lambda key: self._scores.get(key, INF))
        for (ends, devices), b in ranked[:REFINED_LAYOUTS]:
            if self._scores.get(((ends, devices), b), INF) < INF:
                self._offer(ends, devices, b, others)

    def schedule_layouts(self, ends, devices, b, schedule):
        """The layouts `schedule` runs for the one-stage-per-group layout (ends, devices): that
        layout itself; for interleaved-1f1b, each v in INTERLEAVED_CHUNKS that fits: the layers
        cut into S v compute-balanced stages, stage c on the devices of stage c mod S (S groups
        of equal replica counts, M a multiple of S)."""
        ends = tuple(ends)
        devices = tuple(tuple(d) for d in devices)
        if schedule != "interleaved-1f1b":
            return [(ends, devices)]
        S, M = len(ends), self.m.gbs // b
        if S < 2 or M % S or len({len(d) for d in devices}) != 1:
            return []
        cum = (self.m.cum_fwd + self.m.cum_bwd)[self.cuts]
        layouts = []
        for v in INTERLEAVED_CHUNKS:
            K = S * v
            if K > len(self.cuts):
                break
            picks = np.searchsorted(cum, cum[-1] * np.arange(1, K) / K)
            inner = sorted({self.cuts[min(int(k), len(self.cuts) - 2)] for k in picks})
            if len(inner) != K - 1:
                continue  # too few places to cut evenly
            layouts.append(
                (tuple(inner) + (self.cuts[-1],), tuple(devices[c % S] for c in range(K)))
            )
        return layouts

    @staticmethod
    def _better(a: DappleCandidate, b: DappleCandidate) -> bool:
        """Faster wins; a schedule other than 1f1b must be OTHER_SCHEDULE_MARGIN faster."""
        ta, tb = a.eval.step_time_s, b.eval.step_time_s
        if a.schedule != b.schedule:
            ta *= 1.0 if a.schedule == "1f1b" else 1.0 + OTHER_SCHEDULE_MARGIN
            tb *= 1.0 if b.schedule == "1f1b" else 1.0 + OTHER_SCHEDULE_MARGIN
        return ta < tb * (1 - 1e-12)

    def schedule_comparison(self, best: DappleCandidate) -> dict[str, float | None]:
        """The predicted step (s) of every searched schedule on the layout `best` came from
        (None where it does not fit or cannot run it), keyed '1f1b', ..., 'interleaved-1f1b v=2':
        what the plan file shows as the reason for its schedule."""
        ends, devices = best.base
        b = best.micro_batch_size
        times: dict[str, float | None] = {}
        for schedule in self.schedules:
            for layout_ends, layout in self.schedule_layouts(ends, devices, b, schedule):
                ev = self.m.evaluate(layout_ends, layout, b, schedule, self.limit)
                label = schedule_label(schedule, len(layout_ends), len(ends))
                times[label] = float(ev.step_time_s) if ev.fits else None
        return times

    def run(self) -> DappleCandidate | None:
        if self.every_micro_batch_size:
            for b in self.micro_batch_sizes():
                self._offer((self.cuts[-1],), [(0,)], b)
        if self._space_size() <= self.exhaustive_limit:
            self.stats.exhaustive = True
            self._exhaustive()
        else:
            sizes = self.micro_batch_sizes()
            for b in sizes:  # quick plans first: a bound for the DP's pruning
                self._seed(b)
            for b in sorted(sizes, key=lambda b: -len(_divisors(b))):
                self._dp(b)
            if self.best is None:  # memory-tight: track every suffix length exactly
                self.j_cap = 32 if self.N <= 128 else 16
                for b in sizes:
                    self._dp(b)
            self._refine()
        return self.best

    def smallest_memory(self) -> float:
        """The least per-device memory any plan in the space needs (for the 'nothing fits' error)."""
        if not self.stats.exhaustive:
            self.objective = "memory"
            try:
                for b in self.micro_batch_sizes():
                    self._dp(b)
            finally:
                self.objective = "time"
        return self.stats.smallest_peak_memory

    # ---- small problems -------------------------------------------------------------------------
    def _space_size(self) -> int:
        n_cuts = len(self.cuts)
        total = 0
        for b in self.micro_batch_sizes():
            opts = [r for r in _divisors(b) if r <= self.N]
            for S in range(1, min(n_cuts, self.N) + 1):
                total += math.comb(n_cuts - 1, S - 1) * len(opts) ** S * len(self.schedules)
                if total > self.exhaustive_limit:
                    return total
        return total

    def _exhaustive(self) -> None:
        cuts = self.cuts
        for b in self.micro_batch_sizes():
            opts = [r for r in _divisors(b) if r <= self.N]
            for S in range(1, min(len(cuts), self.N) + 1):
                for inner in itertools.combinations(cuts[:-1], S - 1):
                    ends = tuple(inner) + (cuts[-1],)
                    for reps in itertools.product(opts, repeat=S):
                        if sum(reps) > self.N:
                            continue
                        for layout in self._layouts(reps):
                            self._offer(ends, layout, b)

    def _seed(self, b: int) -> None:
        """Data parallelism and evenly replicated pipelines with compute-balanced cuts."""
        cuts = self.cuts
        cum = (self.m.cum_fwd + self.m.cum_bwd)[cuts]
        for S in range(1, min(len(cuts), self.N) + 1):
            r = self.N // S
            while r > 1 and b % r:
                r -= 1
            if S > 1 and self.N % S:
                continue
            targets = cum[-1] * np.arange(1, S) / S
            inner = sorted(set(int(np.searchsorted(cum, t)) for t in targets))
            ends = tuple(cuts[min(k, len(cuts) - 2)] for k in inner)
            ends = tuple(sorted(set(ends))) + (cuts[-1],)
            for layout in self._layouts([r] * len(ends)):
                self._offer(ends, layout, b)

    def _layouts(self, reps) -> list[list[tuple[int, ...]]]:
        """Packed from device 0, and packed so the last stage ends on the last device."""
        total = sum(reps)
        result = []
        for start in sorted({0, self.N - total}):
            layout, d = [], start
            for r in reps:
                layout.append(tuple(range(d, d + r)))
                d += r
            result.append(layout)
        return result

    # ---- the DP ---------------------------------------------------------------------------------
    def _dp(self, b: int) -> None:
        m, c, N, unit, K = self.m, self.c, self.N, self.unit, self.keep
        gbs, pbs = m.gbs, m.pbs
        M = gbs // b
        reps = [r for r in _divisors(b) if r <= N and (unit == 1 or r % unit == 0)]
        if not reps:
            return
        bounds = [-1] + self.cuts  # stage from boundary i to k covers bounds[i]+1..bounds[k]
        nb = len(bounds)
        D = N // unit
        # suffix stage counts are tracked up to J; "J" then means "J or more" (memory is checked
        # with J in flight there, a lower bound; finalists are re-checked exactly)
        J = min(nb - 1, D, self.j_cap)
        scale = gbs / pbs
        cum_c = np.concatenate([[0.0], m.cum_fwd + m.cum_bwd])[np.array(bounds) + 1] * scale
        cum_p = np.concatenate([[0.0], m.cum_params])[np.array(bounds) + 1]
        cum_a = np.concatenate([[0.0], m.cum_act])[np.array(bounds) + 1]
        out_at = np.array([m.out[x] if 0 <= x < m.L - 1 else 0.0 for x in bounds])
        host_of = np.searchsorted(np.asarray(c.seps), np.arange(N + 1), side="right")
        # Any plan's step is at least P (M-1)/M; nothing with a larger bottleneck can beat the best.
        ub = INF
        if self.objective == "time" and self.best is not None and M > 1:
            ub = self.best.eval.step_time_s * M / (M - 1) * (1 + 1e-9)

        # cells, laid out (devices from the end, suffix stages, first boundary, rank)
        best = np.full((D + 1, J + 1, nb, K), INF)
        first_r = np.zeros((D + 1, J + 1, nb, K), dtype=int)
        back = np.full((D + 1, J + 1, nb, K, 4), -1, dtype=int)  # (k, r, rank, suffix j)
        best[0, 0, nb - 1, 0] = 0.0
        j_prev = np.arange(J + 1)
        jn = np.minimum(j_prev + 1, J)[None, :, None, None]  # new suffix length
        # in flight on a stage under 1f1b, by its suffix length 1..J (stage J-j of J stages)
        in_flight = np.array(in_flight_peaks("1f1b", J, M)[::-1])
        for i in range(nb - 2, -1, -1):
            width = len(reps) * K
            candP = np.full((D + 1, J + 1, 2 * width), INF)
            cand_k = np.zeros_like(candP, dtype=int)
            cand_r = np.zeros_like(candP, dtype=int)
            cand_rank = np.zeros_like(candP, dtype=int)
            cand_j = np.zeros_like(candP, dtype=int)
            for ri, r in enumerate(reps):
                ru = r // unit
                if ru > D:
                    continue
                k_hi = nb - 1
                if ub < INF:
                    k_hi = min(
                        k_hi, int(np.searchsorted(cum_c, cum_c[i] + ub * r, side="right")) - 1
                    )
                if k_hi <= i:
                    continue
                ks = np.arange(i + 1, k_hi + 1)
                comp_total = cum_c[ks] - cum_c[i]
                boundary = np.maximum(out_at[i] if i > 0 else 0.0, out_at[ks])
                Dp = D - ru + 1  # dd' = 0..D-ru
                prevP = best[:Dp, :, i + 1 : k_hi + 1, :]  # (Dp, J+1, Kk, K) over j'
                rY = np.maximum(first_r[:Dp, :, i + 1 : k_hi + 1, :], 1)
                dd_prev = np.arange(Dp)[:, None, None, None]
                lo = N - (dd_prev + ru) * unit  # first device of this stage
                hi = N - dd_prev * unit + rY - 1  # last device of the next stage
                bw = np.where(
                    host_of[lo] == host_of[np.minimum(hi, N - 1)],
                    c.intra_host_bandwidth,
                    c.inter_host_bandwidth,
                )
                # each direction of a boundary link carries M transfers per step (full duplex)
                traffic = scale * out_at[ks][None, None, :, None] / np.minimum(r, rY) / bw
                rows = b / r / pbs
                mem = (
                    ((cum_p[ks] - cum_p[i]) * (2.0 + m.optimizer_slots))[None, None, :, None]
                    + in_flight[jn - 1] * ((cum_a[ks] - cum_a[i]) * rows)[None, None, :, None]
                    + (2.0 * boundary * rows)[None, None, :, None]
                )
                if self.objective == "memory":
                    P = np.maximum(prevP, mem)
                else:
                    P = np.maximum(
                        np.maximum(prevP, (comp_total / r)[None, None, :, None]), traffic
                    )
                    P[(mem > self.limit) | (P > ub)] = INF
                # top-K over (k, rank) for every (dd', j')
                flat = P.reshape(Dp, J + 1, -1)
                kk = min(K, flat.shape[2])
                if flat.shape[2] > kk:
                    top = np.argpartition(flat, kk - 1, axis=2)[:, :, :kk]
                else:
                    top = np.broadcast_to(np.arange(flat.shape[2]), flat.shape).copy()
                vals = np.take_along_axis(flat, top, axis=2)
                k_idx, rank = np.divmod(top, K)
                for lo_j, hi_j, offset in ((0, J, 0), (J, J + 1, width)):
                    # j' < J goes to j' + 1; the collapsed j' = J stays at J
                    sl = slice(offset + ri * K, offset + ri * K + kk)
                    tgt = slice(lo_j + 1, hi_j + 1) if hi_j <= J else slice(J, J + 1)
                    candP[ru:, tgt, sl] = vals[:, lo_j:hi_j]
                    cand_k[ru:, tgt, sl] = ks[k_idx[:, lo_j:hi_j]]
                    cand_r[ru:, tgt, sl] = r
                    cand_rank[ru:, tgt, sl] = rank[:, lo_j:hi_j]
                    cand_j[ru:, tgt, sl] = j_prev[lo_j:hi_j][None, :, None]
            order = np.argsort(candP, axis=2, kind="stable")[:, :, :K]
            best[:, :, i, :] = np.take_along_axis(candP, order, axis=2)
            chosen_r = np.take_along_axis(cand_r, order, axis=2)
            first_r[:, :, i, :] = chosen_r
            back[:, :, i, :, 0] = np.take_along_axis(cand_k, order, axis=2)
            back[:, :, i, :, 1] = chosen_r
            back[:, :, i, :, 2] = np.take_along_axis(cand_rank, order, axis=2)
            back[:, :, i, :, 3] = np.take_along_axis(cand_j, order, axis=2)
        if self.objective == "memory":
            self.stats.smallest_peak_memory = min(
                self.stats.smallest_peak_memory, float(best[1:, 1:, 0, :].min())
            )
            return
        # finalists: least (P/M)(M - 1 + S), an estimate of the simulated step
        cells = [
            (best[dd, j, 0, r] / M * (M - 1 + j + (j == J)), dd, j, r)
            for dd in range(1, D + 1)
            for j in range(1, J + 1)
            for r in range(K)
            if best[dd, j, 0, r] < INF
        ]
        cells.sort()
        for _, dd, j, r in cells[: self.finalists]:
            ends, reps_chosen = self._reconstruct(back, bounds, dd, j, r)
            for layout in self._layouts(reps_chosen):
                self._offer(ends, layout, b)

    def _reconstruct(self, back, bounds, dd, j, rank):
        i, ends, reps = 0, [], []
        last = len(bounds) - 1
        while i != last:
            k, r, nxt, j_next = (int(x) for x in back[dd, j, i, rank])
            ends.append(bounds[k])
            reps.append(r)
            i, dd, j, rank = k, dd - r // self.unit, j_next, nxt
        return tuple(ends), reps
