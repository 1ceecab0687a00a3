"""`plan="auto"`: profile the model's template, then ask the planner for the best plan.

    plan = auto_plan(model_fn, feature_spec, global_batch_size=64, num_devices=4)

The template is profiled on one device at `profile_batch_size` rows (default: the per-device
share of the global batch, the size a micro-batch on one device typically has); the planner
(`planner.plan`) scales the measured costs to the batch sizes it considers. `cluster` describes
the devices: a `planner.cluster.Cluster`, DAPPLE `seps` ([8, 16] = 2 hosts of 8), or None for
one host of `num_devices` with the planner's default bandwidths. `local_cluster` measures this
machine's in-process transfer bandwidth instead (used to check the planner's predictions on
logical CPU devices).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from dapple_tf import profiler
from planner.cluster import Cluster
from planner.plan_format import Plan
from planner.profile import Profile

v1 = tf.compat.v1


def default_profile_batch_size(global_batch_size: int, num_devices: int) -> int:
    """Rows per device when the global batch is spread over all devices (at least 1)."""
    return max(1, global_batch_size // max(1, num_devices))


def as_cluster(cluster: Cluster | Sequence[int] | str | None, num_devices: int) -> Cluster:
    """A Cluster of exactly `num_devices` devices from what the caller gave."""
    if cluster is None:
        result = Cluster.from_seps([num_devices])
    elif isinstance(cluster, Cluster):
        result = cluster
    else:
        result = Cluster.from_seps(cluster)
    if result.num_devices != num_devices:
        raise ValueError(f"the cluster has {result.num_devices} devices (seps {list(result.seps)}) "
                         f"but the run has {num_devices}; describe the devices this run uses")
    return result


def auto_plan(model_fn, feature_spec, global_batch_size: int, num_devices: int, *,
              cluster: Cluster | Sequence[int] | str | None = None, schedule: str | None = None,
              profile_batch_size: int | None = None,
              batch_fn: Callable[[int, np.random.Generator], dict] | None = None,
              device: str | None = None, **plan_options) -> Plan:
    """Profiles `model_fn` and returns `planner.plan`'s best plan for `num_devices` devices.

    `plan_options` go to `planner.plan` unchanged (e.g. `cost_model`, `device_memory_gb`)."""
    pbs = profile_batch_size or default_profile_batch_size(global_batch_size, num_devices)
    profile = profiler.profile_model(model_fn, feature_spec, pbs, device=device,
                                     batch_fn=batch_fn)
    return plan_from_profile(profile, global_batch_size, num_devices, cluster=cluster,
                             schedule=schedule, **plan_options)


def plan_from_profile(profile: Profile, global_batch_size: int, num_devices: int, *,
                      cluster: Cluster | Sequence[int] | str | None = None,
                      schedule: str | None = None, **plan_options) -> Plan:
    from planner.api import plan
    return plan(profile, as_cluster(cluster, num_devices), global_batch_size, schedule=schedule,
                **plan_options)


# ---- this machine as a cluster -----------------------------------------------------------------
def measure_p2p_bandwidth(src: str, dst: str, nbytes: int = 64 << 20, repeats: int = 21,
                          session_config: v1.ConfigProto | None = None) -> float:
    """Bytes per second moved from device `src` to device `dst` in this process.

    Times a reduction of an `nbytes` tensor made on `src` when it runs on `dst` against the same
    reduction on `src`; the difference is the transfer. Devices that share memory (logical CPU
    devices) may not copy at all: the result is then capped at `nbytes` per microsecond."""
    graph = tf.Graph()
    n = nbytes // 4
    with graph.as_default():
        with tf.device(src):
            data = v1.get_variable("p2p_data", [n], initializer=v1.ones_initializer(),
                                   use_resource=True)
            value = data.read_value() * 1.0001
            local = tf.reduce_sum(value)
        with tf.device(dst):
            remote = tf.reduce_sum(tf.identity(value))
        init = v1.global_variables_initializer()
    config = session_config or _session_config(src, dst)
    with v1.Session(graph=graph, config=config) as session:
        session.run(init)

        def run_s(fetch):
            begin = time.perf_counter()
            session.run(fetch)
            return time.perf_counter() - begin

        for _ in range(2):
            session.run([local, remote])
        # Alternate the two so that load from other processes hits both alike.
        extra = statistics.median(run_s(remote) - run_s(local) for _ in range(repeats))
    return nbytes / max(extra, 1e-6)


def _session_config(*devices: str) -> v1.ConfigProto:
    # CPU sessions see as many CPU devices as device_count allows (one by default).
    config = v1.ConfigProto(allow_soft_placement=False)
    cpus = [tf.DeviceSpec.from_string(d) for d in devices]
    highest = max((d.device_index or 0 for d in cpus if (d.device_type or "").upper() == "CPU"),
                  default=None)
    if highest is not None:
        config.device_count["CPU"] = highest + 1
    return config


def local_cluster(num_devices: int, device_type: str = "CPU", **overrides) -> Cluster:
    """One host of `num_devices` devices `/<device_type>:k` whose p2p bandwidth is measured
    between devices 0 and 1 of this process (fields in `overrides` win)."""
    fields = dict(overrides)
    if num_devices > 1 and "intra_host_bandwidth" not in fields:
        fields["intra_host_bandwidth"] = measure_p2p_bandwidth(f"/{device_type}:0",
                                                               f"/{device_type}:1")
    return Cluster.from_seps([num_devices], **fields)
