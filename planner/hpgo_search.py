"""Plan search under the "hpgo" cost model.

The published planner scores a few dozen candidates: for each slot count i (rp = N div i) the
plan a PipeDream-style DP finds with the least bottleneck, a "straight" variant (one slot per
stage), and every 2-stage split g:(N-g) with rp = 1. Every plan it can produce has contiguous
state ranges, per-stage slot counts and an rp; we search that space more widely and score every
finalist with the exact formula (`HpgoModel.score`):

1. one stage on k = 1..N devices (plain data parallelism), every rp dividing k;
2. every cut x every g:(N-g) (and, for each, every rp dividing g and N-g), all cuts at once in
   numpy, the rp = 1 ones scored as the exhaustive split (no factor 2);
3. for every rp (with M >= 1; skipped when a lower bound on its step cannot beat the best so
   far) and every number of slots u <= N div rp: a min-bottleneck DP over
   (last state, slots used) on packed device ranges (stage after stage, hosts filled in order),
   run with free slot counts, "straight" (one slot per stage), and once more counting each
   stage's gradient allreduce in its bottleneck term; every cell keeps its `keep` best
   predecessors so near-ties are decided by the full score, and every final cell is
   reconstructed and scored;
4. small problems (few states and devices) are enumerated exhaustively instead of 3 (exact).

Beyond small problems the DP is a heuristic like the published one (it minimises the
bottleneck, not the full score), over a superset of its candidates' shapes; on the published
profiles it never does worse than the published planner (tests/test_planner_vs_hpgo.py).

Device sets: the DP works on packed ranges (the "fill hosts in order" policy); every finalist is
also scored with the scatter policy (each stage takes one device per host in turn). The
published planner's third policy (append to a partly used host first) coincides with packing
when stages are placed in order, which is how we place them.

On clusters of more than 64 devices, rp is limited to the published planner's own values
(N div i) with at most 16 slots per pipeline, and one-stage plans use rp = k (the best rp for
one stage: its latency is then exactly T/k).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from planner.cluster import Cluster
from planner.hpgo import HpgoModel, HpgoPlan, HpgoScore
from planner.states import coarsen_cuts


@dataclasses.dataclass
class SearchStats:
    candidates_scored: int = 0
    dp_runs: int = 0
    exhaustive: bool = False
    notes: list = dataclasses.field(default_factory=list)


def _scattered(cluster: Cluster, sizes: list[int]) -> tuple[tuple[int, ...], ...]:
    """The published planner's scatter policy: each stage takes one device per host in turn."""
    free = [list(range(cluster.host_start(h), cluster.seps[h])) for h in range(cluster.num_hosts)]
    host, result = 0, []
    for size in sizes:
        stage = []
        while len(stage) < size:
            if any(free):
                while not free[host]:
                    host = (host + 1) % len(free)
                stage.append(free[host].pop(0))
                host = (host + 1) % len(free)
        result.append(tuple(sorted(stage)))
    return tuple(result)


def _range(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


def _transfer_coef_grid(
    cluster: Cluster, p: np.ndarray, d: np.ndarray, q: np.ndarray
) -> np.ndarray:
    """Seconds per byte of Transfer([p,d) -> [d,q)) for packed ranges (broadcast arrays)."""
    seps = np.asarray(cluster.seps)
    host_d = np.searchsorted(seps, d, side="right")
    host_last = np.searchsorted(seps, q - 1, side="right")
    starts = np.concatenate([[0], seps])[host_d]
    outside = np.maximum(0, np.minimum(d, starts) - p)
    within = host_d == host_last
    size = np.maximum(d - p, 1)
    coef = np.where(
        outside > 0,
        outside / size / cluster.inter_host_bandwidth,
        1.0 / cluster.intra_host_bandwidth,
    )
    return np.where(within, coef, 1.0 / cluster.inter_host_allreduce_bandwidth)


def _nested(states, b_minus_1: int, e: int) -> bool:
    a, c = states.covered[b_minus_1], states.covered[e]
    return a != c and a & c == a


def _chain_subset(states) -> list[int]:
    """States forming one nested chain (each covers the previous), in state order."""
    keep = [0]
    for j in range(1, len(states)):
        if _nested(states, keep[-1], j):
            keep.append(j)
    if keep[-1] != len(states) - 1:
        keep.append(len(states) - 1)
    return keep


def _useful_states(model: HpgoModel) -> list[int]:
    """Drop cut points that another cut dominates: a chain state adding no compute and no
    parameters whose outgoing bytes are no smaller than the previous kept state's (cutting one
    state earlier is then never worse, the next-state parameter quirk included)."""
    states = model.states
    if states.kind != "topological":
        return list(range(len(states)))
    comp = np.diff(np.concatenate([[0.0], model.cum_compute]))
    par = np.diff(np.concatenate([[0.0], model.cum_params]))
    keep = [0]
    for j in range(1, len(states) - 1):
        if comp[j] == 0 and par[j] == 0 and model.out[j] >= model.out[keep[-1]]:
            continue
        keep.append(j)
    if len(states) > 1:
        keep.append(len(states) - 1)
    return keep


class HpgoSearch:
    def __init__(
        self,
        model: HpgoModel,
        mbs: int = 1,
        max_dp_slots: int = 64,
        keep: int = 2,
        max_dp_states: int = 300,
        exhaustive_limit: int = 20000,
        max_dp_cuts: int = 96,
    ):
        if model.cluster.num_devices > 64:
            max_dp_slots = min(max_dp_slots, 16)
        self.m = model
        self.c = model.cluster
        self.N = self.c.num_devices
        self.mbs = mbs
        self.max_dp_slots = max_dp_slots
        self.keep = keep
        self.max_dp_states = max_dp_states
        self.max_dp_cuts = max_dp_cuts
        self.exhaustive_limit = exhaustive_limit
        self.stats = SearchStats()
        self.best: tuple[HpgoScore, HpgoPlan] | None = None
        self._seen: set = set()

    # ---- bookkeeping --------------------------------------------------------------------------
    def _offer(self, plan: HpgoPlan) -> None:
        self._score(plan)
        if len(plan.ends) > 1 and self.c.num_hosts > 1 and not plan.two_stage_split:
            spread = _scattered(self.c, [len(d) for d in plan.devices])
            if spread != plan.devices:
                self._score(dataclasses.replace(plan, devices=spread))

    def _score(self, plan: HpgoPlan) -> None:
        key = (plan.ends, plan.devices, plan.rp, plan.two_stage_split)
        if key in self._seen:
            return
        self._seen.add(key)
        score = self.m.score(plan)
        self.stats.candidates_scored += 1
        if self.best is None or score.speedup > self.best[0].speedup + 1e-12:
            self.best = (score, plan)

    def run(self) -> tuple[HpgoPlan, HpgoScore]:
        L = self.m.L
        self._single_stage()
        if L >= 2 and self.N >= 2:
            self._two_stage()
            if self._space_size() <= self.exhaustive_limit:
                self.stats.exhaustive = True
                self._exhaustive()
            else:
                for rp in self._dp_replications():
                    if self.m.gbs // rp // self.mbs >= 1 and not self._cannot_win(rp):
                        self._dp(rp, straight=False)
                        self._dp(rp, straight=True)
                        self._dp(rp, straight=False, allreduce_weight=1.0)
        score, plan = self.best
        return plan, score

    def _cannot_win(self, rp: int) -> bool:
        """True when no multi-stage plan with this rp can beat the best plan so far: its step is at
        least (M-1)/M * P + T/(rp M), and P is at least the whole compute spread over every device
        and at least the cheapest possible boundary transfer (2 x the smallest cut, fastest link)."""
        m, c = self.m, self.c
        M = m.gbs // rp // self.mbs
        slots = min(self.N // rp, self.max_dp_slots)
        largest_host = max(b - a for a, b in zip((0,) + c.seps[:-1], c.seps))
        if rp > largest_host:
            coef = 1.0 / c.inter_host_allreduce_bandwidth  # every stage spans hosts
        else:
            coef = min(
                1.0 / c.intra_host_bandwidth,
                1.0 / c.inter_host_allreduce_bandwidth,
                1.0 / (self.N * c.inter_host_bandwidth),
            )
        P = max(m.T / (slots * rp), 2.0 * float(np.min(m.out[:-1])) * coef)
        bound = (M - 1) / M * P + m.T / (rp * M)
        best_step = self.best[0].step_time_s
        return bound >= best_step

    def _dp_replications(self) -> list[int]:
        """Every rp on small clusters; on large ones the published planner's rp = N div i for
        i = 2..N slots, as far as i <= max_dp_slots."""
        N = self.N
        if N <= 64:
            return list(range(1, N // 2 + 1))
        values = {N // i for i in range(2, min(N, self.max_dp_slots) + 1)}
        if self.max_dp_slots < N:
            self.stats.notes.append(
                f"multi-stage DP for pipelines of at most {self.max_dp_slots} "
                f"slots (rp >= {N // self.max_dp_slots})"
            )
        return sorted(values)

    # ---- 1. data parallel ------------------------------------------------------------------------
    def _single_stage(self) -> None:
        """One stage on k devices. rp = k is best (Lat = T/k exactly); small clusters also try
        every other rp, as the published planner's degenerate candidates do."""
        last = self.m.L - 1
        for k in range(1, self.N + 1):
            rps = range(1, k + 1) if self.N <= 64 else (k,)
            for rp in rps:
                if k % rp == 0 and self.m.gbs // rp // self.mbs >= 1:
                    self._offer(HpgoPlan((last,), (_range(0, k),), rp, self.mbs))

    # ---- 2. every 2-stage split ------------------------------------------------------------------
    def _two_stage(self) -> None:
        m, c, N, L = self.m, self.c, self.N, self.m.L
        cuts = np.arange(L - 1)
        cum = m.cum_compute
        par = m.cum_params
        T = m.T
        from planner.hpgo import allreduce_time, transfer_time

        for g in range(1, N):
            G0, G1 = _range(0, g), _range(g, N)
            tr = transfer_time(c, G0, G1, 1.0)
            ar0 = allreduce_time(c, G0, 1.0)
            ar1 = allreduce_time(c, G1, 1.0)
            for rp in range(1, math.gcd(g, N - g) + 1):
                if g % rp or (N - g) % rp:
                    continue
                M = m.gbs // rp // self.mbs
                if M < 1:
                    continue
                split = rp == 1
                factor = 1.0 if split else 2.0
                t0 = cum[cuts] / g
                t1 = (T - cum[cuts]) / (N - g)
                P = np.maximum(np.maximum(t0, t1), tr * factor * m.out[cuts])
                block = P / M
                lat = block * (M - 1) + T / (rp * M) + tr * m.out[cuts] / (rp * M)
                p0 = par[np.minimum(cuts + 1, L - 1)]
                p1 = par[L - 1] - par[cuts]
                delta = np.maximum(0.0, np.maximum(ar0 * p0, ar1 * p1 - block))
                speed = T / (lat + delta)
                for k in np.argsort(-speed)[:2]:
                    self._offer(HpgoPlan((int(k), L - 1), (G0, G1), rp, self.mbs, split))

    # ---- 3. min-bottleneck DP on packed ranges ---------------------------------------------------
    def _dp(self, rp: int, straight: bool, allreduce_weight: float = 0.0) -> None:
        """allreduce_weight > 0 also counts each stage's gradient allreduce (times the weight)
        as part of its bottleneck term, steering towards plans whose allreduce does not
        overhang the pipeline (the score's delta term)."""
        m, L = self.m, self.m.L
        slots = min(self.N // rp, self.max_dp_slots)
        if slots < 2:
            return
        idx = _useful_states(m) if L <= self.max_dp_states else _chain_subset(m.states)
        if len(idx) > self.max_dp_cuts:
            idx = coarsen_cuts(idx, m.cum_compute, m.out, self.max_dp_cuts)
            note = f"multi-stage DP over {len(idx)} of {L} cut points (coarsened)"
            if note not in self.stats.notes:
                self.stats.notes.append(note)
        note = f"multi-stage DP over {len(idx)} nested states of {L}"
        if len(idx) < L and m.states.kind == "antichain" and note not in self.stats.notes:
            self.stats.notes.append(note)
        n_idx = len(idx)
        self.stats.dp_runs += 1
        K = self.keep
        cum = m.cum_compute[idx]
        out = m.out[idx]
        par = m.cum_params[idx]
        # parameter bytes a stage ending at e allreduces: through the next state (the quirk)
        par_next = m.cum_params[np.minimum(np.asarray(idx) + 1, L - 1)]
        valid = np.ones((n_idx, n_idx), dtype=bool)
        if m.states.kind == "antichain" and len(idx) == L:
            for i in range(n_idx):
                for j in range(i + 1, n_idx):
                    valid[i, j] = _nested(m.states, idx[i], idx[j])
        # cells[e][u] = list of (P, b, n, parent_rank) sorted by P, at most K
        INF = float("inf")
        best = np.full((n_idx, slots + 1, K), INF)
        last_n = np.zeros((n_idx, slots + 1, K), dtype=int)
        back = np.full((n_idx, slots + 1, K, 3), -1, dtype=int)  # (b, n, parent rank)
        us = np.arange(1, slots + 1)
        # a stage of n slots ending at state e after `up` slots: grids over (u, b, n), u leading
        n_max = 1 if straight else slots - 1
        n_grid = np.arange(1, n_max + 1)[None, None, :]  # (1,1,N)
        up_grid = us[:, None, None] - n_grid  # (U,1,N)
        allowed = up_grid >= 1
        up_safe = np.where(allowed, up_grid, 0)
        # seconds/byte into a stage of n slots after `up` slots whose last stage had prev_n slots
        g_up, g_n, g_prev = np.meshgrid(
            np.arange(slots + 1), np.arange(slots + 1), np.arange(slots + 1), indexing="ij"
        )
        tc = _transfer_coef_grid(
            self.c, (g_up - g_prev) * rp, g_up * rp, np.maximum(g_up + g_n, g_up + 1) * rp
        )
        rows = np.arange(slots)[:, None]
        from planner.hpgo import allreduce_time

        # seconds/byte of an allreduce over devices [up*rp, (up+n)*rp)
        ar = np.zeros((slots + 1, slots + 1))
        if allreduce_weight:
            for a in range(slots + 1):
                for n in range(1, slots + 1 - a):
                    ar[a, n] = allreduce_time(self.c, range(a * rp, (a + n) * rp), 1.0)
        first_P = cum / rp  # one stage on u slots: cum[e] / (u*rp)
        for e in range(n_idx):
            own = par[-1] if e == n_idx - 1 else par_next[e]
            first = first_P[e] / us
            if allreduce_weight:
                first = np.maximum(first, allreduce_weight * ar[0, us] * own)
            cand_P = [first if not straight else np.where(us == 1, first, INF)]
            cand_b = [np.zeros(slots, dtype=int)]
            cand_n = [us.copy()]
            cand_r = [np.full(slots, -1)]
            if e >= 1:
                b = np.arange(1, e + 1)[None, :, None]  # (1,B,1)
                prevP = best[b - 1, up_safe, :]  # (U,B,N,K)
                prev_n = last_n[b - 1, up_safe, :]
                coef = tc[up_safe[..., None], n_grid[..., None], prev_n]
                inp = coef * (2.0 * out[b - 1])[..., None]
                comp = ((cum[e] - cum[b - 1]) / (n_grid * rp))[..., None]
                P = np.maximum(np.maximum(prevP, comp), inp)
                if allreduce_weight:
                    own_b = (par[-1] if e == n_idx - 1 else par_next[e]) - par[b - 1]
                    P = np.maximum(
                        P, allreduce_weight * ar[up_safe, n_grid][..., None] * own_b[..., None]
                    )
                P = np.where((allowed & valid[b - 1, e])[..., None], P, INF)
                B = P.shape[1]
                flat = P.reshape(slots, -1)  # (U, B*N*K)
                k = min(K, flat.shape[1])
                top = (
                    np.argpartition(flat, k - 1, axis=1)[:, :k]
                    if flat.shape[1] > k
                    else np.tile(np.arange(flat.shape[1]), (slots, 1))
                )
                for j in range(top.shape[1]):
                    f = top[:, j]
                    bi, ni, r = np.unravel_index(f, (B, n_max, K))
                    cand_P.append(flat[rows[:, 0], f])
                    cand_b.append(bi + 1)
                    cand_n.append(ni + 1)
                    cand_r.append(r)
            allP = np.stack(cand_P, axis=1)  # (U, C)
            order = np.argsort(allP, axis=1, kind="stable")[:, :K]
            kk = order.shape[1]
            chosenP = allP[rows, order]
            best[e, 1:, :kk] = chosenP
            last_n[e, 1:, :kk] = np.stack(cand_n, axis=1)[rows, order]
            back[e, 1:, :kk, 0] = np.where(chosenP < INF, np.stack(cand_b, axis=1)[rows, order], -1)
            back[e, 1:, :kk, 1] = np.stack(cand_n, axis=1)[rows, order]
            back[e, 1:, :kk, 2] = np.stack(cand_r, axis=1)[rows, order]
        for u in range(2, slots + 1):
            for r in range(K):
                if best[n_idx - 1, u, r] == INF:
                    continue
                plan = self._reconstruct(back, idx, n_idx - 1, u, r, rp)
                if plan is not None:
                    self._offer(plan)

    def _reconstruct(self, back, idx, e, u, r, rp) -> HpgoPlan | None:
        stages = []
        while True:
            b, n, parent = (int(x) for x in back[e, u, r])
            if b < 0:
                return None
            stages.append((idx[e], n))
            if b == 0:
                break
            e, u, r = b - 1, u - n, parent
        stages.reverse()
        ends, devices, start = [], [], 0
        for end, n in stages:
            ends.append(end)
            devices.append(_range(start, start + n * rp))
            start += n * rp
        return HpgoPlan(tuple(ends), tuple(devices), rp, self.mbs)

    # ---- 4. small problems: everything ---------------------------------------------------------
    def _space_size(self) -> int:
        L, N = self.m.L, self.N
        total = 0
        for S in range(2, min(L, N) + 1):
            total += math.comb(L - 1, S - 1) * math.comb(N, S) * N
        return total

    def _exhaustive(self) -> None:
        L, N = self.m.L, self.N
        for S in range(2, min(L, N) + 1):
            for cuts in itertools.combinations(range(L - 1), S - 1):
                ends = tuple(cuts) + (L - 1,)
                if self.m.states.kind == "antichain":
                    chain = (-1,) + ends
                    if not all(_nested(self.m.states, chain[i], chain[i + 1]) for i in range(1, S)):
                        continue
                for rp in range(1, N // S + 1):
                    if self.m.gbs // rp // self.mbs < 1:
                        continue
                    for counts in _compositions_upto(N // rp, S):
                        devices, start = [], 0
                        for n in counts:
                            devices.append(_range(start, start + n * rp))
                            start += n * rp
                        self._offer(HpgoPlan(ends, tuple(devices), rp, self.mbs))


def _compositions_upto(total: int, parts: int):
    """All tuples of `parts` positive ints with sum <= total."""
    if parts == 1:
        for n in range(1, total + 1):
            yield (n,)
        return
    for n in range(1, total - parts + 2):
        for rest in _compositions_upto(total - n, parts - 1):
            yield (n,) + rest
