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
import itertools
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
              device: str | None = None, layers=None, **plan_options) -> Plan:
    """Profiles `model_fn` and returns `planner.plan`'s best plan for `num_devices` devices.

    `layers`: the layer rule (graph_rewrite/template.py), the same as the trainer's.
    `plan_options` go to `planner.plan` unchanged (e.g. `cost_model`, `device_memory_gb`)."""
    pbs = profile_batch_size or default_profile_batch_size(global_batch_size, num_devices)
    profile = profiler.profile_model(model_fn, feature_spec, pbs, device=device,
                                     batch_fn=batch_fn, layers=layers)
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
def predict_step_s(plan: Plan, profile: Profile, cluster: Cluster) -> float:
    """The "dapple-tf" cost model's step time for a given plan (not necessarily the planner's
    choice). Uses the planner's model directly: it finds the cut states giving the plan's stages."""
    from planner.dapple_cost import DappleModel
    model = DappleModel(profile, cluster, plan.global_batch_size)
    states, last = model.states, len(model.states) - 1
    want = [list(stage.layers) for stage in plan.stages]
    for cuts in itertools.combinations(range(last), plan.num_stages - 1):
        ends = [*cuts, last]
        if states.stage_layers(profile, ends) == want:
            return model.evaluate(ends, [list(st.devices) for st in plan.stages],
                                  plan.micro_batch_size, plan.schedule).step_time_s
    raise ValueError(f"the planner's states of this profile cannot express the stages {want}")


@dataclasses.dataclass(frozen=True)
class PredictionCheck:
    """The planner's predicted step time of a plan and the step time the Trainer measured."""
    model: str
    plan: Plan
    chosen_by_planner: bool
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
        origin = "planner" if self.chosen_by_planner else "given"
        return (f"{self.model:<14} {origin:<7} {p.notation:<5} {p.schedule:<5} "
                f"M={p.num_micro_batches:<2} predicted {self.predicted_s * 1e3:8.2f} ms  measured "
                f"{self.measured_s * 1e3:8.2f} ms  error {self.error:+7.1%}  | one device: predicted "
                f"{self.predicted_single_device_s * 1e3:7.2f} ms measured "
                f"{self.measured_single_device_s * 1e3:7.2f} ms error {self.single_device_error:+7.1%}")


def _median_step_s(trainer, batch, warmup: int, steps: int) -> float:
    try:
        for _ in range(warmup):
            trainer.train_step(batch)
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)
    finally:
        trainer.close()


def check_predictions(spec, num_devices: int, global_batch_size: int, *,
                      cluster: Cluster | None = None, plans: Sequence[Plan] = (),
                      schedule: str | None = None, warmup: int = 2, steps: int = 5,
                      seed: int = 0, **plan_options) -> list[PredictionCheck]:
    """Profiles `spec` (a models.ModelSpec) and plans it for `num_devices` local devices; then,
    for the planner's plan and each plan in `plans`, trains `steps` steps and compares the
    measured median step time with the cost model's prediction (also for one device)."""
    from dapple_tf.trainer import SingleDeviceTrainer, Trainer

    pbs = default_profile_batch_size(global_batch_size, num_devices)
    profile = profiler.profile_model(spec.model_fn, spec.feature_spec, pbs,
                                     batch_fn=spec.synthetic_batch, seed=seed)
    cluster = cluster or local_cluster(num_devices)
    chosen = plan_from_profile(profile, global_batch_size, num_devices, cluster=cluster,
                               schedule=schedule, **plan_options)
    batch = spec.synthetic_batch(global_batch_size, np.random.default_rng(seed))
    single = _median_step_s(SingleDeviceTrainer(spec.model_fn, spec.feature_spec,
                                                spec.default_optimizer, global_batch_size,
                                                seed=seed), batch, warmup, steps)
    checks = []
    for plan in (chosen, *plans):
        measured = _median_step_s(Trainer(spec.model_fn, spec.feature_spec, spec.default_optimizer,
                                          plan, global_batch_size, num_devices=num_devices,
                                          seed=seed), batch, warmup, steps)
        predicted = (float(plan.predicted["step_time_s"]) if plan is chosen
                     else predict_step_s(plan, profile, cluster))
        checks.append(PredictionCheck(f"{spec.name}/{spec.preset}", plan, plan is chosen,
                                      predicted, measured,
                                      float(chosen.predicted["single_device_step_s"]), single))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dapple_tf.auto_plan --compare [--models bert,gnmt] [--devices 2]
    [--global-batch-size 16] [--micro-batch-size 8] [--pipeline 4]`: for each model, plan it for
    this machine's logical CPU devices (measured compute, measured in-process bandwidth), train
    with the planner's plan and with an even pipeline over all devices (`--pipeline M`
    micro-batches, 1f1b), and print predicted against measured step times."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m dapple_tf.auto_plan", description=main.__doc__)
    p.add_argument("--compare", action="store_true", required=True)
    p.add_argument("--models", default="bert,gnmt,xlnet,vgg19,amoebanet")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--schedule", default=None, choices=[None, "gpipe", "1f1b"])
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="fix the planner's micro-batch size (default: the planner chooses)")
    p.add_argument("--pipeline", type=int, default=4, metavar="M",
                   help="also run an even pipeline of M micro-batches (0: do not)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    from dapple_tf import devices
    devices.create_logical_cpus(args.devices)
    import models
    from planner.plan_format import even_plan
    cluster = local_cluster(args.devices)
    print(f"this machine: {args.devices} logical CPU devices, measured in-process p2p bandwidth "
          f"{cluster.intra_host_bandwidth / 1e9:.2f} GB/s", flush=True)
    for name in args.models.split(","):
        spec = models.get_model(name, args.preset)
        extra = []
        if args.pipeline:
            extra.append(even_plan(spec.layer_names, [1] * args.devices, args.global_batch_size,
                                   args.pipeline, "1f1b"))
        for check in check_predictions(spec, args.devices, args.global_batch_size,
                                       cluster=cluster, plans=extra, schedule=args.schedule,
                                       steps=args.steps, micro_batch_size=args.micro_batch_size):
            print(check.describe(), flush=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
