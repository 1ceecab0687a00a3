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

import dataclasses
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


# ---- the planner's prediction against a measured step -----------------------------------------
@dataclasses.dataclass(frozen=True)
class PredictionCheck:
    """The planner's predicted step time of its plan and the step time the Trainer measured."""
    model: str
    plan: Plan
    predicted_s: float
    measured_s: float
    predicted_single_device_s: float
    measured_single_device_s: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def single_device_error(self) -> float:
        return (self.predicted_single_device_s - self.measured_single_device_s) / \
            self.measured_single_device_s

    def describe(self) -> str:
        p = self.plan
        return (f"{self.model:<10} {p.notation:<8} {p.schedule:<6} M={p.num_micro_batches:<3} "
                f"predicted {self.predicted_s * 1e3:9.2f} ms  measured {self.measured_s * 1e3:9.2f} ms  "
                f"error {self.error:+7.1%}   single device: predicted "
                f"{self.predicted_single_device_s * 1e3:8.2f} ms measured "
                f"{self.measured_single_device_s * 1e3:8.2f} ms error {self.single_device_error:+7.1%}")


def _median_step_s(trainer, batch, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        trainer.train_step(batch)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def check_prediction(spec, num_devices: int, global_batch_size: int, *, cluster: Cluster | None = None,
                     schedule: str | None = None, warmup: int = 2, steps: int = 5,
                     seed: int = 0, **plan_options) -> PredictionCheck:
    """Profiles `spec` (a models.ModelSpec), plans it for `num_devices` local devices, trains
    `steps` steps with that plan and on one device, and compares with the planner's numbers."""
    from dapple_tf.trainer import SingleDeviceTrainer, Trainer

    pbs = default_profile_batch_size(global_batch_size, num_devices)
    profile = profiler.profile_model(spec.model_fn, spec.feature_spec, pbs,
                                     batch_fn=spec.synthetic_batch, seed=seed)
    cluster = cluster or local_cluster(num_devices)
    plan = plan_from_profile(profile, global_batch_size, num_devices, cluster=cluster,
                             schedule=schedule, **plan_options)
    batch = spec.synthetic_batch(global_batch_size, np.random.default_rng(seed))
    trainer = Trainer(spec.model_fn, spec.feature_spec, spec.default_optimizer, plan,
                      global_batch_size, num_devices=num_devices, seed=seed)
    try:
        measured = _median_step_s(trainer, batch, warmup, steps)
    finally:
        trainer.close()
    single = SingleDeviceTrainer(spec.model_fn, spec.feature_spec, spec.default_optimizer,
                                 global_batch_size, seed=seed)
    try:
        measured_single = _median_step_s(single, batch, warmup, steps)
    finally:
        single.close()
    return PredictionCheck(f"{spec.name}/{spec.preset}", plan, float(plan.predicted["step_time_s"]),
                           measured, float(plan.predicted.get("single_device_step_s", float("nan"))),
                           measured_single)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dapple_tf.auto_plan --compare [--models bert,gnmt] [--devices 2]
    [--global-batch-size 16] [--schedule 1f1b]`: plan each model for this machine's logical CPU
    devices (measured compute and in-process bandwidth), train with the plan, and print the
    planner's predicted step time against the measured one."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m dapple_tf.auto_plan", description=main.__doc__)
    p.add_argument("--compare", action="store_true", required=True)
    p.add_argument("--models", default="bert,gnmt,xlnet,vgg19,amoebanet")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--schedule", default=None, choices=[None, "gpipe", "1f1b"])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    from dapple_tf import devices
    devices.create_logical_cpus(args.devices)
    import models
    cluster = local_cluster(args.devices)
    print(f"this machine: {args.devices} logical CPU devices, measured in-process p2p bandwidth "
          f"{cluster.intra_host_bandwidth / 1e9:.2f} GB/s")
    for name in args.models.split(","):
        spec = models.get_model(name, args.preset)
        check = check_prediction(spec, args.devices, args.global_batch_size, cluster=cluster,
                                 schedule=args.schedule, steps=args.steps)
        print(check.describe(), flush=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
