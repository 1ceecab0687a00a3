"""Rows of boundary tensors between the replicas of two stages, as Horovod pair broadcasts.

`boundary_transfers` (pure, testable without Horovod) lists the row transfers of a boundary
between stages with any replica counts: one per overlap of a sender's and a receiver's rows
(Plan.row_overlaps), with the ranks of both. `BoundaryExchange` moves them as broadcasts on the
2-rank process set of each pair, named after what they carry (`transfer_name`) and recorded in
the rank's CollectiveLog (rank_failures.py) so that a stall can be explained.

The multi-rank Trainer's Horovod transport (graph_rewrite/horovod_transport.py, which slices
rows with graph_rewrite/boundary.py) uses `pair_broadcast`; `send_rows`/`recv_rows` are the same
exchange as a standalone primitive (tests/multirank/comm_checks.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from planner.plan_format import Plan, RowOverlap

from . import comm
from .process_sets import ProcessSets
from .rank_failures import CollectiveLog


def boundary_transfers(plan: Plan, from_stage: int, to_stage: int) -> list[RowOverlap]:
    """The row transfers of the boundary from_stage -> to_stage: Plan.row_overlaps (one per
    overlap of a sender's and a receiver's row range, by receiver replica, then by row) with
    `sender` and `receiver` the replicas' ranks instead of their replica indices."""
    senders, receivers = plan.stages[from_stage].devices, plan.stages[to_stage].devices
    return [
        dataclasses.replace(o, sender=senders[o.sender], receiver=receivers[o.receiver])
        for o in plan.row_overlaps(from_stage, to_stage)
    ]


def transfer_name(
    micro_batch: int, from_stage: int, to_stage: int, t: RowOverlap, backward: bool = False
) -> str:
    """Name of one pair broadcast. Forward activations travel s<a>_to_s<b> from the earlier
    stage; their gradients travel back under s<b>_to_s<a>, from the later stage's replica."""
    if backward:
        head = f"dapple/mb{micro_batch}/s{to_stage}_to_s{from_stage}/grad"
        src, dst = t.receiver, t.sender
    else:
        head = f"dapple/mb{micro_batch}/s{from_stage}_to_s{to_stage}/act"
        src, dst = t.sender, t.receiver
    return f"{head}/rank{src}_to_rank{dst}_rows{t.begin}_{t.end}"


class BoundaryExchange:
    """The pair broadcasts of one rank (`rank`), on the 2-rank sets of `process_sets`, each
    recorded in `log`. All methods add ops to the default graph."""

    def __init__(self, process_sets: ProcessSets, rank: int, log: CollectiveLog):
        self.process_sets = process_sets
        self.rank = rank
        self.log = log

    def pair_broadcast(self, tensor, sender: int, receiver: int, name: str):
        """Broadcast on the 2-rank set {sender, receiver}; the receiver passes a placeholder
        tensor of the same shape and dtype and gets the sender's value."""
        hvd = comm.horovod()
        ps = self.process_sets.get((sender, receiver))
        self.log.add(name, (sender, receiver))
        return comm.named(
            lambda leaf: hvd.broadcast(tensor, root_rank=sender, name=leaf, process_set=ps), name
        )

    def send_rows(
        self,
        local,
        transfers: Sequence[RowOverlap],
        micro_batch: int,
        from_stage: int,
        to_stage: int,
        backward: bool = False,
    ) -> list:
        """On a rank that holds rows of a boundary tensor (`local`: this rank's rows, batch
        first), send each overlap it owns. Forward: this rank is a sender replica of from_stage.
        Backward (`local` = gradient w.r.t. the receiver's rows): this rank is the receiver."""
        ops = []
        for t in transfers:
            mine = t.receiver if backward else t.sender
            if mine != self.rank:
                continue
            start = t.dst_begin if backward else t.src_begin
            rows = local[start : start + t.num_rows]
            src, dst = (t.receiver, t.sender) if backward else (t.sender, t.receiver)
            ops.append(
                self.pair_broadcast(
                    rows, src, dst, transfer_name(micro_batch, from_stage, to_stage, t, backward)
                )
            )
        return ops

    def recv_rows(
        self,
        row_shape,
        dtype,
        transfers: Sequence[RowOverlap],
        micro_batch: int,
        from_stage: int,
        to_stage: int,
        backward: bool = False,
    ):
        """On a rank that needs rows of a boundary tensor, receive every overlap addressed to it
        and concatenate them in row order. `row_shape` is the per-row shape (without batch)."""
        import tensorflow as tf

        pieces = []
        for t in transfers:
            mine = t.sender if backward else t.receiver
            if mine != self.rank:
                continue
            src, dst = (t.receiver, t.sender) if backward else (t.sender, t.receiver)
            placeholder = tf.raw_ops.Empty(shape=[t.num_rows] + list(row_shape), dtype=dtype)
            key = t.src_begin if backward else t.dst_begin
            pieces.append(
                (
                    key,
                    self.pair_broadcast(
                        placeholder,
                        src,
                        dst,
                        transfer_name(micro_batch, from_stage, to_stage, t, backward),
                    ),
                )
            )
        if not pieces:
            raise ValueError(
                f"rank {self.rank} receives nothing at boundary "
                f"s{from_stage}->s{to_stage} ({'backward' if backward else 'forward'})"
            )
        pieces.sort(key=lambda p: p[0])
        return pieces[0][1] if len(pieces) == 1 else tf.concat([p for _, p in pieces], axis=0)
