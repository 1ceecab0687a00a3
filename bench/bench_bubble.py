"""Bubble: measured vs theoretical for S in {2, 4}, M in {1, 2, 4, 8, 16}, GPipe, 1F1B, ZB-H1
(and interleaved 1F1B).

    python bench/bench_bubble.py [--width 512] [--micro-batch 64] [--steps 3]
                                 [--stages 2 4] [--micro-batches 1 2 4 8 16]
                                 [--schedules gpipe 1f1b zb-h1 interleaved-1f1b] [--chunks 2]

Model: an MLP of 8 equal dense+tanh layers (the last also computes the loss), split evenly into
S stages on S logical CPU devices; the micro-batch size is fixed, so the global batch is
micro-batch x M. For each setting, after a warm-up step, `--steps` steps are traced
(`Trainer.traced_step`); each trace is cut into tasks (`dapple_tf.timeline.tasks_from_step_stats`)
and its bubble fraction per device (`bubble_fraction`: the share of the window from the first
forward to the last backward in which the device runs no forward or backward) is averaged over
devices (for zb-h1, its I and W actions count as busy like F and B). The table shows the median
over traced steps next to the schedule's unit-time bubble (`planner.schedules.unit_bubble`: F =
1, B = 2, I = W = 1; (S-1)/(M+S-1) for GPipe and 1F1B, (S-1)/(3M+S-1) for ZB-H1). Under
interleaved-1f1b, S is the number of devices, each holding `--chunks` = v of the S v stages
(round-robin), theory (S-1)/(vM+S-1); M must be a multiple of S (other M are skipped). On this
machine the S logical devices share the same few cores with each other (and with other jobs), so
stages slow each other down when they overlap.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dapple_tf import devices  # noqa: E402
from bench_models import mlp_fn  # noqa: E402
from dapple_tf.timeline import (  # noqa: E402
    bubble_fraction,
    pipeline_window,
    tasks_from_step_stats,
)
from dapple_tf.trainer import Trainer  # noqa: E402
from graph_rewrite.template import build_template  # noqa: E402
from planner import schedules  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

v1 = tf.compat.v1
DEPTH = 8


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=128, help="rows per micro-batch")
    parser.add_argument("--steps", type=int, default=5, help="traced steps per setting")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1"], choices=schedules.EXECUTABLE
    )
    parser.add_argument(
        "--chunks", type=int, default=2, help="interleaved-1f1b: stages per device (v)"
    )
    parser.add_argument(
        "--optimize-graph", action="store_true", help="keep Grappler on (slower set-up)"
    )
    args = parser.parse_args(argv)
    devices.create_logical_cpus(max(args.stages))
    fn = functools.partial(mlp_fn, depth=DEPTH, width=args.width)
    spec = {"x": ((args.width,), tf.float32), "y": ((), tf.int32)}
    layers = build_template(fn, spec).layers
    rng = np.random.default_rng(0)
    begin = time.perf_counter()
    rows = []
    for S in args.stages:
        for M in args.micro_batches:
            for schedule in args.schedules:
                chunks = args.chunks if schedule in schedules.CHUNKED else 1
                if M % S and chunks > 1:
                    continue  # interleaving needs M a multiple of the devices
                gbs = args.micro_batch * M
                batch = {
                    "x": rng.standard_normal((gbs, args.width)).astype(np.float32),
                    "y": rng.integers(0, 10, size=(gbs,)).astype(np.int32),
                }
                plan = even_plan(layers, [1] * S, gbs, M, schedule, chunks)
                trainer = Trainer(
                    fn,
                    spec,
                    lambda: v1.train.GradientDescentOptimizer(0.01),
                    plan,
                    gbs,
                    seed=0,
                    num_devices=S,
                    optimize_graph=args.optimize_graph,
                )
                trainer.train_step(batch)
                bubbles, windows = [], []
                for _ in range(args.steps):
                    _, metadata = trainer.traced_step(batch)
                    tasks = tasks_from_step_stats(metadata.step_stats)
                    per_device = bubble_fraction(tasks)
                    bubbles.append(statistics.mean(per_device.values()))
                    start, end = pipeline_window(tasks)
                    windows.append((end - start) / 1e3)
                trainer.close()
                rows.append(
                    (
                        S,
                        M,
                        schedule + (f" v={chunks}" if chunks > 1 else ""),
                        schedules.unit_bubble(
                            schedules.action_lists(schedule, S * chunks, M, chunks), S * chunks
                        ),
                        statistics.median(bubbles),
                        min(bubbles),
                        max(bubbles),
                        statistics.median(windows),
                    )
                )
                print(
                    f"S={S} M={M:2d} {rows[-1][2]:5s} theory {rows[-1][3]:.3f} measured "
                    f"{rows[-1][4]:.3f}  window {rows[-1][7]:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"MLP {DEPTH} layers x width {args.width}, micro-batch {args.micro_batch} rows, "
        f"{args.steps} traced steps per setting, {time.perf_counter() - begin:.0f} s in all"
    )
    print()
    print(
        "| S | M | schedule | theoretical (unit time) | measured (median) | measured min-max "
        "| pipeline window ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for S, M, schedule, theory, med, lo, hi, window in rows:
        print(
            f"| {S} | {M} | {schedule} | {theory:.3f} | {med:.3f} | {lo:.3f}-{hi:.3f} | "
            f"{window:.1f} |"
        )


if __name__ == "__main__":
    main()
