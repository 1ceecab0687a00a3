"""Peak live activation memory per stage, GPipe vs 1F1B vs ZB-H1, measured from the allocator records of a
traced training step (S = 4 stages, M = 8 micro-batches, 4 logical CPU devices).

    python bench/bench_memory.py [--width 512] [--micro-batch 64] [--stages 4] [--micro-batches 8]
    python bench/bench_memory.py --model bert [--micro-batch 8]   # BERT blocks (hidden 128,
        4 heads, FFN 512, 64 tokens), 2 blocks per stage

Per stage: the peak of the running sum of allocations and frees of the stage's clone ops
(`dapple_tf.memory.peak_live_bytes`, all micro-batches of slot s<k>r0) in one traced step after
a warm-up step, once over the forward ops only (`.../fwd/`: the activations kept for the
backward) and once over all clone ops (adds backward temporaries and each micro-batch's weight
gradients, alive until accumulated). Theory: GPipe keeps the activations of all M forwards of a stage alive until its
backwards start; 1F1B keeps at most min(S - k, M) on stage k (planner.schedules
`warmup_forwards`), so the expected ratio 1f1b/gpipe is min(S - k, M) / M. ZB-H1 keeps
min(S, M) micro-batches on every stage (a forward's tensors live until its W), so its peak over
stages equals 1F1B's (stage 0's) only if a pending W holds no more than a pending forward;
"zb-h1 bounded" (`bound_zero_bubble_memory=True`) holds back fewer W's where it does. Both are
skipped with --stack-weight-gradients, which zb-h1 refuses.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dapple_tf import devices  # noqa: E402
from bench_models import mlp_fn  # noqa: E402
from dapple_tf.memory import peak_live_bytes, stage_prefix  # noqa: E402
from dapple_tf.trainer import Trainer  # noqa: E402
from graph_rewrite.place import Slot  # noqa: E402
from graph_rewrite.template import build_template  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

v1 = tf.compat.v1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "bert"), default="mlp")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="rows per micro-batch (mlp 64, bert 8)"
    )
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument(
        "--stack-weight-gradients",
        action="store_true",
        help="Trainer(stack_weight_gradients=True): weight-gradient inputs stay "
        "alive until each stage's last backward",
    )
    args = parser.parse_args(argv)
    S, M = args.stages, args.micro_batches
    devices.create_logical_cpus(S)
    depth = S * args.layers_per_stage
    rows = args.micro_batch or (64 if args.model == "mlp" else 8)
    gbs = rows * M
    rng = np.random.default_rng(0)
    if args.model == "mlp":
        fn = functools.partial(mlp_fn, depth=depth, width=args.width)
        spec = {"x": ((args.width,), tf.float32), "y": ((), tf.int32)}
        batch = {
            "x": rng.standard_normal((gbs, args.width)).astype(np.float32),
            "y": rng.integers(0, 10, size=(gbs,)).astype(np.int32),
        }
        one_mb = rows * args.width * 4
        title = (
            f"MLP {depth} layers x width {args.width}, micro-batch {rows} rows (one layer's "
            f"output of one micro-batch = {one_mb / 2**20:.3f} MiB)"
        )
    else:
        import models

        bert = models.get_model(
            "bert",
            "tiny",
            hidden_size=128,
            num_layers=depth,
            num_heads=4,
            intermediate_size=512,
            seq_length=64,
        )
        fn, spec = bert.model_fn, bert.feature_spec
        batch = bert.synthetic_batch(gbs, rng)
        title = f"BERT {depth} blocks (hidden 128, 4 heads, FFN 512, 64 tokens), {rows} rows"
    layers = build_template(fn, spec).layers
    peaks = {}
    start = time.perf_counter()
    names = ("gpipe", "1f1b")
    if not args.stack_weight_gradients:
        names += ("zb-h1", "zb-h1 bounded")  # the paper's hold-backs; bound_zero_bubble_memory
    for name in names:
        schedule = name.split()[0]
        plan = even_plan(layers, [1] * S, gbs, M, schedule)
        trainer = Trainer(
            fn,
            spec,
            lambda: v1.train.GradientDescentOptimizer(0.01),
            plan,
            gbs,
            seed=0,
            num_devices=S,
            stack_weight_gradients=args.stack_weight_gradients,
            bound_zero_bubble_memory=name.endswith("bounded"),
        )
        trainer.train_step(batch)
        _, metadata = trainer.traced_step(batch)
        for k in range(S):
            device = trainer.rewritten.device_of_slot[Slot(k, 0)]
            peaks[name, k] = peak_live_bytes(metadata, device, stage_prefix(k))
            peaks[name, k, "fwd"] = peak_live_bytes(
                metadata, device, re.compile(rf"^dapple/mb\d+/s{k}r0/fwd/")
            )
        trainer.close()
    print(
        f"{title}, S={S}, M={M}, {S} logical CPU devices, {time.perf_counter() - start:.0f} s"
        f"{', stacked weight gradients' if args.stack_weight_gradients else ''}"
    )
    print()
    print(
        "| stage | activations (fwd ops): gpipe MiB | 1f1b MiB | 1f1b / gpipe | expected "
        "min(S-k, M)/M | all clone ops: gpipe MiB | 1f1b MiB | 1f1b / gpipe |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in range(S):
        ga, fa = peaks["gpipe", k, "fwd"], peaks["1f1b", k, "fwd"]
        g, f = peaks["gpipe", k], peaks["1f1b", k]
        print(
            f"| {k} | {ga / 2**20:.2f} | {fa / 2**20:.2f} | {fa / ga if ga else float('nan'):.2f} "
            f"| {min(S - k, M) / M:.2f} | {g / 2**20:.2f} | {f / 2**20:.2f} | "
            f"{f / g if g else float('nan'):.2f} |"
        )
    print()
    print("| schedule | peak over stages, all clone ops MiB | / 1f1b's | per stage MiB |")
    print("|---|---|---|---|")
    top_1f1b = max(peaks["1f1b", k] for k in range(S))
    for name in names:
        per_stage = [peaks[name, k] for k in range(S)]
        print(
            f"| {name} | {max(per_stage) / 2**20:.2f} | {max(per_stage) / top_1f1b:.3f} | "
            + " ".join(f"{p / 2**20:.2f}" for p in per_stage)
            + " |"
        )


if __name__ == "__main__":
    main()
