"""Overhead of the pipeline machinery: a 4-stage plan with M = 1 on 4 logical CPU devices vs the
plain single-device graph, same model, same global batch.

    python bench/bench_runtime_overhead.py [--steps 30] [--batch 256] [--width 512] [--depth 8]

With M = 1 nothing overlaps, so the ratio is the cost of clones, boundary ops, schedule control
dependencies, accumulation and cross-device transfers (target <= 1.10x).
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
from dapple_tf.layers import layer  # noqa: E402
from dapple_tf.trainer import SingleDeviceTrainer, Trainer  # noqa: E402
from graph_rewrite import build_template  # noqa: E402
from planner.plan_format import even_plan, parse_notation  # noqa: E402

v1 = tf.compat.v1


def mlp_fn(features, depth, width):
    h = features["x"]
    for i in range(depth):
        with layer(f"layer_{i}"):
            w = v1.get_variable("kernel", [h.shape[-1], width])
            b = v1.get_variable("bias", [width], initializer=v1.zeros_initializer())
            h = tf.nn.relu(tf.matmul(h, w) + b)
    with layer("loss"):
        w = v1.get_variable("kernel", [width, 10])
        logits = tf.matmul(h, w)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=features["y"], logits=logits)
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--plan", default="1:1:1:1", help="DAPPLE notation, e.g. 1:1:1:1 or DP1")
    args = parser.parse_args(argv)
    devices.create_logical_cpus(4)
    model_fn = functools.partial(mlp_fn, depth=args.depth, width=args.width)
    spec = {"x": ((args.width,), tf.float32), "y": ((), tf.int32)}
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((args.batch, args.width)).astype(np.float32),
        "y": rng.integers(0, 10, size=(args.batch,)).astype(np.int32),
    }
    optimizer = lambda: v1.train.MomentumOptimizer(0.01, 0.9)  # noqa: E731
    layers = build_template(model_fn, spec).layers
    plan = even_plan(layers, parse_notation(args.plan), args.batch, 1, "1f1b")
    single = SingleDeviceTrainer(model_fn, spec, optimizer, args.batch, seed=0)
    pipelined = Trainer(
        model_fn, spec, optimizer, plan, args.batch, seed=0, num_devices=max(4, plan.num_devices)
    )
    # Alternate single and pipelined steps so machine load affects both alike; the minimum is
    # the least load-sensitive figure on a shared machine, the median is reported too.
    for trainer in (single, pipelined):
        for _ in range(5):
            trainer.train_step(batch)
    single_times, pipelined_times = [], []
    for _ in range(args.steps):
        for trainer, times in ((single, single_times), (pipelined, pipelined_times)):
            start = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - start)
    print(
        f"MLP depth {args.depth} width {args.width}, global batch {args.batch}, plan "
        f"{plan.notation} M=1 on {plan.num_devices} logical CPU devices, {args.steps} steps each"
    )
    for label, pick in (("min", min), ("median", statistics.median)):
        s, p = pick(single_times), pick(pipelined_times)
        print(
            f"  {label:6s} single-device {s * 1e3:8.2f} ms   pipelined {p * 1e3:8.2f} ms   "
            f"ratio {p / s:6.3f}x  (target <= 1.10x)"
        )


if __name__ == "__main__":
    main()
