"""Cost of micro-batching on one device: a one-stage plan with M = 1, 2, 4, 8 vs the plain
single-device graph (issue #17 item 4, target M=8 <= 1.10x of M=1).

    taskset -c 1 python bench/bench_microbatch.py [--steps 12] [--warmup 3] [--batch 512]
        [--micro-batches 1,2,4,8] [--width 1024] [--depth 8] [--optimize-graph on|off|both]

Model: `bench_models.relu_mlp_fn` (8 dense+ReLU layers of width 1024, then a softmax layer),
momentum optimizer, public API only (`Trainer` with a one-stage plan on device 0,
`SingleDeviceTrainer`). All trainers live in one process; each round runs one step of every
trainer in turn (interleaved, so machine load hits all alike); `--warmup` rounds are dropped.
Trainer variants: M = each of `--micro-batches`, and for M > 1 also with
`stack_weight_gradients=True` ("stacked"). Prints per trainer the median, min and max step time
over `--steps` rounds and the ratio of its median to Trainer M=1's and SingleDevice's.
`--trace` also prints, per trainer, the op types that took the most time in one traced step
(summed op time from RunMetadata step stats).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dapple_tf  # noqa: E402,F401  (first: TensorFlow's oneDNN kernels, as users get them)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench_models import relu_mlp_fn  # noqa: E402
from dapple_tf.trainer import SingleDeviceTrainer, Trainer  # noqa: E402
from graph_rewrite import build_template  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

v1 = tf.compat.v1


def make_trainers(args, optimize_graph: bool, label: str):
    """name -> trainer and name -> set-up seconds, for SingleDeviceTrainer and each Trainer
    variant; `label` is appended to every name."""

    def model_fn(features):
        return relu_mlp_fn(features, depth=args.depth, width=args.width)

    spec = {"x": ((args.width,), tf.float32), "y": ((), tf.int32)}

    def optimizer():
        return v1.train.MomentumOptimizer(0.01, 0.9)

    layers = build_template(model_fn, spec).layers
    trainers, setup = {}, {}
    start = time.perf_counter()
    trainers["SingleDevice" + label] = SingleDeviceTrainer(
        model_fn, spec, optimizer, args.batch, seed=0, optimize_graph=optimize_graph
    )
    setup["SingleDevice" + label] = time.perf_counter() - start
    variants = [(m, False) for m in args.micro_batches]
    if args.stack_weight_gradients:
        variants += [(m, True) for m in args.micro_batches if m > 1]
    for m, stack in variants:
        plan = even_plan(layers, [1], args.batch, m, "1f1b")
        name = f"Trainer M={m}{' stacked' if stack else ''}{label}"
        start = time.perf_counter()
        trainers[name] = Trainer(
            model_fn,
            spec,
            optimizer,
            plan,
            args.batch,
            seed=0,
            num_devices=1,
            optimize_graph=optimize_graph,
            stack_weight_gradients=stack,
        )
        setup[name] = time.perf_counter() - start
    return trainers, setup


def top_op_types(trainer, batch, count=8):
    """(op type, summed ms, number of ops) of one traced step, largest first."""
    _, metadata = trainer.traced_step(batch)
    total = collections.Counter()
    calls = collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op_type = label.split("(")[0].split("=")[-1].strip() if "=" in label else node.node_name
            total[op_type] += (node.op_end_rel_micros - node.op_start_rel_micros) / 1000
            calls[op_type] += 1
    return [(t, ms, calls[t]) for t, ms in total.most_common(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--micro-batches", default="1,2,4,8")
    parser.add_argument("--optimize-graph", choices=("on", "off", "both"), default="on")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--no-stack-weight-gradients",
        dest="stack_weight_gradients",
        action="store_false",
        help="leave out the stacked variants",
    )
    args = parser.parse_args(argv)
    args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((args.batch, args.width)).astype(np.float32),
        "y": rng.integers(0, 10, size=(args.batch,)).astype(np.int32),
    }
    settings = {
        "on": [(True, "")],
        "off": [(False, "")],
        "both": [(True, " grappler"), (False, " no-grappler")],
    }[args.optimize_graph]
    trainers, setup, labels = {}, {}, {}
    for optimize_graph, label in settings:
        built, seconds = make_trainers(args, optimize_graph, label)
        trainers.update(built)
        setup.update(seconds)
        labels.update((name, label) for name in built)
    times = {name: [] for name in trainers}
    for round_ in range(args.warmup + args.steps):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(batch)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(
        f"MLP {args.depth} x dense+ReLU width {args.width} + softmax, global batch {args.batch}, "
        f"momentum, one stage on one device; {args.steps} interleaved steps after "
        f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| trainer | median ms | min-max ms | median / Trainer M=1 | median / SingleDevice "
        "| set-up s |"
    )
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        label = labels[name]
        print(
            f"| {name} | {median[name]:.1f} | {min(values) * 1000:.1f}-"
            f"{max(values) * 1000:.1f} | {median[name] / median['Trainer M=1' + label]:.3f} | "
            f"{median[name] / median['SingleDevice' + label]:.3f} | {setup[name]:.1f} |"
        )
    if args.trace:
        for name, trainer in trainers.items():
            print(f"\n{name}: op types by summed time in one traced step")
            for op_type, ms, count in top_op_types(trainer, batch):
                print(f"  {op_type:32s} {ms:8.1f} ms  {count:4d} ops")


if __name__ == "__main__":
    main()
