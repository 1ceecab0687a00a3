"""Horovod for a multi-rank job (one rank per device, plan device id d = rank d): starting it
with our settings (`init`), what the launcher says before it starts (`launched_ranks`,
`launched_local_rank`), Python objects exchanged over all ranks (`allgather_objects`,
`broadcast_object`, `share_plan`), and the two rules for every graph that holds Horovod ops
(`session_config`, `named`). Horovod is imported on first use (`horovod`): single-process
users need no Horovod.

The rest of the multi-rank communication, one module per job: process_sets.py (the process
sets of a plan), boundary_exchange.py (rows of boundary tensors between stage replicas),
gradient_reduction.py (gradient sums, variable broadcasts, the step's last collective) and
rank_failures.py (heartbeats, and a bounded wait for a lost rank).

Horovod 0.28.1 + Gloo facts this module is built around (measured, see tests/multirank/):
  * a Horovod collective is keyed by its TF node name: both ends must create the same name,
    so we create collectives under absolute name scopes and check the name we got (`named`);
  * Horovod's TF ops are not marked stateful: Grappler would drop, pre-run or merge them
    (see session_config).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from planner.plan_format import Plan, PlanError

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
    hvd = horovod()
    return hvd.local_rank() if hvd.is_initialized() else None


def horovod():
    """The `horovod.tensorflow` module, imported on first use (single-process users need no
    Horovod)."""
    import horovod.tensorflow as hvd

    return hvd


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
    hvd = horovod()
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

    hvd = horovod()
    with tf.Graph().as_default(), devices.new_session() as session:
        return hvd.allgather_object(obj, session=session, name=name)


def broadcast_object(obj, name: str, root_rank: int = 0):
    import tensorflow as tf
    from . import devices

    hvd = horovod()
    with tf.Graph().as_default(), devices.new_session() as session:
        return hvd.broadcast_object(obj, root_rank=root_rank, session=session, name=name)


def share_plan(plan_on_rank0: Callable[[], Plan]) -> Plan:
    """Rank 0 computes or loads the plan (`plan_on_rank0` runs only there); every rank returns
    the same Plan. An error on rank 0 is raised on every rank, so no rank is left waiting."""
    hvd = horovod()
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


def named(make: Callable[[str], object], full_name: str):
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
