"""Multi-rank transport and gradient sync: the rewrite's extension points, over Horovod.

`HorovodTransport` (a boundary.Transport): a piece that crosses ranks is one Horovod broadcast
on the 2-rank process set {sender rank, receiver rank}, root = sender. The receiver passes a
placeholder of the piece's shape (the broadcast overwrites it). Split/concat between unequal
replica counts needs nothing extra: BoundaryTransfer already cuts one piece per overlap of a
sender's and a receiver's rows, so each overlap is one pair broadcast. Names:
    dapple/mb<i>/s<from>_to_s<to>/k<sender replica>_j<receiver replica>/rank<a>_to_rank<b>/p<n>
(backward transfers of activation gradients have the stages reversed, as their send/recv ops).
Broadcasts whose result this rank does not use (it is the sender) are collected in `outgoing`:
the runtime makes the step's last collective depend on them, or nothing would run them.

`HorovodGradientSync` (an allreduce.GradientSync): a rank holds one replica of each of its stages
(one stage; under interleaved-1f1b the v stages of its device group), so its gradients are
already summed over its micro-batches; the gradients of a variable several local stages read (a
tied weight) are summed in-graph first; each variable's gradient is then summed over every rank
that holds a user of it (its stage's replicas, plus the ranks of the other stages reading a
tied variable) with one per-tensor allreduce (Horovod's, or the `sum_dense` given: the multi-rank
trainer passes TF collective all-reduces, see dapple_tf/multirank.py). Gradients that are IndexedSlices on every such
rank stay sparse (an allgather of rows), so sparse optimizer updates match single-device
training; otherwise they are summed dense, as tf.gradients aggregates mixed gradients.
For clip_norm, the global norm counts each variable once (on the lowest rank holding it) and
sums the squares with one scalar allreduce over all ranks (`dapple/clip/global_norm`).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from planner.plan_format import Plan

from .allreduce import LocalGradientSync
from .boundary import identity_n
from .place import Slot

SPARSE, DENSE = "sparse", "dense"


class HorovodTransport:
    """`exchange`: the rank's pair broadcasts (a dapple_tf.boundary_exchange.BoundaryExchange)."""

    def __init__(self, plan: Plan, rank: int, exchange, device: str):
        self.rank = rank
        self.exchange = exchange
        self.device = device
        self.rank_of_slot = {
            Slot(s, k): d
            for s, stage in enumerate(plan.stages)
            for k, d in enumerate(stage.devices)
        }
        self.outgoing: list[tf.Tensor] = []

    def is_local(self, slot: Slot) -> bool:
        return self.rank_of_slot[slot] == self.rank

    def send(self, tensors, slot, name):
        with tf.device(self.device):
            return identity_n(tensors, name)

    def recv(self, tensors, slot, name):
        with tf.device(self.device):
            return identity_n(tensors, name)

    def transfer(self, pieces, specs, from_slot, to_slot, name):
        src, dst = self.rank_of_slot[from_slot], self.rank_of_slot[to_slot]
        if src == dst:
            return pieces
        if self.rank not in (src, dst):
            return None
        names = [f"{name}/rank{src}_to_rank{dst}/p{n}" for n in range(len(specs))]
        # Outside the schedule's control dependencies, as in collective_transport.py: the
        # receiver joins the broadcast when the step starts, not when its previous action ends.
        with tf.control_dependencies(None), tf.device(self.device):
            if self.rank == src:
                for piece, piece_name in zip(pieces, names):
                    self.outgoing.append(self.exchange.pair_broadcast(piece, src, dst, piece_name))
                return None
            received = []
            for spec, piece_name in zip(specs, names):
                placeholder = tf.raw_ops.Empty(shape=list(spec.shape), dtype=spec.dtype)
                received.append(self.exchange.pair_broadcast(placeholder, src, dst, piece_name))
            return received


class HorovodGradientSync:
    """`reduction`: the rank's Horovod reductions (a dapple_tf.gradient_reduction.
    GradientReduction). `ranks_of_variable`: variable -> every rank holding a stage that reads
    it. `exchange(obj, name)`: an allgather of Python objects over all ranks (to agree, per
    variable, whether every rank's gradient is sparse)."""

    def __init__(
        self,
        reduction,
        ranks_of_variable: dict[str, tuple[int, ...]],
        rank: int,
        exchange: Callable[[object, str], list],
        sum_dense: Callable | None = None,
        sum_over_all_ranks: Callable | None = None,
    ):
        self.reduction = reduction
        self.ranks_of_variable = ranks_of_variable
        self.rank = rank
        self.exchange = exchange
        # ({variable: dense gradient}, ranks, device_of_variable) -> {variable: sum over ranks};
        # default: one Horovod allreduce per variable (Horovod fuses them itself)
        self.sum_dense = sum_dense or self._horovod_sums
        # (scalar, name) -> its sum over every rank of the job; default Horovod's
        self.sum_over_all_ranks = sum_over_all_ranks or reduction.sum_over_all_ranks

    def _horovod_sums(self, grads, ranks, device_of_variable):
        out = {}
        for v, g in grads.items():
            with tf.device(device_of_variable[v]):
                out[v] = self.reduction.allreduce_gradient(g, v, ranks)
        return out

    def sum_replicas(self, stage, grads_by_replica, device_of_variable):
        (grads,) = grads_by_replica.values()  # one replica of a stage per rank
        return grads

    def sum_stages(self, grads_by_stage, device_of_variable):
        # the local stages first (interleaved-1f1b: a tied weight read by two stages of this
        # rank), then across ranks
        grads = LocalGradientSync().sum_stages(grads_by_stage, device_of_variable)
        kinds = {
            v: (SPARSE if isinstance(g, tf.IndexedSlices) else DENSE) for v, g in grads.items()
        }
        everyone = self.exchange(kinds, "dapple.gradient_kinds")
        out, dense_by_group = {}, {}
        for v in sorted(grads):  # the same order on every rank
            group = self.ranks_of_variable[v]
            g = grads[v]
            if len(group) == 1:
                out[v] = g
            elif all(everyone[r].get(v) == SPARSE for r in group):
                with tf.device(device_of_variable[v]):
                    out[v] = self.reduction.allgather_rows(g, v, group)
            else:
                dense_by_group.setdefault(group, {})[v] = g
        for group, dense in dense_by_group.items():
            out.update(self.sum_dense(dense, group, device_of_variable))
        missing = sorted(
            v
            for v, group in self.ranks_of_variable.items()
            if self.rank in group
            and v not in grads
            and len(group) > 1
            and any(v in everyone[r] for r in group)
        )
        if missing:
            raise NotImplementedError(
                f"rank {self.rank} reads variables {missing} without a gradient while other "
                f"ranks have one; not supported by the multi-rank gradient sync"
            )
        return out

    def sum_statistics(self, stage, by_replica, ranks, device):
        """One slot per rank: its tensors summed over the stage's ranks as dense gradients are
        (`sum_dense`)."""
        (values,) = by_replica.values()
        if len(set(ranks)) == 1:
            return values
        return self.sum_dense(values, tuple(sorted(set(ranks))), {n: device for n in values})

    def global_norm(self, grads):
        """Each variable's final gradient is on every rank of its group; only the lowest of
        them (its owner) adds its squared norm, then one scalar sum over all ranks."""
        owned = [g for v, g in grads.items() if self.ranks_of_variable[v][0] == self.rank]
        half_squares = [
            tf.nn.l2_loss(g.values if isinstance(g, tf.IndexedSlices) else g) for g in owned
        ]  # as tf.linalg.global_norm computes it
        local = tf.add_n(half_squares) if half_squares else tf.constant(0.0, tf.float32)
        total = self.sum_over_all_ranks(local, "dapple/clip/global_norm")
        return tf.sqrt(2.0 * total, name="global_norm")
