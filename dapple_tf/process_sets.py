"""The Horovod process sets of one plan (`ProcessSets`), registered in the same order on every
rank: one per group of ranks that sums a gradient (a stage's replicas, or the union of the
stages that use a tied variable) and one per pair of ranks that exchange rows at a boundary
(between any two stages that exchange tensors, adjacent or not; the pairs come from
Plan.row_overlaps). The group lists (`gradient_groups`, `pair_groups`) are pure, testable
without Horovod.

Horovod 0.28.1 + Gloo facts this module is built around (measured, see tests/multirank/):
  * collectives on non-global process sets: allreduce, broadcast, allgather work (in our build
    grouped_allreduce and alltoall with splits on a dynamic set worked too); we use per-tensor
    allreduce, allgather and broadcast (Horovod's tensor fusion still batches allreduces);
  * a process set equal to the global set cannot be added: such groups use the global set;
  * process sets are registered collectively: every rank must add the same sets in the same
    order, even sets it is not part of.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from planner.plan_format import Plan, PlanError

from . import comm, compat


def rank_group(ranks: Iterable[int]) -> tuple[int, ...]:
    """`ranks` as a process set names them: sorted, each once."""
    return tuple(sorted(set(int(r) for r in ranks)))


def gradient_groups(plan: Plan, tied_stages: Sequence[Sequence[int]] = ()) -> list[tuple[int, ...]]:
    """The groups of ranks that sum a gradient, in a deterministic order: each stage's replicas,
    then for every tied variable (given as the stages that use it) the union of those stages'
    ranks. Groups of one rank need no collective and are left out; duplicates appear once."""
    groups: list[tuple[int, ...]] = []
    for stage in plan.stages:
        groups.append(rank_group(stage.devices))
    for stages in tied_stages:
        groups.append(rank_group(d for s in stages for d in plan.stages[s].devices))
    return _unique([g for g in groups if len(g) > 1])


def _unique(groups: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    seen, out = set(), []
    for g in groups:
        if g not in seen:
            seen.add(g)
            out.append(g)
    return out


def pair_groups(
    plan: Plan, boundaries: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, ...]]:
    """The rank pairs that exchange rows at the stage boundaries `boundaries` ((from stage,
    to stage) pairs, in the order given; default: every pair of consecutive stages), in that
    order. Both directions (activations forward, their gradients backward) share a pair.
    Pairs whose ranks are the only ranks of the job are left to the global set."""
    if boundaries is None:
        boundaries = [(s, s + 1) for s in range(plan.num_stages - 1)]
    pairs = []
    for a, b in boundaries:
        senders, receivers = plan.stages[a].devices, plan.stages[b].devices
        for o in plan.row_overlaps(a, b):
            pairs.append(rank_group((senders[o.sender], receivers[o.receiver])))
    return _unique(pairs)


class ProcessSets:
    """The Horovod process sets of one plan, registered on every rank in one fixed order
    (gradient groups first, then boundary pairs). `boundaries`: the (from stage, to stage)
    pairs that exchange tensors, in the same order on every rank (a skip connection joins
    non-adjacent stages); default: consecutive stages. `get(ranks)` returns the set for a group
    of ranks; a group equal to all ranks is the global set (Horovod refuses to add a copy)."""

    def __init__(
        self,
        plan: Plan,
        tied_stages: Sequence[Sequence[int]] = (),
        world_size: int | None = None,
        boundaries: Sequence[tuple[int, int]] | None = None,
    ):
        hvd = comm.horovod()
        self.world_size = hvd.size() if world_size is None else world_size
        self.order = _unique(gradient_groups(plan, tied_stages) + pair_groups(plan, boundaries))
        everyone = tuple(range(self.world_size))
        self._sets = {}
        for group in self.order:
            if max(group) >= self.world_size:
                raise PlanError(
                    f"plan {plan.notation} uses rank {max(group)} but only "
                    f"{self.world_size} ranks were launched"
                )
            self._sets[group] = (
                hvd.global_process_set if group == everyone else _registered_or_new(group)
            )

    def get(self, ranks: Iterable[int]):
        group = rank_group(ranks)
        if group == tuple(range(self.world_size)):
            return comm.horovod().global_process_set
        if group not in self._sets:
            raise KeyError(
                f"no process set for ranks {list(group)}; registered: "
                f"{[list(g) for g in self.order]}"
            )
        return self._sets[group]


def _registered_or_new(group: tuple[int, ...]):
    """The process set with exactly these ranks: the one registered earlier in this process
    (e.g. by a previous Trainer with the same plan), else a new one. Every rank sees the same
    table, so every rank takes the same branch."""
    hvd = comm.horovod()
    for set_id, ranks in compat.registered_process_sets().items():
        if set_id != 0 and tuple(ranks) == group:
            existing = compat.process_set(set_id)
            existing.ranks = list(group)
            return existing
    return hvd.add_process_set(list(group))
