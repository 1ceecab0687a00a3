"""Boundary: explicit send/recv ops between stages, re-splitting rows between replica counts.

For micro-batch i and stages a -> b the forward ops are named
    dapple/mb<i>/s<a>_to_s<b>/send   (one IdentityN per sender replica, on its device)
    dapple/mb<i>/s<a>_to_s<b>/recv   (one IdentityN per receiver replica, on its device)
with a suffix `_r<k>` (replica k) when that side has more than one replica. The backward
transfer of activation gradients uses the same names with the stages reversed
(`s<b>_to_s<a>`). Schedule control dependencies go on these ops (see rewrite.py).

Row re-splitting: a batch tensor's rows [0, b) of the micro-batch are spread over the sender
replicas (`plan.rows_of_replica`); each receiver replica gets its own row range, assembled from
the overlapping pieces of the senders' blocks (`plan.row_overlaps`), concatenated in row order.
A tensor with row factor k (first dimension k x rows, a flattened [batch * seq, ...]) is cut the
same way at k x the row offsets. A batch-independent
tensor ("whole") goes from sender replica 0 to every receiver replica; its gradient comes back
summed from every receiver replica to sender replica 0 (the other sender replicas get zeros).

Moving a piece between slots is the Transport's job. `LocalTransport` (one process) lets TF copy
it onto the receiver's device. A multi-rank transport (pairwise broadcast) implements the same
three methods and gets `None` for pieces produced on another rank; a transport with an
`is_local(slot)` method is also handed, at send time, the pieces for receivers on other ranks
(nothing on the sender's rank would otherwise ask for them).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import tensorflow as tf

from planner.plan_format import Plan

from .place import Slot

ROWS, WHOLE = "rows", "whole"


def boundary_name(micro_batch: int, from_stage: int, to_stage: int) -> str:
    return f"dapple/mb{micro_batch}/s{from_stage}_to_s{to_stage}"


def endpoint_op_name(
    micro_batch: int, from_stage: int, to_stage: int, kind: str, replica: int, num_replicas: int
) -> str:
    suffix = f"_r{replica}" if num_replicas > 1 else ""
    return f"{boundary_name(micro_batch, from_stage, to_stage)}/{kind}{suffix}"


class Transport(Protocol):
    def send(self, tensors: list[tf.Tensor], slot: Slot, name: str) -> list[tf.Tensor]:
        """The send op: on `slot`'s device, carrying `tensors` (all produced on that slot)."""

    def transfer(
        self,
        pieces: list[tf.Tensor] | None,
        specs: list[tf.TensorSpec],
        from_slot: Slot,
        to_slot: Slot,
        name: str,
    ) -> list[tf.Tensor] | None:
        """Move `pieces` (None when `from_slot` is not local) to `to_slot`; returns the tensors
        usable on `to_slot`, or None when `to_slot` is not local."""

    def recv(self, tensors: list[tf.Tensor], slot: Slot, name: str) -> list[tf.Tensor]:
        """The recv op: on `slot`'s device."""


class LocalTransport:
    """All slots in this process: sends and receives are IdentityN ops on the slots' devices and
    TensorFlow copies tensors between devices."""

    def __init__(self, device_of_slot: dict[Slot, str]):
        self.device_of_slot = device_of_slot

    def send(self, tensors, slot, name):
        with tf.device(self.device_of_slot[slot]):
            return identity_n(tensors, name)

    def transfer(self, pieces, specs, from_slot, to_slot, name):
        if pieces is None:
            raise ValueError(f"{name}: LocalTransport needs every slot local, {from_slot} is not")
        return pieces

    def recv(self, tensors, slot, name):
        with tf.device(self.device_of_slot[slot]):
            return identity_n(tensors, name)


@dataclasses.dataclass
class BoundaryTransfer:
    """One direction of one boundary for one micro-batch: sender replicas of `from_stage` each
    `send` their blocks of `tensors`; receiver replicas of `to_stage` each `recv` theirs."""

    micro_batch: int
    from_stage: int
    to_stage: int
    tensors: tuple[str, ...]  # template tensor names, the order of every op's list
    modes: tuple[str, ...]  # ROWS or WHOLE per tensor
    specs: tuple[tf.TensorSpec, ...]  # per-example (ROWS: shape[1:]) or whole shapes
    plan: Plan
    transport: Transport
    gradient: bool = False  # backward: WHOLE tensors are summed into receiver 0
    row_factors: tuple[int, ...] = ()  # per tensor: ROWS tensors hold k x rows rows (default 1)
    _pieces: dict = dataclasses.field(default_factory=dict)  # (k, j) -> list[tensor]

    @property
    def name(self) -> str:
        return boundary_name(self.micro_batch, self.from_stage, self.to_stage)

    def _sender_ranges(self, sender: int, receiver: int) -> list[tuple[int, int]]:
        """[lo, hi) in sender replica `sender`'s block of each piece it passes to receiver
        replica `receiver`, in row order."""
        return [
            (o.src_begin, o.src_begin + o.num_rows)
            for o in self.plan.row_overlaps(self.from_stage, self.to_stage)
            if o.sender == sender and o.receiver == receiver
        ]

    def send(self, replica: int, tensors: Sequence[tf.Tensor]) -> tf.Operation:
        """Create sender `replica`'s send op and slice its pieces for every receiver."""
        num_senders = self.plan.stages[self.from_stage].num_replicas
        slot = Slot(self.from_stage, replica)
        sent = self.transport.send(
            list(tensors),
            slot,
            endpoint_op_name(
                self.micro_batch, self.from_stage, self.to_stage, "send", replica, num_senders
            ),
        )
        num_receivers = self.plan.stages[self.to_stage].num_replicas
        with tf.name_scope(self.name + "/"):
            for j in range(num_receivers):
                parts = []
                for t, mode, f in zip(sent, self.modes, self._factors()):
                    if mode == ROWS:
                        parts.append(
                            [
                                t if (lo, hi) == (0, self._block(replica)) else t[f * lo : f * hi]
                                for lo, hi in self._sender_ranges(replica, j)
                            ]
                        )
                    elif self._whole_goes(replica, j):
                        parts.append([t])
                    else:
                        parts.append([])
                self._pieces[(replica, j)] = parts
                if not _is_local(self.transport, Slot(self.to_stage, j)):
                    self.transport.transfer(
                        [p for ps in parts for p in ps],
                        self._piece_specs(replica, j),
                        slot,
                        Slot(self.to_stage, j),
                        f"{self.name}/k{replica}_j{j}",
                    )
        return sent[0].op

    def recv(self, replica: int, like: Sequence[tf.Tensor] | None = None) -> list[tf.Tensor]:
        """Create receiver `replica`'s recv op; returns its tensors (its rows for ROWS).
        `like` gives zeros' shapes for WHOLE gradients this replica does not receive."""
        num_senders = self.plan.stages[self.from_stage].num_replicas
        num_receivers = self.plan.stages[self.to_stage].num_replicas
        slot = Slot(self.to_stage, replica)
        assembled = []
        with tf.name_scope(self.name + "/"):
            arrived = {}
            for k in range(num_senders):
                parts = self._pieces.get((k, replica))
                flat = [p for ps in parts for p in ps] if parts is not None else None
                if parts is None:  # sender k is on another rank: only the layout is known
                    parts = self._piece_layout(k, replica)
                specs = self._piece_specs(k, replica)
                if not specs:  # sender k holds none of this receiver's rows
                    arrived[k] = [[] for _ in parts]
                    continue
                moved = self.transport.transfer(
                    flat, specs, Slot(self.from_stage, k), slot, f"{self.name}/k{k}_j{replica}"
                )
                it = iter(moved)
                arrived[k] = [[next(it) for _ in ps] for ps in parts]
            for n, mode in enumerate(self.modes):
                pieces = [p for k in range(num_senders) for p in arrived[k][n]]
                if mode == ROWS:
                    assembled.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0))
                elif pieces:
                    assembled.append(pieces[0] if len(pieces) == 1 else tf.add_n(pieces))
                else:
                    assembled.append(tf.zeros_like(like[n]))
        return self.transport.recv(
            assembled,
            slot,
            endpoint_op_name(
                self.micro_batch, self.from_stage, self.to_stage, "recv", replica, num_receivers
            ),
        )

    def _factors(self) -> tuple[int, ...]:
        return self.row_factors or (1,) * len(self.tensors)

    def _block(self, replica: int) -> int:
        lo, hi = self.plan.rows_of_replica(self.from_stage, replica)
        return hi - lo

    def _whole_goes(self, sender: int, receiver: int) -> bool:
        return receiver == 0 if self.gradient else sender == 0

    def _piece_layout(self, sender: int, receiver: int) -> list[list[None]]:
        """Per tensor, one entry per piece sender -> receiver (as `send` slices them)."""
        layout = []
        for mode in self.modes:
            if mode == ROWS:
                layout.append([None for _ in self._sender_ranges(sender, receiver)])
            else:
                layout.append([None] if self._whole_goes(sender, receiver) else [])
        return layout

    def _piece_specs(self, sender: int, receiver: int) -> list[tf.TensorSpec]:
        specs = []
        for spec, mode, f in zip(self.specs, self.modes, self._factors()):
            if mode == ROWS:
                specs += [
                    tf.TensorSpec([f * (hi - lo)] + list(spec.shape), spec.dtype)
                    for lo, hi in self._sender_ranges(sender, receiver)
                ]
            elif self._whole_goes(sender, receiver):
                specs.append(spec)
        return specs


def _is_local(transport, slot: Slot) -> bool:
    is_local = getattr(transport, "is_local", None)
    return True if is_local is None else is_local(slot)


def identity_n(tensors: list[tf.Tensor], name: str) -> list[tf.Tensor]:
    """An IdentityN op named exactly `name` (from the graph's root scope, whatever scope the
    caller is in): the endpoint ops that schedules, transports and traces find by name."""
    with tf.compat.v1.get_default_graph().name_scope(None):
        return list(tf.identity_n(tensors, name=name))
