"""Throughput: examples/s of each model's tiny preset, single device vs the auto plan on 4
logical CPU devices.

    python bench/bench_throughput.py [--models bert gnmt ...] [--gbs 16] [--steps 10]
                                     [--devices 4] [--optimize-graph]

Per model: `SingleDeviceTrainer` (the plain graph on one device) and `Trainer` with the plan
`dapple_tf.auto_plan.auto_plan(spec.model_fn, spec.feature_spec, gbs, devices,
batch_fn=spec.synthetic_batch)` returns (profiled on this machine), same global batch, same
optimizer (the preset's default). After 2 warm-up steps each, `--steps` steps of the two
trainers alternate (so machine load hits both alike); examples/s = gbs / median step time.
Set-up time (auto plan: profiling + search; trainer: template + rewrite + session) is shown too.
Grappler is off in both sessions unless `--optimize-graph` (set-up of large pipelined graphs is
several times faster without it).
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

from dapple_tf import devices  # noqa: E402

import models  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(models.MODEL_NAMES))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--gbs", type=int, default=16, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--optimize-graph", action="store_true", help="keep Grappler on")
    args = parser.parse_args(argv)
    devices.create_logical_cpus(args.devices)
    from dapple_tf.auto_plan import auto_plan
    from dapple_tf.trainer import SingleDeviceTrainer, Trainer

    rows = []
    for name in args.models:
        spec = models.get_model(name, args.preset)
        batch = spec.synthetic_batch(args.gbs, np.random.default_rng(0))
        t0 = time.perf_counter()
        single = SingleDeviceTrainer(
            spec.model_fn,
            spec.feature_spec,
            spec.default_optimizer,
            args.gbs,
            seed=0,
            optimize_graph=args.optimize_graph,
        )
        t1 = time.perf_counter()
        plan = auto_plan(
            spec.model_fn,
            spec.feature_spec,
            args.gbs,
            args.devices,
            batch_fn=spec.synthetic_batch,
            optimizer_fn=spec.default_optimizer,
        )
        t2 = time.perf_counter()
        piped = Trainer(
            spec.model_fn,
            spec.feature_spec,
            spec.default_optimizer,
            plan,
            args.gbs,
            seed=0,
            num_devices=args.devices,
            optimize_graph=args.optimize_graph,
        )
        t3 = time.perf_counter()
        for trainer in (single, piped):
            for _ in range(2):
                trainer.train_step(batch)
        times = {"single": [], "piped": []}
        for _ in range(args.steps):
            for key, trainer in (("single", single), ("piped", piped)):
                start = time.perf_counter()
                trainer.train_step(batch)
                times[key].append(time.perf_counter() - start)
        single.close()
        piped.close()
        s, p = statistics.median(times["single"]), statistics.median(times["piped"])
        rows.append(
            (
                name,
                plan.notation,
                plan.num_micro_batches,
                plan.schedule,
                args.gbs / s,
                args.gbs / p,
                s / p,
                t1 - t0,
                t2 - t1,
                t3 - t2,
            )
        )
        print(
            f"{name}: single {args.gbs / s:.1f} ex/s, auto plan {plan.notation} M="
            f"{plan.num_micro_batches} {args.gbs / p:.1f} ex/s",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"{args.preset} presets, global batch {args.gbs}, {args.devices} logical CPU devices, "
        f"median of {args.steps} alternating steps, Grappler "
        f"{'on' if args.optimize_graph else 'off'}"
    )
    print()
    print(
        "| model | auto plan | M | schedule | single device ex/s | auto plan ex/s | speedup | "
        "set-up s: single | auto_plan | pipelined trainer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, notation, m, schedule, se, pe, speedup, ts, ta, tp in rows:
        print(
            f"| {name} | {notation} | {m} | {schedule} | {se:.1f} | {pe:.1f} | {speedup:.2f}x | "
            f"{ts:.1f} | {ta:.1f} | {tp:.1f} |"
        )


if __name__ == "__main__":
    main()
