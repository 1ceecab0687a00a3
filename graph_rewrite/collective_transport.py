"""Multi-rank boundary transport over TensorFlow's own collectives (a boundary.Transport).

A piece that crosses ranks is one TF collective broadcast on the 2-device group {sender rank,
receiver rank}: `CollectiveBcastSendV2` on the sender, `CollectiveBcastRecvV2` (which knows the
piece's static shape) on the receiver. It needs every rank's session on its own
`tf.distribute.Server` (dapple_tf/tf_cluster.py).

Overlap: the receiving op is created outside the schedule's control dependencies, so it is
posted when the step starts and completes as soon as the sender's data arrives; the schedule
still orders compute, because the action's start op (the `recv` IdentityN) and its call wait
for the previous action. The sending op is part of its action's end (`gate_on_sends`): its
peer is already waiting, so it costs about a millisecond, and the next action cannot push it
back (measured: with a rank pinned to one core, sends left ungated ran only after the next
forward, in pairs, and the receiving stage idled). It is also in `outgoing`, which the
runtime's step-end collective depends on.

Keys (`CollectiveKeys`): a group per rank pair, and per boundary direction (from stage, to
stage) a running count of the pieces the pair moves across it. Both ends create one boundary
direction's pieces in the same order, micro-batch order (every schedule runs a stage's forwards
and its backwards in micro-batch order). A count per boundary, not per pair direction: under
interleaved-1f1b a rank holds several stages, so one pair direction carries several boundaries
(ranks 0 -> 1 with stages [0, 2] on rank 0 and [1, 3] on rank 1: activations 0 -> 1 and 2 -> 3,
gradients 2 -> 1), whose pieces the two ranks create in different interleavings. The runtime
checks that both ends agree before the first step (`check_keys`). `all_reduce_sum`
is the same machinery for sums over a group of ranks (gradients, the step-end loss).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from planner.plan_format import Plan

from .boundary import identity_n
from .place import Slot

GROUP_KEY_BASE = 1000  # leaves small keys to user code that creates collectives of its own
# Streams of instance keys within a group: pair transfers to the higher rank, to the lower rank,
# and reductions; then one per boundary direction (`CollectiveKeys.boundary_stream`).
STREAMS = (UP, DOWN, REDUCE) = (0, 1, 2)


class CollectiveKeys:
    """Group and instance keys of one rank's TF collectives, the same on every rank.

    Group key: from the sorted ranks of the group alone (pairs: base + lo * N + hi; the group of
    all ranks: base - 1; any other group: after all pairs, by its index in `groups`, a list
    every rank computes the same way from the plan). Instance key: the running count of
    collectives created in the group, so both (all) members must create a group's collectives
    in the same order; `names` records them by group so `check_keys` can verify that before
    the first step."""

    def __init__(
        self, world_size: int, groups: Sequence[tuple[int, ...]] = (), num_stages: int = 1
    ):
        self.world_size = world_size
        self.groups = [tuple(g) for g in groups]
        self.num_stages = num_stages
        self.num_streams = len(STREAMS) + num_stages * num_stages
        self.names: dict[tuple[int, ...], list[str]] = {}

    def boundary_stream(self, from_stage: int, to_stage: int) -> int:
        """The stream of the pieces a pair moves from stage `from_stage` to `to_stage`."""
        if not (0 <= from_stage < self.num_stages and 0 <= to_stage < self.num_stages):
            raise ValueError(
                f"boundary s{from_stage} -> s{to_stage} is outside the {self.num_stages} stages "
                f"these keys were made for"
            )
        return len(STREAMS) + from_stage * self.num_stages + to_stage

    def group_key(self, ranks) -> int:
        group = tuple(sorted(set(ranks)))
        n = self.world_size
        if group == tuple(range(n)):
            return GROUP_KEY_BASE - 1
        if len(group) == 2:
            return GROUP_KEY_BASE + group[0] * n + group[1]
        if group not in self.groups:
            raise KeyError(
                f"no collective group for ranks {list(group)}; known groups: "
                f"{[list(g) for g in self.groups]}"
            )
        return GROUP_KEY_BASE + n * n + self.groups.index(group)

    def instance_key(self, ranks, name: str, stream: int) -> int:
        """The next instance key of the group of `ranks` in `stream`: a group's streams number
        their collectives independently (a pair's two directions are built in different
        interleavings on the two ranks; reductions apart from both) without sharing keys."""
        group = tuple(sorted(set(ranks)))
        names = self.names.setdefault((group, stream), [])
        names.append(name)
        return (len(names) - 1) * self.num_streams + stream + 1


class CollectiveTransport:
    # An action ends only once its sends ran (graph_rewrite/rewrite.py): with the receivers'
    # ops posted at step start a send completes in about a millisecond, while an executor
    # with one inter-op thread (a rank pinned to one core) would otherwise run the next
    # action's compute first and leave the receiver idle.
    gate_on_sends = True

    def __init__(
        self, plan: Plan, rank: int, keys: CollectiveKeys, device: str, timeout_s: float = 0.0
    ):
        self.rank = rank
        self.keys = keys
        self.device = device
        self.timeout_s = float(timeout_s)
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
        pair, stream = (src, dst), self.keys.boundary_stream(from_slot.stage, to_slot.stage)
        group = self.keys.group_key(pair)
        names = [f"{name}/rank{src}_to_rank{dst}/p{n}" for n in range(len(specs))]
        # Outside the schedule's control dependencies: see the module doc.
        with tf.control_dependencies(None), tf.device(self.device):
            if self.rank == src:
                for piece, piece_name in zip(pieces, names):
                    key = self.keys.instance_key(pair, piece_name, stream)
                    self.outgoing.append(
                        _named(
                            piece_name,
                            lambda leaf: tf.raw_ops.CollectiveBcastSendV2(
                                input=piece,
                                group_size=2,
                                group_key=group,
                                instance_key=key,
                                timeout_seconds=self.timeout_s,
                                name=leaf,
                            ),
                        )
                    )
                return None
            received = []
            for spec, piece_name in zip(specs, names):
                key = self.keys.instance_key(pair, piece_name, stream)
                received.append(
                    _named(
                        piece_name,
                        lambda leaf: tf.raw_ops.CollectiveBcastRecvV2(
                            group_size=2,
                            group_key=group,
                            instance_key=key,
                            shape=list(spec.shape),
                            T=spec.dtype,
                            timeout_seconds=self.timeout_s,
                            name=leaf,
                        ),
                    )
                )
            return received


def all_reduce_sum(tensor, ranks, keys: CollectiveKeys, name: str, timeout_s: float = 0.0):
    """Sum `tensor` over `ranks` with a TF collective, the op named exactly `name`."""
    group = tuple(sorted(set(ranks)))
    group_key = keys.group_key(group)
    instance_key = keys.instance_key(group, name, REDUCE)
    return _named(
        name,
        lambda leaf: tf.raw_ops.CollectiveReduceV2(
            input=tensor,
            group_size=len(group),
            group_key=group_key,
            instance_key=instance_key,
            ordering_token=[],
            merge_op="Add",
            final_op="Id",
            timeout_seconds=timeout_s,
            name=leaf,
        ),
    )


DEFAULT_BUCKET_BYTES = 4 << 20


def fused_all_reduce_sum(
    grads: dict,
    order,
    ranks,
    keys: CollectiveKeys,
    device_of_variable: dict[str, str],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout_s: float = 0.0,
    log=None,
) -> dict:
    """Sum each (dense) gradient of `grads` over `ranks`: gradients taken in `order` (the order
    they are expected to be ready in, e.g. last layer first) are packed into buckets of at most
    `bucket_bytes` (a larger one is a bucket of its own), each bucket one TF all-reduce of the
    concatenated gradients, so many small variables cost few collectives. Every member of the
    group must call this with the same variables and order."""
    group = tuple(sorted(set(ranks)))
    tag = "_".join(str(r) for r in group)
    names = [v for v in order if v in grads] + sorted(v for v in grads if v not in set(order))
    buckets, current, size = [], [], 0
    for v in names:
        g = tf.convert_to_tensor(grads[v])
        nbytes = (
            (g.shape.num_elements() or 0) * g.dtype.size if g.shape.is_fully_defined() else None
        )
        fits = (
            current
            and nbytes is not None
            and size + nbytes <= bucket_bytes
            and g.dtype == current[0][1].dtype
        )
        if current and not fits:
            buckets.append(current)
            current, size = [], 0
        current.append((v, g))
        size += nbytes or 0
        if nbytes is None:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    out = {}
    for k, bucket in enumerate(buckets):
        with tf.device(device_of_variable[bucket[0][0]]):
            if len(bucket) == 1:
                ((v, g),) = bucket
                name = "dapple/allreduce/" + v.replace(":", "_")
                if log is not None:
                    log.add(name, group)
                out[v] = all_reduce_sum(g, group, keys, name, timeout_s)
                continue
            name = f"dapple/allreduce/ranks{tag}/bucket{k}"
            if log is not None:
                log.add(name, group)
            with tf.name_scope(name + "_pack/"):
                flat = tf.concat([tf.reshape(g, [-1]) for _, g in bucket], 0)
            summed = all_reduce_sum(flat, group, keys, name, timeout_s)
            with tf.name_scope(name + "_unpack/"):
                parts = tf.split(summed, [g.shape.num_elements() for _, g in bucket])
                for (v, g), part in zip(bucket, parts):
                    out[v] = tf.reshape(part, g.shape)
    return out


def check_keys(mine: dict[tuple[int, ...], list[str]], everyone: list[dict], rank: int) -> None:
    """Raise if another member of a group numbered the group's collectives differently from this
    rank (`everyone`: every rank's `CollectiveKeys.names`, by rank)."""
    for (group, stream), names in mine.items():
        for peer in group:
            theirs = everyone[peer].get((group, stream), [])
            if peer == rank or theirs == names:
                continue
            first = next(
                (k for k, (a, b) in enumerate(zip(names, theirs)) if a != b),
                min(len(names), len(theirs)),
            )
            raise RuntimeError(
                f"rank {rank}: the collectives of ranks {list(group)} are numbered differently "
                f"on ranks {rank} and {peer} from instance {first + 1} on (here "
                f"{names[first : first + 1]}, there {theirs[first : first + 1]}; {len(names)} vs "
                f"{len(theirs)} collectives); every rank must build the same plan and model"
            )


def _named(full_name: str, make):
    """The op `make(leaf)` named exactly `full_name` (absolute, whatever the current scope)."""
    scope, _, leaf = full_name.rpartition("/")
    with (
        tf.compat.v1.get_default_graph().name_scope(None),
        tf.compat.v1.name_scope(scope + "/" if scope else None),
    ):
        return make(leaf)
