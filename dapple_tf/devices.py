"""Local devices: plan device id -> device name, logical CPU devices, session configuration.

Single process: device id d is `/GPU:d` when the machine has GPUs, else the d-th CPU device of
the session. CPU sessions get their CPU devices from `ConfigProto.device_count`, so a plan on
n CPU "devices" runs wherever n <= the number allowed (`num_devices`, or the logical CPU devices
configured with `create_logical_cpus` / `tf.config.set_logical_device_configuration`).

A rank of a multi-rank run sees only its local GPU (Horovod local rank k: physical GPU k, as
/GPU:0) in every session dapple_tf opens: `new_session` (the one place our sessions are made)
sets `gpu_options.visible_device_list = k`, and `pin_to_local_gpu` (comm.init, right after
Horovod starts) narrows TensorFlow's own visible GPUs for sessions and eager code of the user's
that pass no config. TensorFlow maps a process's GPUs once, at the first session or runtime
start: a session without the pin first would take every GPU of the host, and later pinned
sessions would fail.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from planner.plan_format import Plan

from . import comm

LOCAL_JOB = "/job:localhost/replica:0/task:0"


def device_kind() -> str:
    """'GPU' if this process sees a GPU, else 'CPU'."""
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def pinned_config(
    config: tf.compat.v1.ConfigProto | None = None,
) -> tf.compat.v1.ConfigProto | None:
    """`config` for a session of this process: in a rank of a multi-rank run, a copy whose
    GPUs are only the rank's local GPU (TensorFlow ignores the setting on hosts without GPUs);
    otherwise `config` unchanged (None: TensorFlow's default config)."""
    local_rank = comm.launched_local_rank()
    if local_rank is None:
        return config
    pinned = tf.compat.v1.ConfigProto()
    if config is not None:
        pinned.CopyFrom(config)
    pinned.gpu_options.visible_device_list = str(local_rank)
    return pinned


def new_session(
    graph: tf.Graph | None = None,
    config: tf.compat.v1.ConfigProto | None = None,
    target: str | None = None,
) -> tf.compat.v1.Session:
    """Every session dapple_tf opens is opened here, with `pinned_config(config)`; `target`: a
    TF server's address (a multi-rank trainer's session runs on its rank's server)."""
    return tf.compat.v1.Session(target or "", graph=graph, config=pinned_config(config))


def has_gpus() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))  # lists only: starts no runtime


def pin_to_local_gpu(local_rank: int) -> None:
    """Make physical GPU `local_rank` TensorFlow's only visible GPU (nothing on hosts without
    GPUs). Must run before TensorFlow starts its runtime; afterwards it only checks that the
    runtime already sees exactly that GPU."""
    gpus = tf.config.list_physical_devices("GPU")  # lists only: starts no runtime
    if not gpus:
        return
    if local_rank >= len(gpus):
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this host has "
            f"{len(gpus)} GPUs; launch at most one rank per GPU on each host"
        )
    try:
        tf.config.set_visible_devices(gpus[local_rank], "GPU")
    except RuntimeError:
        if tf.config.get_visible_devices("GPU") != [gpus[local_rank]]:
            raise RuntimeError(
                f"TensorFlow started its GPUs before this rank (local rank {local_rank}) was "
                f"pinned to GPU {local_rank}; create the Trainer (or call dapple_tf.comm.init()) "
                f"before any TensorFlow session, op or device query of the script"
            ) from None


def device_name(device_id: int, kind: str | None = None) -> str:
    kind = kind or device_kind()
    return f"{LOCAL_JOB}/device:{kind}:{int(device_id)}"


def create_logical_cpus(n: int) -> None:
    """Split the CPU into (at least) n logical devices. Must run before TensorFlow initialises
    its runtime; afterwards it only checks that at least n exist. A configuration of n or more
    devices already made (e.g. by a test session) is kept, never shrunk."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu)
    if configured is not None and len(configured) >= n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < n:
            raise RuntimeError(
                f"need {n} logical CPU devices but TensorFlow is already "
                f"initialised with {have}; call dapple_tf.devices."
                f"create_logical_cpus({n}) before any TensorFlow op runs"
            ) from None


def available_devices(num_devices: int | None = None) -> tuple[str, int]:
    """(kind, count) of the stage devices this process may use."""
    kind = device_kind()
    if kind == "GPU":
        have = len(tf.config.list_physical_devices("GPU"))
        return kind, min(have, num_devices) if num_devices else have
    if num_devices:
        return kind, int(num_devices)
    return kind, len(tf.config.list_logical_devices("CPU"))


def check_plan_devices(plan: Plan, num_devices: int | None = None) -> str:
    """Raise PlanError (saying how many devices the plan needs) if too few exist; return kind."""
    kind, have = available_devices(num_devices)
    what = (
        "local GPUs"
        if kind == "GPU"
        else "logical CPU devices (pass num_devices= to Trainer, or call "
        "dapple_tf.devices.create_logical_cpus(n) before TensorFlow starts)"
    )
    plan.check_devices(have, what)
    return kind


def session_config(
    kind: str,
    num_devices: int,
    inter_op_threads: int | None = None,
    optimize_graph: bool = True,
    fold_constants: bool = True,
):
    """ConfigProto for a session whose graph uses device ids 0..num_devices-1.
    optimize_graph=False turns Grappler off: the first step of a large pipelined graph starts
    several times faster (tests), steady-state steps may be slower. fold_constants=False turns
    off only Grappler's constant folding (pipelined graphs: see below)."""
    config = tf.compat.v1.ConfigProto()
    if kind == "CPU":
        config.device_count["CPU"] = max(1, int(num_devices))
        config.allow_soft_placement = False
    else:
        config.gpu_options.allow_growth = True
        config.allow_soft_placement = True  # ops without GPU kernels (e.g. int32 shape math)
    # Keep the explicit boundary ops (IdentityN send/recv, action start/end) that carry the
    # schedule's control dependencies: Grappler's dependency optimizer and model pruner would
    # fold them away (the order would survive, the ops that show it in a trace would not).
    # Each clone is a call of its stage's function (graph_rewrite/functions.py); inlining the
    # calls (also without Grappler) runs their ops as `<clone>/<op>` on the clone's device.
    config.graph_options.optimizer_options.do_function_inlining = True
    rewrite = config.graph_options.rewrite_options
    rewrite.dependency_optimization = rewriter_config_pb2.RewriterConfig.OFF
    rewrite.disable_model_pruning = True
    # Without model pruning, Grappler sees the whole graph for every new fetch (initializer,
    # set_weights, get_weights, the step), and constant folding over a pipelined graph took
    # 20-30 s per fetch at M = 8 (bench/README.md, "Micro-batching on one device") while the
    # stage functions, built with static shapes, leave it nothing that changes a step's time.
    if not fold_constants:
        rewrite.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    if not optimize_graph:
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        config.graph_options.optimizer_options.opt_level = tf.compat.v1.OptimizerOptions.L0
    if inter_op_threads:
        config.inter_op_parallelism_threads = int(inter_op_threads)
    return config
