"""Where a profile can be cut: its *states*, in pipeline order, with cumulative costs.

A stage is a contiguous run of states `b..e`; its cost is a difference of cumulative sums
(`cum[e] - cum[b-1]`). Two ways to get the states:

* `antichain_states` — the published planner's preparation (PipeDream's antichain DAG, visited in
  its topological order), so that the "hpgo" cost model sees exactly its cut points. For a chain,
  state i is the (i+1)-th non-input layer. Its state count can explode on branchy graphs (GNMT-32),
  so it gives up past `max_antichains` and the caller falls back to:
* `topological_states` — one state per layer in a topological order (file order where it is one):
  cutting after state j puts that order's prefix `0..j` before the cut; the bytes crossing are the
  activations of every prefix layer with a consumer after the cut.

Either way `Input*` source layers cost nothing and `__getitem__*` sinks are dropped (zero cost,
placed with their producer), as the published planner does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.profile import Profile, ProfileError


@dataclasses.dataclass(frozen=True)
class States:
    labels: tuple[str, ...]  # for people: description of each state's last layer
    covered: tuple[int, ...]  # bitmask of profile layers at or before each state
    forward_s: np.ndarray  # cumulative forward seconds at the profile batch
    backward_s: np.ndarray  # cumulative backward seconds
    params: np.ndarray  # cumulative parameter bytes
    activations: np.ndarray  # cumulative activation bytes (all layers covered) at the profile batch
    out_bytes: np.ndarray  # bytes crossing a cut right after each state, at the profile batch
    kind: str  # "antichain" or "topological"
    note: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def compute_s(self) -> np.ndarray:
        return self.forward_s + self.backward_s

    @staticmethod
    def range_sum(cum: np.ndarray, b: int, e: int) -> float:
        return float(cum[e] - (cum[b - 1] if b > 0 else 0.0))

    def stage_layers(self, profile: Profile, ends: list[int]) -> list[list[str]]:
        """Profile layer names of each stage, for stages ending at states `ends` (last = L-1).

        A layer belongs to the first stage whose end state covers it; layers no state covers
        (dropped `__getitem__` sinks) join the stage of their producer, inputs join stage 0.
        Within a stage layers keep profile order."""
        n = len(profile.layers)
        stage_of = [-1] * n
        for s, e in enumerate(ends):
            mask = self.covered[e]
            for i in range(n):
                if stage_of[i] < 0 and mask >> i & 1:
                    stage_of[i] = s
        preds = [[] for _ in range(n)]
        for a, b in profile.edges:
            preds[b].append(a)
        for i in _topological_order(profile):
            if stage_of[i] < 0:
                stage_of[i] = max((stage_of[p] for p in preds[i]), default=0)
                stage_of[i] = max(stage_of[i], 0)
        stages: list[list[str]] = [[] for _ in ends]
        for i in range(n):
            stages[stage_of[i]].append(profile.layers[i].name)
        return stages


def _is_input(profile: Profile, i: int, has_in: list[bool]) -> bool:
    return not has_in[i] and (profile.layers[i].description or profile.layers[i].name).startswith(
        "Input"
    )


def _topological_order(profile: Profile) -> list[int]:
    """Kahn's algorithm, always taking the earliest layer in profile order that is ready."""
    import heapq

    n = len(profile.layers)
    indeg = [0] * n
    outs = [[] for _ in range(n)]
    for a, b in profile.edges:
        outs[a].append(b)
        indeg[b] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in outs[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != n:
        stuck = [profile.layers[i].name for i in range(n) if indeg[i] > 0][:5]
        raise ProfileError(
            f"profile layer graph has a cycle (through layers {stuck}); expected a DAG"
        )
    return order


def _effective_costs(profile: Profile):
    """Per-layer (fwd_s, bwd_s, act, params, kept) after zeroing inputs and dropping getitem sinks."""
    n = len(profile.layers)
    has_in = [False] * n
    has_out = [False] * n
    for a, b in profile.edges:
        has_in[b] = True
        has_out[a] = True
    fwd = np.array([l.forward_ms for l in profile.layers], dtype=float) / 1000.0
    bwd = np.array([l.backward_ms for l in profile.layers], dtype=float) / 1000.0
    act = np.array([l.activation_bytes for l in profile.layers], dtype=float)
    par = np.array([l.parameter_bytes for l in profile.layers], dtype=float)
    inputs = [i for i in range(n) if _is_input(profile, i, has_in)]
    kept = [True] * n
    for i in inputs:
        fwd[i] = bwd[i] = act[i] = par[i] = 0.0
        kept[i] = False
    # Sinks are judged after the inputs are gone, as the published planner does.
    for i in range(n):
        desc = profile.layers[i].description or profile.layers[i].name
        if kept[i] and not has_out[i] and desc.startswith("__getitem__"):
            fwd[i] = bwd[i] = act[i] = par[i] = 0.0
            kept[i] = False
    return fwd, bwd, act, par, kept


def topological_states(profile: Profile, note: str = "") -> States:
    n = len(profile.layers)
    if n == 0:
        raise ProfileError("profile has no layers")
    fwd, bwd, act, par, _ = _effective_costs(profile)
    order = _topological_order(profile)
    position = {layer: k for k, layer in enumerate(order)}
    # last consumer position of each layer; without edges a layer feeds the next one
    last_use = [-1] * n
    for a, b in profile.edges:
        last_use[a] = max(last_use[a], position[b])
    if not profile.edges:
        for k, layer in enumerate(order):
            last_use[layer] = k + 1 if k + 1 < n else -1
    out = np.zeros(n)
    # diff array: layer at position k contributes to cuts after positions k..last_use-1
    diff = np.zeros(n + 1)
    for layer in range(n):
        k, last = position[layer], last_use[layer]
        if last > k:
            diff[k] += act[layer]
            diff[last] -= act[layer]
    out = np.cumsum(diff)[:n]
    covered, mask = [], 0
    for layer in order:
        mask |= 1 << layer
        covered.append(mask)
    idx = np.array(order)
    return States(
        labels=tuple(profile.layers[i].description or profile.layers[i].name for i in order),
        covered=tuple(covered),
        forward_s=np.cumsum(fwd[idx]),
        backward_s=np.cumsum(bwd[idx]),
        params=np.cumsum(par[idx]),
        activations=np.cumsum(act[idx]),
        out_bytes=out,
        kind="topological",
        note=note,
    )


class TooManyAntichains(Exception):
    pass


def antichain_states(profile: Profile, max_antichains: int = 2000) -> States:
    """The published planner's states (PipeDream antichain DAG in its topological order).

    Where PipeDream iterates a Python set (the order of an antichain's extra nodes) the result
    depends on the hash seed; we use profile order there, which fixes one of its outcomes.
    Raises TooManyAntichains past `max_antichains`."""
    fwd, bwd, act, par, kept = _effective_costs(profile)
    n = len(profile.layers)
    nodes = [i for i in range(n) if kept[i]]
    alive = set(nodes)
    outs = {i: [] for i in nodes}
    ins = {i: [] for i in nodes}
    for a, b in profile.edges:
        if a in alive and b in alive:
            outs[a].append(b)
            ins[b].append(a)
    order = _topological_order(profile)
    pred = {i: 0 for i in nodes}  # transitive predecessors, bitmask
    for i in order:
        if i in alive:
            for p in ins[i]:
                pred[i] |= pred[p] | (1 << p)
    succ = {i: 0 for i in nodes}
    for i in reversed(order):
        if i in alive:
            for s in outs[i]:
                succ[i] |= succ[s] | (1 << s)

    out_mask = {i: 0 for i in nodes}
    for i in nodes:
        for o in outs[i]:
            out_mask[i] |= 1 << o
    extra_of: dict[int, int] = {}

    def extra_for(a: int) -> int:
        # predecessors of `a` still needed by some node outside a's past (PipeDream's "extra")
        if a not in extra_of:
            past = pred[a] | (1 << a)
            extra, m = 0, pred[a]
            while m:
                low = m & -m
                p = low.bit_length() - 1
                m ^= low
                if out_mask[p] & ~past:
                    extra |= low
            extra_of[a] = extra
        return extra_of[a]

    def augment(antichain: tuple[int, ...]) -> tuple[int, ...]:
        extra = 0
        for a in antichain:
            extra |= extra_for(a)
        ordered = []
        while extra:
            low = extra & -extra
            ordered.append(low.bit_length() - 1)
            extra ^= low
        return tuple(ordered) + antichain

    def deaugment(aug: list[int]) -> tuple[int, ...]:
        members = 0
        for x in aug:
            members |= 1 << x
        result = []
        for x in aug:
            if not (succ[x] & members) and x not in result:
                result.append(x)
        return tuple(result)

    sources = [i for i in nodes if not ins[i]]
    if not sources:
        raise ProfileError("profile has no source layer left after dropping inputs")
    start = (sources[0],)
    key_of = lambda ac: frozenset(ac)  # noqa: E731
    mapping = {key_of(start): 0}
    augmented = [augment(start)]
    desc_of = lambda i: profile.layers[i].description or profile.layers[i].name  # noqa: E731
    descs = [desc_of(start[0])]
    dag_edges: dict[int, list[int]] = {}
    dag_node_order: list[int] = []  # insertion order of the DAG's node dict (via add_edge)
    seen_in_dag = set()
    expanded = set()
    queue = [start]
    head = 0
    while head < len(queue):
        antichain = queue[head]
        head += 1
        key = key_of(antichain)
        if key in expanded:
            continue
        expanded.add(key)
        src_id = mapping[key]
        aug = augmented[src_id]
        members = set(antichain)
        aug_mask = 0
        for x in aug:
            aug_mask |= 1 << x
        for x in aug:
            for nxt in outs[x]:
                if nxt in members or succ[nxt] & aug_mask:
                    continue
                new = deaugment([nxt if y == x else y for y in aug])
                nkey = key_of(new)
                if nkey not in mapping:
                    if len(mapping) >= max_antichains:
                        raise TooManyAntichains(len(mapping))
                    mapping[nkey] = len(augmented)
                    augmented.append(augment(new))
                    descs.append(desc_of(new[0]))
                dst_id = mapping[nkey]
                for node in (src_id, dst_id):
                    if node not in seen_in_dag:
                        seen_in_dag.add(node)
                        dag_node_order.append(node)
                dag_edges.setdefault(src_id, []).append(dst_id)
                queue.append(new)
    if not dag_node_order:
        dag_node_order = [0]
    # PipeDream's topological sort: roots by description, DFS children by description.
    sorted_ids: list[int] = []
    marked = set()

    def visit(node: int):
        stack = [(node, iter(sorted(dag_edges.get(node, []), key=lambda c: descs[c])))]
        marked.add(node)
        while stack:
            cur, children = stack[-1]
            advanced = False
            for c in children:
                if c not in marked:
                    marked.add(c)
                    stack.append((c, iter(sorted(dag_edges.get(c, []), key=lambda x: descs[x]))))
                    advanced = True
                    break
            if not advanced:
                stack.pop()
                sorted_ids.append(cur)

    for node in sorted(dag_node_order, key=lambda c: descs[c]):
        if node not in marked:
            visit(node)
    states = list(reversed(sorted_ids))
    covered, out = [], []
    for sid in states:
        aug = augmented[sid]
        mask = 0
        for a in aug:
            mask |= pred[a] | (1 << a)
        covered.append(mask)
        out.append(sum(act[a] for a in aug))
    idx_lists = [[i for i in range(n) if m >> i & 1] for m in covered]

    def cumulative(values):
        return np.array([float(values[ix].sum()) if ix else 0.0 for ix in idx_lists])

    return States(
        labels=tuple(desc_of(augmented[s][-1]) for s in states),
        covered=tuple(covered),
        forward_s=cumulative(fwd),
        backward_s=cumulative(bwd),
        params=cumulative(par),
        activations=cumulative(act),
        out_bytes=np.array(out, dtype=float),
        kind="antichain",
    )


def hpgo_states(profile: Profile, max_antichains: int = 2000) -> States:
    """Antichain states where they can be had, else topological cuts (and say why)."""
    try:
        return antichain_states(profile, max_antichains)
    except TooManyAntichains as e:
        return topological_states(
            profile,
            note=f"antichain DAG has more than {e.args[0]} states (the published planner "
            f"cannot prepare this profile); using cuts in a topological order",
        )


def coarsen_cuts(
    candidates: list[int], cum_compute: np.ndarray, out_bytes: np.ndarray, limit: int
) -> list[int]:
    """At most `limit` of the cut states `candidates` (the last one always kept), for searches
    on very long profiles: the compute range is split into limit/2 equal buckets and each keeps
    its two cuts with the fewest bytes crossing. A heuristic: cuts it drops are never tried."""
    if len(candidates) <= limit:
        return list(candidates)
    last = candidates[-1]
    inner = candidates[:-1]
    buckets = max(1, limit // 2)
    total = float(cum_compute[last]) or 1.0
    chosen: dict[int, list[int]] = {}
    for j in inner:
        k = min(buckets - 1, int(float(cum_compute[j]) / total * buckets))
        chosen.setdefault(k, []).append(j)
    keep = []
    for group in chosen.values():
        keep.extend(sorted(group, key=lambda j: (out_bytes[j], j))[:2])
    return sorted(keep)[: limit - 1] + [last]
