"""Horovod communication for multi-rank runs (one rank per device, plan device id d = rank d).

What this module owns:
  * starting Horovod with our settings (dynamic process sets, timeouts) and sharing the plan
    from rank 0 (`init`, `share_plan`);
  * the process sets a plan needs, created in the same order on every rank (`ProcessSets`):
    one per group of ranks that sums a gradient (a stage's replicas, or the union of the stages
    that use a tied variable) and one per pair of ranks that exchange rows at a boundary
    (between any two stages that exchange tensors, adjacent or not);
  * the row bookkeeping of a boundary between stages with unequal replica counts
    (`boundary_transfers`: pure, testable without Horovod);
  * graph-mode collectives named after what they carry (`send_rows`, `recv_rows`,
    `allreduce_gradient`, `step_end`), recorded so that a stall can be explained;
  * a per-rank `Watchdog`: heartbeats, and a bounded-time exit with a message that names the
    missing rank(s) and the collectives this rank shares with them.

The multi-rank Trainer (multirank.py) uses ProcessSets, Collectives and the Watchdog; its
boundary transfers go through graph_rewrite/horovod_transport.py (which slices rows with
graph_rewrite/boundary.py); `send_rows`/`recv_rows` here are the same exchange as a standalone
primitive (tests/multirank/comm_checks.py).

Horovod 0.28.1 + Gloo facts this module is built around (measured, see tests/multirank/):
  * collectives on non-global process sets: allreduce, broadcast, allgather work (in our build
    grouped_allreduce and alltoall with splits on a dynamic set worked too); we use per-tensor
    allreduce, allgather and broadcast (Horovod's tensor fusion still batches allreduces);
  * a process set equal to the global set cannot be added: such groups use the global set;
  * process sets are registered collectively: every rank must add the same sets in the same
    order, even sets it is not part of;
  * a Horovod collective is keyed by its TF node name: both ends must create the same name,
    so we create collectives under absolute name scopes and check the name we got;
  * Horovod's TF ops are not marked stateful: Grappler would drop, pre-run or merge them
    (see session_config);
  * a rank that dies makes Horovod abort (SIGABRT) on the others at once: its shutdown tries
    to negotiate the removal of every process set with the dead rank and throws, so no Python
    code of theirs runs again; each rank's exit monitor (exit_monitor.py) then names the rank
    that died first and what its rank waited for (measured with 2 ranks, where the global set
    is the only one, Horovod kept the survivor alive: its Watchdog names the dead rank); a
    rank that hangs or freezes makes the others wait, which the Watchdog turns into an exit
    with status EXIT_PEER_LOST within DAPPLE_PEER_TIMEOUT_S seconds, naming the rank and the
    collectives shared with it.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterable, Sequence

from planner.plan_format import Plan, PlanError

from . import compat, exit_monitor

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: re-running with the same model_dir resumes from the checkpoint

# Our defaults for Horovod's own knobs; a value already in the environment wins.
_HOROVOD_ENV_DEFAULTS = {
    "HOROVOD_DYNAMIC_PROCESS_SETS": "1",
    # Gloo gives up on a silent peer after this long and aborts without naming it; our
    # Watchdog (DAPPLE_PEER_TIMEOUT_S) must fire first, so this is larger.
    "HOROVOD_GLOO_TIMEOUT_SECONDS": "300",
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "30",
}
# On hosts without GPUs a rank computes on the core its Horovod thread runs on, and that
# thread's coordination round (a Gloo exchange every cycle, busy or idle) took 26-54 ms of
# CPU per step of a 1:1 MLP pipeline at Horovod's 1 ms cycle; 10 ms cycles cut the step from
# 285 to 245 ms and left DP2's gradient sums as fast (bench/README.md, "Scaling across ranks").
CPU_HOST_CYCLE_TIME_MS = "10"
DEFAULT_PEER_TIMEOUT_S = 60.0
DEFAULT_STEP_TIMEOUT_S = 1800.0


def launched_ranks() -> int:
    """Number of ranks the launcher started (horovodrun or mpirun), 1 when not launched."""
    for key in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def launched_local_rank() -> int | None:
    """This process's rank on its host when a launcher started several ranks: the launcher's
    variable (horovodrun, Open MPI, MPICH/Intel MPI), known before Horovod starts, else
    Horovod's local rank once it has started; None in a single process."""
    if launched_ranks() <= 1:
        return None
    for key in ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(key):
            return int(os.environ[key])
    hvd = _hvd()
    return hvd.local_rank() if hvd.is_initialized() else None


def _hvd():
    import horovod.tensorflow as hvd  # imported lazily: single-process users need no Horovod

    return hvd


# ---- process sets --------------------------------------------------------------------------
def _rank_group(ranks: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(int(r) for r in ranks)))


def gradient_groups(plan: Plan, tied_stages: Sequence[Sequence[int]] = ()) -> list[tuple[int, ...]]:
    """The groups of ranks that sum a gradient, in a deterministic order: each stage's replicas,
    then for every tied variable (given as the stages that use it) the union of those stages'
    ranks. Groups of one rank need no collective and are left out; duplicates appear once."""
    groups: list[tuple[int, ...]] = []
    for stage in plan.stages:
        groups.append(_rank_group(stage.devices))
    for stages in tied_stages:
        groups.append(_rank_group(d for s in stages for d in plan.stages[s].devices))
    return _unique([g for g in groups if len(g) > 1])


def _unique(groups: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    seen, out = set(), []
    for g in groups:
        if g not in seen:
            seen.add(g)
            out.append(g)
    return out


@dataclasses.dataclass(frozen=True)
class RowTransfer:
    """Rows [begin, end) of a micro-batch that `sender_rank` (a replica of the earlier stage)
    passes to `receiver_rank` (a replica of the later stage) at one boundary. `src_begin` and
    `dst_begin` are where the rows start in the sender's and the receiver's local slice."""

    sender_rank: int
    receiver_rank: int
    begin: int
    end: int
    src_begin: int
    dst_begin: int

    @property
    def num_rows(self) -> int:
        return self.end - self.begin


def boundary_transfers(plan: Plan, from_stage: int, to_stage: int) -> list[RowTransfer]:
    """The row transfers of the boundary from_stage -> to_stage: one per overlap of a sender's
    and a receiver's row range (Plan.row_overlaps, in its order: by receiver replica, then by
    row), with the replicas' ranks."""
    senders, receivers = plan.stages[from_stage].devices, plan.stages[to_stage].devices
    return [
        RowTransfer(
            senders[o.sender], receivers[o.receiver], o.begin, o.end, o.src_begin, o.dst_begin
        )
        for o in plan.row_overlaps(from_stage, to_stage)
    ]


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
        for t in boundary_transfers(plan, a, b):
            pairs.append(_rank_group((t.sender_rank, t.receiver_rank)))
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
        hvd = _hvd()
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
        group = _rank_group(ranks)
        if group == tuple(range(self.world_size)):
            return _hvd().global_process_set
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
    hvd = _hvd()
    for set_id, ranks in compat.registered_process_sets().items():
        if set_id != 0 and tuple(ranks) == group:
            existing = compat.process_set(set_id)
            existing.ranks = list(group)
            return existing
    return hvd.add_process_set(list(group))


# ---- named collectives -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    ranks: tuple[int, ...]


class CollectiveLog:
    """Every collective this rank created, with the ranks it waits for (for stall reports)."""

    def __init__(self):
        self._items: list[Collective] = []
        self._lock = threading.Lock()

    def add(self, name: str, ranks: Iterable[int]) -> None:
        with self._lock:
            self._items.append(Collective(name, _rank_group(ranks)))

    def shared_with(self, rank: int) -> list[str]:
        with self._lock:
            return [c.name for c in self._items if rank in c.ranks]


def transfer_name(
    micro_batch: int, from_stage: int, to_stage: int, t: RowTransfer, backward: bool = False
) -> str:
    """Name of one pair broadcast. Forward activations travel s<a>_to_s<b> from the earlier
    stage; their gradients travel back under s<b>_to_s<a>, from the later stage's replica."""
    if backward:
        head = f"dapple/mb{micro_batch}/s{to_stage}_to_s{from_stage}/grad"
        src, dst = t.receiver_rank, t.sender_rank
    else:
        head = f"dapple/mb{micro_batch}/s{from_stage}_to_s{to_stage}/act"
        src, dst = t.sender_rank, t.receiver_rank
    return f"{head}/rank{src}_to_rank{dst}_rows{t.begin}_{t.end}"


def session_config(config=None):
    """A session config safe for graphs with Horovod collectives (a copy of `config` if given).

    Horovod 0.28.1 does not mark its TF ops stateful, so three Grappler passes break them:
    dependency optimisation drops collectives whose output is only a control input (a send,
    the backward send of an activation gradient) as if they had no effect; constant folding
    runs a collective with constant inputs while optimising, in an order that differs between
    ranks; arithmetic optimisation merges identical-looking collectives (two micro-batches'
    receives from one sender). Measured: the 3:1 exchange in tests/multirank deadlocks with
    the defaults and runs with these three passes off."""
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    out = tf.compat.v1.ConfigProto()
    if config is not None:
        out.CopyFrom(config)
    rewrite = out.graph_options.rewrite_options
    rewrite.dependency_optimization = rewriter_config_pb2.RewriterConfig.OFF
    rewrite.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    rewrite.arithmetic_optimization = rewriter_config_pb2.RewriterConfig.OFF
    return out


def _unfoldable(tensor):
    """`tensor` + 0, where the 0 comes from a stateful op, so that the collective it feeds never
    has constant inputs (see session_config; belt and braces for small tensors)."""
    import tensorflow as tf

    tensor = tf.convert_to_tensor(tensor)
    return tensor + tf.raw_ops.Empty(shape=[], dtype=tensor.dtype, init=True)


def _named(make: Callable[[str], object], full_name: str):
    """Create a Horovod op whose TF node name is exactly `full_name` (Horovod matches ranks by
    node name, so a silently uniquified name would deadlock)."""
    import tensorflow as tf

    scope, _, leaf = full_name.rpartition("/")
    with tf.compat.v1.name_scope(scope + "/" if scope else None):
        out = make(leaf)
    if out.op.name != full_name:
        raise ValueError(
            f"collective name '{full_name}' is already taken in this graph (TF "
            f"renamed it to '{out.op.name}'); every collective needs a unique name"
        )
    return out


class Collectives:
    """Graph-mode collectives of one rank. All methods add ops to the default graph."""

    def __init__(self, process_sets: ProcessSets, rank: int, log: CollectiveLog | None = None):
        self.process_sets = process_sets
        self.rank = rank
        self.log = log or CollectiveLog()

    def pair_broadcast(self, tensor, sender: int, receiver: int, name: str):
        """Broadcast on the 2-rank set {sender, receiver}; the receiver passes a placeholder
        tensor of the same shape and dtype and gets the sender's value."""
        hvd = _hvd()
        ps = self.process_sets.get((sender, receiver))
        self.log.add(name, (sender, receiver))
        return _named(
            lambda leaf: hvd.broadcast(tensor, root_rank=sender, name=leaf, process_set=ps), name
        )

    def send_rows(
        self,
        local,
        transfers: Sequence[RowTransfer],
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
            mine = t.receiver_rank if backward else t.sender_rank
            if mine != self.rank:
                continue
            start = t.dst_begin if backward else t.src_begin
            rows = local[start : start + t.num_rows]
            src, dst = (
                (t.receiver_rank, t.sender_rank) if backward else (t.sender_rank, t.receiver_rank)
            )
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
        transfers: Sequence[RowTransfer],
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
            mine = t.sender_rank if backward else t.receiver_rank
            if mine != self.rank:
                continue
            src, dst = (
                (t.receiver_rank, t.sender_rank) if backward else (t.sender_rank, t.receiver_rank)
            )
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

    def allreduce_gradient(self, grad, variable_name: str, ranks: Iterable[int]):
        """Sum a gradient over `ranks` (a stage's replicas, or all users of a tied variable).
        Per-tensor allreduce: grouped_allreduce is not used on process sets (see module doc)."""
        import tensorflow as tf

        hvd = _hvd()
        group = _rank_group(ranks)
        if len(group) == 1:
            return grad
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
        name = "dapple/allreduce/" + variable_name.replace(":", "_")
        self.log.add(name, group)
        ps = self.process_sets.get(group)
        return _named(lambda leaf: hvd.allreduce(grad, op=hvd.Sum, name=leaf, process_set=ps), name)

    def allgather_rows(self, grad, variable_name: str, ranks: Iterable[int]):
        """Sum an IndexedSlices gradient over `ranks`, keeping it sparse: the rows (values and
        indices) of every rank, concatenated in rank order (the optimizer sums duplicates)."""
        import tensorflow as tf

        hvd = _hvd()
        group = _rank_group(ranks)
        ps = self.process_sets.get(group)
        base = "dapple/allgather/" + variable_name.replace(":", "_")
        self.log.add(base + "/values", group)
        self.log.add(base + "/indices", group)
        values = _named(
            lambda leaf: hvd.allgather(grad.values, name=leaf, process_set=ps), base + "/values"
        )
        indices = _named(
            lambda leaf: hvd.allgather(tf.cast(grad.indices, tf.int64), name=leaf, process_set=ps),
            base + "/indices",
        )
        return tf.IndexedSlices(values, indices, grad.dense_shape)

    def broadcast_variable(self, variable, variable_name: str, ranks: Iterable[int]):
        """An op that sets `variable` on every rank of `ranks` to its value on the lowest one."""
        hvd = _hvd()
        group = _rank_group(ranks)
        name = "dapple/init/" + variable_name.replace(":", "_")
        self.log.add(name, group)
        ps = self.process_sets.get(group)
        value = _named(
            lambda leaf: hvd.broadcast(
                variable.read_value(), root_rank=group[0], name=leaf, process_set=ps
            ),
            name,
        )
        return variable.assign(value, read_value=False)

    def sum_over_all_ranks(self, tensor, name: str):
        """The sum of `tensor` over every rank of the job (each rank must create it)."""
        hvd = _hvd()
        self.log.add(name, range(hvd.size()))
        return _named(lambda leaf: hvd.allreduce(_unfoldable(tensor), op=hvd.Sum, name=leaf), name)

    def step_end(self, local_loss, control_inputs: Sequence = ()):
        """The last collective of every step, on all ranks: sums each rank's share of the loss
        (zero on ranks without the loss stage) after everything in `control_inputs` ran. No rank
        leaves a step before all ranks reached its end, so no rank can run ahead into
        collectives its peers will never join (Horovod would shut down for everyone)."""
        import tensorflow as tf

        hvd = _hvd()
        self.log.add("dapple/step_end", range(hvd.size()))
        with tf.control_dependencies(list(control_inputs)):
            local_loss = _unfoldable(local_loss)
        return _named(
            lambda leaf: hvd.allreduce(local_loss, op=hvd.Sum, name=leaf), "dapple/step_end"
        )


# ---- init and plan sharing ------------------------------------------------------------------
@dataclasses.dataclass
class RankInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int


def init() -> RankInfo:
    """Start Horovod with our defaults (a value already in the environment wins) and pin this
    rank to its local GPU before anything else queries devices or opens a session (see
    devices.pin_to_local_gpu)."""
    from . import devices

    for key, value in _HOROVOD_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not devices.has_gpus():
        os.environ.setdefault("HOROVOD_CYCLE_TIME", CPU_HOST_CYCLE_TIME_MS)
    hvd = _hvd()
    if not hvd.is_initialized():
        hvd.init(process_sets="dynamic")
    info = RankInfo(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    from_launcher = launched_local_rank()
    if from_launcher is not None and from_launcher != info.local_rank:
        raise RuntimeError(
            f"rank {info.rank}: the launcher says local rank {from_launcher} but "
            f"Horovod says {info.local_rank}; sessions would be pinned to the "
            f"wrong GPU"
        )
    devices.pin_to_local_gpu(info.local_rank)
    return info


def allgather_objects(obj, name: str) -> list:
    """Python-level allgather on the global set (every rank must call it, in the same order)."""
    import tensorflow as tf
    from . import devices

    hvd = _hvd()
    with tf.Graph().as_default(), devices.new_session() as session:
        return hvd.allgather_object(obj, session=session, name=name)


def broadcast_object(obj, name: str, root_rank: int = 0):
    import tensorflow as tf
    from . import devices

    hvd = _hvd()
    with tf.Graph().as_default(), devices.new_session() as session:
        return hvd.broadcast_object(obj, root_rank=root_rank, session=session, name=name)


def share_plan(plan_on_rank0: Callable[[], Plan]) -> Plan:
    """Rank 0 computes or loads the plan (`plan_on_rank0` runs only there); every rank returns
    the same Plan. An error on rank 0 is raised on every rank, so no rank is left waiting."""
    hvd = _hvd()
    payload = None
    if hvd.rank() == 0:
        try:
            payload = {"plan": plan_on_rank0().to_dict()}
        except Exception as e:  # noqa: BLE001 - passed on to all ranks, re-raised below
            payload = {"error": f"{type(e).__name__}: {e}"}
    payload = broadcast_object(payload, name="dapple.plan")
    if "error" in payload:
        raise PlanError(f"rank 0 could not produce the plan: {payload['error']}")
    plan = Plan.from_dict(payload["plan"], source="plan broadcast from rank 0")
    plan.check_devices(hvd.size(), what="Horovod ranks")
    if plan.num_devices != hvd.size():
        raise PlanError(
            f"plan {plan.notation} uses {plan.num_devices} devices but {hvd.size()} "
            f"ranks were launched; launch one rank per device of the plan"
        )
    return plan


def step_timeout_s() -> float:
    """DAPPLE_STEP_TIMEOUT_S: the longest a step may wait for its collectives."""
    return float(os.environ.get("DAPPLE_STEP_TIMEOUT_S", DEFAULT_STEP_TIMEOUT_S))


def fusion_bytes() -> int:
    """DAPPLE_FUSION_BYTES: the largest bucket of small dense gradients summed by one TF
    all-reduce (graph_rewrite/collective_transport.py fused_all_reduce_sum)."""
    from graph_rewrite.collective_transport import DEFAULT_BUCKET_BYTES

    return int(os.environ.get("DAPPLE_FUSION_BYTES", DEFAULT_BUCKET_BYTES))


# ---- watchdog ----------------------------------------------------------------------------------
def shared_heartbeat_dir(preferred: str | None = None) -> tuple[str, bool]:
    """(directory, chosen here) : a directory every rank agrees on (rank 0 chooses it), and
    whether it is a temporary one of this job (to be removed at the end). Heartbeats of ranks
    on other hosts are only visible when it lies on a shared filesystem: set
    DAPPLE_HEARTBEAT_DIR (or pass `preferred`, e.g. a folder in the model directory) for
    multi-host jobs."""
    hvd = _hvd()
    choice = None
    if hvd.rank() == 0:
        given = preferred or os.environ.get("DAPPLE_HEARTBEAT_DIR")
        choice = (
            (given, False)
            if given
            else (
                os.path.join(tempfile.gettempdir(), f"dapple-heartbeat-{uuid.uuid4().hex[:12]}"),
                True,
            )
        )
    directory, temporary = broadcast_object(choice, name="dapple.heartbeat_dir")
    os.makedirs(directory, exist_ok=True)
    return directory, temporary


GONE_CHECKS_PER_BEAT = 5


class Watchdog:
    """Heartbeats of one rank, and a bounded wait for the others.

    A thread writes `<directory>/rank<k>.json` every `interval_s` with this rank's step and
    phase ("run" inside a step, "idle" between steps). While this rank is inside step s it
    checks the others: a rank whose heartbeat is older than `peer_timeout_s`, or that has not
    entered step s although this rank has waited in it for `peer_timeout_s`, is missing; a step
    longer than `step_timeout_s` also ends the wait. Then it prints which ranks are missing, the
    collectives this rank shares with them, and exits with EXIT_PEER_LOST (after a short grace
    so that the other waiting ranks can report too).

    `start()` also starts this rank's exit monitor (exit_monitor.py), a child process that
    reports which rank died first and what this rank waited for when this rank's process ends
    abruptly (Horovod aborts the survivors of a killed rank before any of their Python code
    runs again); `stop()`, a normal interpreter exit and the watchdog's own exit dismiss it."""

    def __init__(
        self,
        rank: int,
        size: int,
        directory: str,
        log: CollectiveLog,
        peer_timeout_s: float | None = None,
        step_timeout_s: float | None = None,
        interval_s: float = 1.0,
        exit_fn: Callable[[int], None] = os._exit,
    ):
        self.rank, self.size, self.directory, self.log = rank, size, directory, log
        self.peer_timeout_s = float(
            peer_timeout_s
            if peer_timeout_s is not None
            else os.environ.get("DAPPLE_PEER_TIMEOUT_S", DEFAULT_PEER_TIMEOUT_S)
        )
        self.step_timeout_s = float(
            step_timeout_s
            if step_timeout_s is not None
            else os.environ.get("DAPPLE_STEP_TIMEOUT_S", DEFAULT_STEP_TIMEOUT_S)
        )
        self.interval_s = interval_s
        self._exit = exit_fn
        self._host = socket.gethostname()
        self._step, self._phase, self._since = -1, "idle", time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dapple-watchdog-{rank}", daemon=True
        )
        self._monitor: subprocess.Popen | None = None
        gloo = float(os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "30"))
        if gloo <= self.peer_timeout_s:
            print(
                f"dapple: warning: HOROVOD_GLOO_TIMEOUT_SECONDS={gloo:g} is not above "
                f"DAPPLE_PEER_TIMEOUT_S={self.peer_timeout_s:g}: Gloo may abort before the "
                f"watchdog can name a missing rank",
                file=sys.stderr,
                flush=True,
            )

    def start(self) -> "Watchdog":
        self._beat()
        self._start_exit_monitor()
        self._thread.start()
        return self

    def stop(self, remove_directory: bool = False) -> None:
        """Stop beating (last state "done"); `remove_directory`: delete the heartbeat folder
        (rank 0 of a job whose folder was temporary; late writes of others are ignored)."""
        with self._lock:
            self._phase, self._since = "done", time.time()
        self._stop.set()
        self._beat()
        self._dismiss_exit_monitor()
        if remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _start_exit_monitor(self) -> None:
        try:  # an end recorded by an earlier job in the same folder is not news
            os.remove(exit_monitor.ended_path(self.directory, self.rank))
        except OSError:
            pass
        setup = {
            "rank": self.rank,
            "size": self.size,
            "directory": self.directory,
            "pid": os.getpid(),
            "started": time.time(),
            "shared": {
                str(k): _abbreviate(self.log.shared_with(k))
                for k in range(self.size)
                if k != self.rank
            },
        }
        # -I keeps the script's folder off sys.path (dapple_tf/profile.py would shadow the
        # standard library's profile module).
        self._monitor = subprocess.Popen(
            [sys.executable, "-I", exit_monitor.__file__], stdin=subprocess.PIPE
        )
        self._monitor.stdin.write((json.dumps(setup) + "\n").encode())
        self._monitor.stdin.flush()
        atexit.register(self._dismiss_exit_monitor)

    def _dismiss_exit_monitor(self) -> None:
        """Tell the exit monitor this rank ends knowingly (it exits without a report)."""
        with self._lock:  # the watchdog thread and atexit may both get here
            monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.stdin.write(b"done\n")
            monitor.stdin.close()
            monitor.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def step_begin(self, step: int) -> None:
        with self._lock:
            self._step, self._phase, self._since = step, "run", time.time()
        self._beat()

    def step_end(self, step: int) -> None:
        with self._lock:
            self._step, self._phase, self._since = step, "idle", time.time()
        self._beat()

    # ---- internals ----
    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank{rank}.json")

    def _beat(self) -> None:
        with self._lock:
            state = {
                "rank": self.rank,
                "pid": os.getpid(),
                "host": self._host,
                "step": self._step,
                "phase": self._phase,
                "since": self._since,
                "time": time.time(),
            }
        tmp = self._path(self.rank) + f".tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self._path(self.rank))
        except OSError:
            pass  # a full or vanished disk must not kill training; peers will see us as stale

    def _read(self, rank: int) -> dict | None:
        try:
            with open(self._path(rank)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _run(self) -> None:
        # Checks run GONE_CHECKS_PER_BEAT times per heartbeat: a peer process gone from this
        # host is named within a fraction of a second, before a launcher that saw it die stops
        # this rank (horovodrun does within about half a second).
        ticks = 0
        while not self._stop.wait(self.interval_s / GONE_CHECKS_PER_BEAT):
            ticks += 1
            if ticks % GONE_CHECKS_PER_BEAT == 0:
                self._beat()
            problem = self.check(time.time())
            if problem:
                print(problem, file=sys.stderr, flush=True)
                exit_monitor.record_end(
                    self.directory, self.rank, os.getpid(), exit_monitor.WATCHDOG, time.time()
                )
                self._dismiss_exit_monitor()
                # Let the other waiting ranks report too: our exit makes Horovod abort them.
                time.sleep(max(2 * self.interval_s, 3.0))
                self._exit(EXIT_PEER_LOST)
                return

    def missing_ranks(self, now: float) -> dict[int, str]:
        """Ranks this rank is waiting for in its current step, with the reason."""
        with self._lock:
            step, phase, since = self._step, self._phase, self._since
        if phase != "run":
            return {}
        waited = now - since
        missing = {}
        for k in range(self.size):
            if k == self.rank:
                continue
            hb = self._read(k)
            if hb is None:
                if waited > self.peer_timeout_s:
                    missing[k] = f"no heartbeat in {self.directory} (not a shared folder?)"
                continue
            age = now - hb["time"]
            gone = hb["host"] == self._host and not _pid_alive(hb["pid"])
            if gone:
                missing[k] = (
                    f"process {hb['pid']} on {hb['host']} is gone (last at step {hb['step']})"
                )
            elif age > self.peer_timeout_s:
                missing[k] = (
                    f"no heartbeat for {age:.1f} s (frozen or unreachable; last at "
                    f"step {hb['step']}, {hb['phase']}) on {hb['host']} pid {hb['pid']}"
                )
            elif (
                waited > self.peer_timeout_s
                and (hb["step"] < step or hb["phase"] != "run")
                and not (hb["step"] > step)
            ):
                missing[k] = (
                    f"alive but has not entered step {step} for {now - hb['since']:.1f} s "
                    f"(at step {hb['step']}, {hb['phase']}) on {hb['host']} pid {hb['pid']}"
                )
        return missing

    def check(self, now: float) -> str | None:
        """The report to print if this rank should stop waiting now, else None."""
        with self._lock:
            step, phase, since = self._step, self._phase, self._since
        if phase != "run":
            return None
        missing = self.missing_ranks(now)
        waited = now - since
        if not missing and waited <= self.step_timeout_s:
            return None
        lines = [
            f"dapple: rank {self.rank}: step {step} has waited {waited:.1f} s for its collectives"
        ]
        if missing:
            for k, why in sorted(missing.items()):
                shared = self.log.shared_with(k)
                lines.append(f"dapple: rank {self.rank}: missing rank {k}: {why}")
                lines.append(
                    f"dapple: rank {self.rank}: collectives rank {self.rank} waits on with "
                    f"rank {k}: {_abbreviate(shared)}"
                )
        else:
            lines.append(
                f"dapple: rank {self.rank}: no rank looks missing, but the step exceeded "
                f"DAPPLE_STEP_TIMEOUT_S={self.step_timeout_s:g}"
            )
        lines.append(
            f"dapple: rank {self.rank}: exiting with status {EXIT_PEER_LOST}; re-run with "
            f"the same model directory to resume from the last checkpoint"
        )
        return "\n".join(lines)


class PeerLostError(RuntimeError):
    """A step's collective failed because another rank is gone (Horovod shut down)."""


def explain_collective_failure(watchdog: "Watchdog", error: Exception, step: int) -> str:
    """The message for a Horovod error inside a step: the collective this rank waited on (the
    failed node) and the ranks that look missing by their heartbeats."""
    op = getattr(getattr(error, "op", None), "name", None) or "(unknown collective)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # A peer process gone from this host is named at once (the launcher may stop this rank
    # within a second); otherwise let a dead or frozen peer's heartbeat go stale first (the
    # other survivors wait here too, so they still beat while we look).
    missing = _peers_missing(watchdog, time.time(), only_gone=True)
    if not missing:
        time.sleep(2.5 * watchdog.interval_s)
        missing = _peers_missing(watchdog, time.time())
    who = (
        "; ".join(f"rank {k}: {why}" for k, why in sorted(missing.items()))
        or "no rank looks missing by its heartbeat (another host, or an error on a peer)"
    )
    return (
        f"dapple: rank {watchdog.rank}: step {step}: collective '{op}' failed: {first_line}\n"
        f"dapple: rank {watchdog.rank}: missing: {who}\n"
        f"dapple: rank {watchdog.rank}: re-run with the same model directory to resume from "
        f"the last checkpoint"
    )


def _peers_missing(watchdog: "Watchdog", now: float, only_gone: bool = False) -> dict[int, str]:
    """Peers whose process is gone from this host, finished, or (unless `only_gone`) silent."""
    missing = {}
    for k in range(watchdog.size):
        if k == watchdog.rank:
            continue
        hb = watchdog._read(k)
        if hb is None:
            continue
        if hb["host"] == watchdog._host and not _pid_alive(hb["pid"]):
            missing[k] = f"process {hb['pid']} is gone (last at step {hb['step']}, {hb['phase']})"
        elif only_gone:
            continue
        elif hb["phase"] == "done":
            missing[k] = f"finished training at step {hb['step']}"
        elif now - hb["time"] > 2 * watchdog.interval_s:
            missing[k] = f"no heartbeat for {now - hb['time']:.1f} s (last at step {hb['step']})"
    return missing


def _abbreviate(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
