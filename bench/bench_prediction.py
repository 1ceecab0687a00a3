"""Predicted against measured step time and peak activation memory, for the planner's auto plan
and two alternatives, on this machine's logical CPU devices (issue #14).

    python bench/bench_prediction.py [--models vgg19,amoebanet,bert,gnmt,xlnet,bert-mid]
        [--devices 4] [--global-batch-size 16] [--rounds 12]

Per model: the runtime profile (`dapple_tf.auto_plan.profile_for_plans`: two batch sizes,
fixed + per-row fit, saved bytes, the model's default optimizer's slots and update), this
machine as `runtime_cluster` measures it, and the "runtime" cost model's plan ("auto"). The
alternatives: one device with one micro-batch ("one"), and the best predicted plan of another
shape among DP2, DP4 (one micro-batch) and even 2- and 4-stage pipelines ("other"). All three
trainers are built first; then, `--rounds` times, each in turn runs one untimed step (each
session has its own thread pools, which must wake up) and two timed ones, so that load from
other processes hits them alike; the figure is the median of the 2 x `--rounds` timed steps.
Peak memory: the largest per-stage peak of live activation memory in one traced step
(allocator records of the stage's clone ops, `dapple_tf.memory`: saved activations, temporaries
and each micro-batch's gradients until they are added to the running sum) against the model's
stage memory less the weights and optimizer slots (which no clone op allocates). "calibrated": the
prediction times the one-device row's measured / predicted ratio, which is what `--calibrate`
does with a one-stage plan; on a shared machine it removes the load that differed between the
profiling and the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# The mid-size preset: BERT with 4 layers of width 128 over 64 tokens (tiny: 2 x 32 over 16).
MID_SIZE = {
    "bert-mid": (
        "bert",
        dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, seq_length=64),
    )
}


def model_spec(name: str):
    import models

    if name in MID_SIZE:
        base, overrides = MID_SIZE[name]
        spec = models.get_model(base, "tiny", **overrides)
        return spec, name
    return models.get_model(name, "tiny"), f"{name}/tiny"


def alternatives(layers, gbs: int, num_devices: int):
    from planner.plan_format import even_plan

    shapes = [
        ([1], 1),
        ([2], 1),
        ([4], 1),
        ([1, 1], 2),
        ([1, 1], 4),
        ([2, 2], 2),
        ([1, 1, 1, 1], 4),
        ([1, 1, 1, 1], 8),
    ]
    return [
        even_plan(layers, reps, gbs, m, "1f1b")
        for reps, m in shapes
        if sum(reps) <= num_devices
        and len(reps) <= len(layers)
        and gbs % m == 0
        and (gbs // m) % max(reps) == 0
    ]


def activation_bytes_predicted(plan, profile, evaluation) -> float:
    """The model's largest per-stage peak less the weights and optimizer slots."""
    cost = {l.name: l for l in profile.layers}
    peaks = []
    for s, stage in enumerate(plan.stages):
        params = sum(cost[n].parameter_bytes for n in stage.layers)
        slots = sum(cost[n].optimizer_slot_bytes or 0.0 for n in stage.layers)
        peaks.append(evaluation.peak_memory_bytes[s] - params - slots)
    return max(peaks)


def activation_bytes_measured(trainer, batch) -> float:
    from dapple_tf.memory import peak_live_bytes, stage_prefix
    from graph_rewrite.place import Slot

    _, metadata = trainer.traced_step(batch)
    return max(
        peak_live_bytes(metadata, trainer.rewritten.device_of_slot[Slot(k, 0)], stage_prefix(k))
        for k in range(trainer.plan.num_stages)
    )


def bench_model(name: str, num_devices: int, gbs: int, rounds: int, cluster) -> list[str]:
    from dapple_tf import auto_plan as ap
    from dapple_tf.runner import use_grappler
    from dapple_tf.trainer import Trainer
    import planner

    spec, label = model_spec(name)
    begin = time.perf_counter()
    profile = ap.profile_for_plans(
        spec.model_fn,
        spec.feature_spec,
        gbs,
        num_devices,
        optimizer_fn=spec.default_optimizer,
        batch_fn=spec.synthetic_batch,
    )
    profiled_s = time.perf_counter() - begin
    chosen = planner.plan(profile, cluster, gbs, cost_model="runtime")
    one, *others = alternatives(profile.layer_names, gbs, num_devices)
    predicted = {id(p): ap.predict(p, profile, cluster) for p in [one, *others]}
    others = [p for p in others if p.notation != chosen.notation]
    other = min(others, key=lambda p: predicted[id(p)].step_time_s)
    rows = [
        ("auto", chosen, ap.predict(chosen, profile, cluster)),
        ("one", one, predicted[id(one)]),
        ("other", other, predicted[id(other)]),
    ]
    batch = spec.synthetic_batch(gbs, np.random.default_rng(0))
    trainers = [
        Trainer(
            spec.model_fn,
            spec.feature_spec,
            spec.default_optimizer,
            plan,
            gbs,
            num_devices=num_devices,
            seed=0,
            optimize_graph=use_grappler(),
        )
        for _, plan, _ in rows
    ]
    times = [[] for _ in trainers]
    try:
        for t in trainers:
            for _ in range(3):
                t.train_step(batch)
        for _ in range(rounds):
            for k, t in enumerate(trainers):
                t.train_step(batch)  # untimed: wakes this session's thread pools
                for _ in range(2):
                    start = time.perf_counter()
                    t.train_step(batch)
                    times[k].append(time.perf_counter() - start)
        memory = [activation_bytes_measured(t, batch) for t in trainers]
    finally:
        for t in trainers:
            t.close()
    measured = [statistics.median(ts) for ts in times]
    best_alternative = min(measured[1:])
    # what --calibrate does: one factor, measured / predicted, here from the one-device row
    factor = measured[1] / rows[1][2].step_time_s
    lines = []
    for (kind, plan, ev), step, mem in zip(rows, measured, memory):
        pred_mem = activation_bytes_predicted(plan, profile, ev)
        calibrated = ev.step_time_s * factor
        lines.append(
            f"| {label} | {kind} | {plan.notation} M={plan.num_micro_batches} | "
            f"{ev.step_time_s * 1e3:.2f} | {step * 1e3:.2f} | "
            f"{(ev.step_time_s - step) / step:+.0%} | {calibrated * 1e3:.2f} | "
            f"{(calibrated - step) / step:+.0%} | {pred_mem / 2**20:.3f} | "
            f"{mem / 2**20:.3f} | {(pred_mem - mem) / mem if mem else float('nan'):+.0%} |"
        )
    lines.append(
        f"| {label} | auto / best alternative, measured: "
        f"{measured[0] / best_alternative:.2f} | | | | | | | | | "
        f"(profiled in {profiled_s:.0f} s) |"
    )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg19,amoebanet,bert,gnmt,xlnet,bert-mid")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    from dapple_tf import devices

    devices.create_logical_cpus(args.devices)
    from dapple_tf.auto_plan import runtime_cluster

    cluster = runtime_cluster(args.devices)
    print(
        f"{args.devices} logical CPU devices on {os.cpu_count()} cores; measured transfer "
        f"latency {cluster.transfer_latency_s * 1e6:.0f} us, summing bandwidth "
        f"{cluster.accumulate_bandwidth / 1e9:.2f} GB/s; global batch {args.global_batch_size}; "
        f"median of 2 x {args.rounds} timed steps, round-robin",
        flush=True,
    )
    print(
        "| model | plan | shape | predicted ms | measured ms | error | calibrated ms | error | "
        "predicted act. MiB | measured act. MiB | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for line in bench_model(name, args.devices, args.global_batch_size, args.rounds, cluster):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
