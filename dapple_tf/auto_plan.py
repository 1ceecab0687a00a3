"""`plan="auto"`: profile the model's template, then ask the planner for the best plan.

    plan = auto_plan(model_fn, feature_spec, global_batch_size=64, num_devices=4)

By default (cost model "runtime", `planner.runtime_cost`) the template is profiled on one
device at two batch sizes (`runtime_profile_batch_sizes`), each layer's time fitted as fixed +
per-row, with the bytes kept for the backward pass and the optimizer's slots and update time.
`cluster` describes the devices: a `planner.cluster.Cluster`, DAPPLE `seps` ([8, 16] = 2 hosts of
8), or None: then GPUs are one host of `num_devices`, and logical CPU devices are this machine
as `runtime_cluster` measures it (one processor whose cores all devices share, transfer latency,
summing bandwidth). With `cost_model="dapple-tf"` the template is profiled once at
`profile_batch_size` rows (default: the per-device share of the global batch) and the planner
scales the costs linearly. `local_cluster` measures this machine's in-process bandwidth.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from dapple_tf import comm, profiler
from dapple_tf.devices import new_session
from planner.cluster import Cluster
from planner.plan_format import Plan
from planner.profile import Profile
from planner.schedules import EXECUTABLE

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
        raise ValueError(
            f"the cluster has {result.num_devices} devices (seps {list(result.seps)}) "
            f"but the run has {num_devices}; describe the devices this run uses"
        )
    return result


def runtime_profile_batch_sizes(global_batch_size: int) -> tuple[int, int]:
    """The two batch sizes the runtime profile fits its fixed + per-row costs over: an eighth
    of the global batch and the whole of it (micro-batches of the plans lie in between)."""
    return max(1, global_batch_size // 8), max(2, global_batch_size)


def profile_for_plans(
    model_fn,
    feature_spec,
    global_batch_size: int,
    num_devices: int,
    *,
    cost_model: str = "runtime",
    profile_batch_size: int | None = None,
    optimizer_fn: Callable | None = None,
    batch_fn: Callable[[int, np.random.Generator], dict] | None = None,
    device: str | None = None,
    seed: int = 0,
    layers=None,
) -> Profile:
    """The profile `cost_model` needs, measured under the runtime's session options, with the
    layer rule `layers`."""
    if cost_model != "runtime":
        pbs = profile_batch_size or default_profile_batch_size(global_batch_size, num_devices)
        return profiler.profile_model(
            model_fn, feature_spec, pbs, device=device, batch_fn=batch_fn, seed=seed, layers=layers
        )
    from dapple_tf import devices
    from dapple_tf.runner import use_grappler

    kind = devices.device_kind()
    return profiler.profile_for_runtime(
        model_fn,
        feature_spec,
        runtime_profile_batch_sizes(global_batch_size),
        optimizer_fn=optimizer_fn,
        device=device,
        seed=seed,
        batch_fn=batch_fn,
        session_config=devices.session_config(kind, 1, optimize_graph=use_grappler()),
        layers=layers,
    )


def auto_plan(
    model_fn,
    feature_spec,
    global_batch_size: int,
    num_devices: int,
    *,
    cluster: Cluster | Sequence[int] | str | None = None,
    schedule: str | None = None,
    profile_batch_size: int | None = None,
    batch_fn: Callable[[int, np.random.Generator], dict] | None = None,
    device: str | None = None,
    optimizer_fn: Callable | None = None,
    cost_model: str = "runtime",
    layers=None,
    **plan_options,
) -> Plan:
    """Profiles `model_fn` and returns `planner.plan`'s best plan for `num_devices` devices.

    `optimizer_fn` (the one training will use) lets the profile measure its slots and update;
    `layers`: the layer rule (graph_rewrite/template.py), the same as the trainer's;
    `plan_options` go to `planner.plan` unchanged (e.g. `device_memory_gb`)."""
    profile = profile_for_plans(
        model_fn,
        feature_spec,
        global_batch_size,
        num_devices,
        cost_model=cost_model,
        profile_batch_size=profile_batch_size,
        optimizer_fn=optimizer_fn,
        batch_fn=batch_fn,
        device=device,
        layers=layers,
    )
    if cluster is None and cost_model == "runtime":
        cluster = runtime_cluster(num_devices)
    if cost_model == "runtime" and comm.launched_ranks() > 1:
        plan_options.setdefault("use_all_devices", True)  # every rank must hold a slot
    result = plan_from_profile(
        profile,
        global_batch_size,
        num_devices,
        cluster=cluster,
        schedule=schedule,
        cost_model=cost_model,
        **plan_options,
    )
    result.predicted["profile"] = profile.to_dict()
    result.predicted["cluster"] = as_cluster(cluster, num_devices).to_dict()
    return result


def plan_from_profile(
    profile: Profile,
    global_batch_size: int,
    num_devices: int,
    *,
    cluster: Cluster | Sequence[int] | str | None = None,
    schedule: str | None = None,
    model_layers: Sequence[str] | None = None,
    **plan_options,
) -> Plan:
    """`planner.plan` for `num_devices`; with `model_layers`, a profile of other layers than
    the model's is refused (ProfileError naming them)."""
    from planner.api import plan

    if model_layers is not None:
        profile.check_layers(model_layers)
    return plan(
        profile,
        as_cluster(cluster, num_devices),
        global_batch_size,
        schedule=schedule,
        **plan_options,
    )


# ---- this machine as a cluster -----------------------------------------------------------------
def measure_p2p_bandwidth(
    src: str,
    dst: str,
    nbytes: int = 64 << 20,
    repeats: int = 21,
    session_config: v1.ConfigProto | None = None,
) -> float:
    """Bytes per second moved from device `src` to device `dst` in this process.

    Times a reduction of an `nbytes` tensor made on `src` when it runs on `dst` against the same
    reduction on `src`; the difference is the transfer. Devices that share memory (logical CPU
    devices) may not copy at all: the result is then capped at `nbytes` per microsecond."""
    graph = tf.Graph()
    n = nbytes // 4
    with graph.as_default():
        with tf.device(src):
            data = v1.get_variable(
                "p2p_data", [n], initializer=v1.ones_initializer(), use_resource=True
            )
            value = data.read_value() * 1.0001
            local = tf.reduce_sum(value)
        with tf.device(dst):
            remote = tf.reduce_sum(tf.identity(value))
        init = v1.global_variables_initializer()
    config = session_config or _session_config(src, dst)
    with new_session(graph, config) as session:
        session.run(init)
        extra = _median_extra_s(session, remote, local, repeats)
    return nbytes / max(extra, 1e-6)


def _median_extra_s(session, fetch, baseline, repeats: int) -> float:
    """Median over `repeats` of (time of running `fetch`) - (time of running `baseline`), after
    two warm-up runs of both. The two alternate so that load from other processes hits both
    alike."""

    def run_s(what):
        begin = time.perf_counter()
        session.run(what)
        return time.perf_counter() - begin

    for _ in range(2):
        session.run([fetch, baseline])
    return statistics.median(run_s(fetch) - run_s(baseline) for _ in range(repeats))


def _session_config(*devices: str) -> v1.ConfigProto:
    # CPU sessions see as many CPU devices as device_count allows (one by default).
    config = v1.ConfigProto(allow_soft_placement=False)
    cpus = [tf.DeviceSpec.from_string(d) for d in devices]
    highest = max(
        (d.device_index or 0 for d in cpus if (d.device_type or "").upper() == "CPU"), default=None
    )
    if highest is not None:
        config.device_count["CPU"] = highest + 1
    return config


def measure_transfer_latency_s(src: str, dst: str, repeats: int = 51) -> float:
    """Seconds one small tensor takes to cross from `src` to `dst` in this process, beyond the
    same work on `src` (median of alternating runs)."""
    nbytes = 4
    return nbytes / measure_p2p_bandwidth(src, dst, nbytes=nbytes, repeats=repeats)


def measure_accumulate_bandwidth(
    device: str = "/CPU:0", nbytes: int = 16 << 20, repeats: int = 11
) -> float:
    """Bytes per second of `a + b` on `device` (the running gradient sum of the runtime)."""
    graph = tf.Graph()
    n = nbytes // 4
    with graph.as_default(), tf.device(device):
        a = v1.get_variable("acc_a", [n], initializer=v1.ones_initializer(), use_resource=True)
        b = v1.get_variable("acc_b", [n], initializer=v1.ones_initializer(), use_resource=True)
        total = tf.reduce_sum(a.read_value() + b.read_value())
        reads = tf.reduce_sum(a.read_value()) + tf.reduce_sum(b.read_value())
        init = v1.global_variables_initializer()
    with new_session(graph, _session_config(device)) as session:
        session.run(init)
        extra = _median_extra_s(session, total, reads, repeats)
    return nbytes / max(extra, nbytes / 1e12)


def runtime_cluster(num_devices: int) -> Cluster:
    """This run's devices as the "runtime" cost model sees them. Under Horovod: one device per
    rank, hosts of `local_size` ranks (Horovod's topology); CPU-only ranks of one host share its
    cores. In one process: GPUs are one host of independent devices with the default
    bandwidths; logical CPU devices share one processor (all of this machine's cores), with
    measured transfer latency and summing bandwidth."""
    from dapple_tf import devices

    if comm.launched_ranks() > 1:
        info = comm.init()
        if info.size != num_devices or info.size % info.local_size:
            raise ValueError(
                f"{info.size} Horovod ranks with {info.local_size} per host do not "
                f"make {num_devices} devices in equal hosts; give --cluster"
            )
        shared = info.local_size if devices.device_kind() == "CPU" else 1
        return Cluster.uniform(
            info.size // info.local_size, info.local_size, devices_per_processor=shared
        )
    if devices.device_kind() != "CPU":
        return Cluster.from_seps([num_devices])
    latency = measure_transfer_latency_s("/CPU:0", "/CPU:1") if num_devices > 1 else 0.0
    return Cluster.from_seps(
        [num_devices],
        devices_per_processor=num_devices,
        transfer_latency_s=latency,
        accumulate_bandwidth=measure_accumulate_bandwidth(),
    )


def local_cluster(num_devices: int, device_type: str = "CPU", **overrides) -> Cluster:
    """One host of `num_devices` devices `/<device_type>:k` whose p2p bandwidth is measured
    between devices 0 and 1 of this process (fields in `overrides` win)."""
    fields = dict(overrides)
    if num_devices > 1 and "intra_host_bandwidth" not in fields:
        fields["intra_host_bandwidth"] = measure_p2p_bandwidth(
            f"/{device_type}:0", f"/{device_type}:1"
        )
    return Cluster.from_seps([num_devices], **fields)


# ---- the planner's prediction against a measured step -----------------------------------------
def predict_step_s(
    plan: Plan, profile: Profile, cluster: Cluster, cost_model: str = "dapple-tf"
) -> float:
    """A cost model's step time for a given plan (not necessarily the planner's choice)."""
    return predict(plan, profile, cluster, cost_model).step_time_s


def predict(plan: Plan, profile: Profile, cluster: Cluster, cost_model: str = "runtime"):
    """A cost model's evaluation (`DappleEval`: step time, per-stage peak memory, ...) of a
    given plan. Uses the planner's model directly: it finds the cut states giving the stages."""
    from planner.dapple_cost import DappleModel
    from planner.runtime_cost import RuntimeModel

    if cost_model not in ("dapple-tf", "runtime"):
        raise ValueError(f"cost_model must be 'dapple-tf' or 'runtime', got {cost_model!r}")
    model = (RuntimeModel if cost_model == "runtime" else DappleModel)(
        profile, cluster, plan.global_batch_size
    )
    states, last = model.states, len(model.states) - 1
    want = [list(stage.layers) for stage in plan.stages]
    for cuts in itertools.combinations(range(last), plan.num_stages - 1):
        ends = [*cuts, last]
        if states.stage_layers(profile, ends) == want:
            return model.evaluate(
                ends,
                [list(st.devices) for st in plan.stages],
                plan.micro_batch_size,
                plan.schedule,
                device_memory=float("inf"),
            )
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
        return (
            self.predicted_single_device_s - self.measured_single_device_s
        ) / self.measured_single_device_s

    def describe(self) -> str:
        p = self.plan
        origin = "planner" if self.chosen_by_planner else "given"
        return (
            f"{self.model:<14} {origin:<7} {p.notation:<5} {p.schedule:<5} "
            f"M={p.num_micro_batches:<2} predicted {self.predicted_s * 1e3:8.2f} ms  measured "
            f"{self.measured_s * 1e3:8.2f} ms  error {self.error:+7.1%}  | one device: predicted "
            f"{self.predicted_single_device_s * 1e3:7.2f} ms measured "
            f"{self.measured_single_device_s * 1e3:7.2f} ms error {self.single_device_error:+7.1%}"
        )


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


def check_predictions(
    spec,
    num_devices: int,
    global_batch_size: int,
    *,
    cluster: Cluster | None = None,
    plans: Sequence[Plan] = (),
    schedule: str | None = None,
    warmup: int = 2,
    steps: int = 5,
    seed: int = 0,
    **plan_options,
) -> list[PredictionCheck]:
    """Profiles `spec` (a models.ModelSpec) and plans it for `num_devices` local devices; then,
    for the planner's plan and each plan in `plans`, trains `steps` steps and compares the
    measured median step time with the cost model's prediction (also for one device)."""
    from dapple_tf.trainer import SingleDeviceTrainer, Trainer

    pbs = default_profile_batch_size(global_batch_size, num_devices)
    profile = profiler.profile_model(
        spec.model_fn, spec.feature_spec, pbs, batch_fn=spec.synthetic_batch, seed=seed
    )
    cluster = cluster or local_cluster(num_devices)
    chosen = plan_from_profile(
        profile, global_batch_size, num_devices, cluster=cluster, schedule=schedule, **plan_options
    )
    batch = spec.synthetic_batch(global_batch_size, np.random.default_rng(seed))
    single = _median_step_s(
        SingleDeviceTrainer(
            spec.model_fn, spec.feature_spec, spec.default_optimizer, global_batch_size, seed=seed
        ),
        batch,
        warmup,
        steps,
    )
    checks = []
    for plan in (chosen, *plans):
        measured = _median_step_s(
            Trainer(
                spec.model_fn,
                spec.feature_spec,
                spec.default_optimizer,
                plan,
                global_batch_size,
                num_devices=num_devices,
                seed=seed,
            ),
            batch,
            warmup,
            steps,
        )
        predicted = (
            float(plan.predicted["step_time_s"])
            if plan is chosen
            else predict_step_s(plan, profile, cluster)
        )
        checks.append(
            PredictionCheck(
                f"{spec.name}/{spec.preset}",
                plan,
                plan is chosen,
                predicted,
                measured,
                float(chosen.predicted["single_device_step_s"]),
                single,
            )
        )
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
    p.add_argument("--schedule", default=None, choices=[None, *EXECUTABLE])
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="fix the planner's micro-batch size (default: the planner chooses)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=4,
        metavar="M",
        help="also run an even pipeline of M micro-batches (0: do not)",
    )
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    from dapple_tf import devices

    devices.create_logical_cpus(args.devices)
    import models
    from planner.plan_format import even_plan

    cluster = local_cluster(args.devices)
    print(
        f"this machine: {args.devices} logical CPU devices, measured in-process p2p bandwidth "
        f"{cluster.intra_host_bandwidth / 1e9:.2f} GB/s",
        flush=True,
    )
    for name in args.models.split(","):
        spec = models.get_model(name, args.preset)
        extra = []
        if args.pipeline:
            extra.append(
                even_plan(
                    spec.layer_names,
                    [1] * args.devices,
                    args.global_batch_size,
                    args.pipeline,
                    "1f1b",
                )
            )
        for check in check_predictions(
            spec,
            args.devices,
            args.global_batch_size,
            cluster=cluster,
            plans=extra,
            schedule=args.schedule,
            steps=args.steps,
            micro_batch_size=args.micro_batch_size,
        ):
            print(check.describe(), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
