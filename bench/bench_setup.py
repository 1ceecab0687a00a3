"""Set-up time: building a trainer and its first step, pipelined Trainer vs SingleDeviceTrainer.

    python bench/bench_setup.py [--hidden 128] [--layers 4] [--vocab 8000] [--repeats 3]

The model is the TF1-style BERT classifier of the tests (tests/tf1_bert.py: `bert` variable scope,
`get_shape_list`, 2-D tensors between layers), named with the layer rule of issue #13. Each
repeat builds SingleDeviceTrainer and then Trainer (2 stages, 1f1b, M=4) in the same process
(A and B interleaved), with Grappler on (the default users get), and times `__init__` and the
first `train_step`; Trainer's init is also split into its phases. Prints the median of each.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dapple_tf import devices  # noqa: E402

GLOBAL_BATCH = 8


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    devices.create_logical_cpus(2)
    import tf1_bert
    from dapple_tf.trainer import SingleDeviceTrainer, Trainer
    from graph_rewrite.template import build_template
    from planner.plan_format import even_plan

    model_fn = functools.partial(
        tf1_bert.bert_classifier,
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        intermediate=4 * args.hidden,
        vocab=args.vocab,
        max_positions=128,
    )
    spec = tf1_bert.FEATURE_SPEC
    batch = tf1_bert.make_batch(np.random.default_rng(0), GLOBAL_BATCH, vocab=args.vocab)
    layers = build_template(model_fn, spec, layers=tf1_bert.LAYERS).layers
    plan = even_plan(layers, [1, 1], GLOBAL_BATCH, 4, "1f1b")

    def optimizer():
        return tf.compat.v1.train.AdamOptimizer(1e-4)

    times = {
        "single init": [],
        "single first step": [],
        "pipelined init": [],
        "pipelined first step": [],
    }
    phases: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for kind in ("single", "pipelined"):
            start = time.perf_counter()
            if kind == "single":
                trainer = SingleDeviceTrainer(
                    model_fn, spec, optimizer, GLOBAL_BATCH, seed=1, layers=tf1_bert.LAYERS
                )
            else:
                trainer = Trainer(
                    model_fn, spec, optimizer, plan, GLOBAL_BATCH, seed=1, layers=tf1_bert.LAYERS
                )
            built = time.perf_counter()
            trainer.train_step(batch)
            stepped = time.perf_counter()
            times[f"{kind} init"].append(built - start)
            times[f"{kind} first step"].append(stepped - built)
            for phase, seconds in getattr(trainer, "setup_seconds", {}).items():
                phases.setdefault(phase, []).append(seconds)
            print(
                f"  {kind}: init {built - start:.2f} s, first step {stepped - built:.2f} s "
                f"{getattr(trainer, 'setup_seconds', '')}",
                flush=True,
            )
            trainer.close()
    params = sum(
        int(np.prod(v.shape))
        for v in build_template(model_fn, spec, layers=tf1_bert.LAYERS).variables.values()
    )
    print(
        f"TF1 BERT hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
        f"({params / 1e6:.1f} M parameters), batch {GLOBAL_BATCH}; median of {args.repeats}"
    )
    for name, values in times.items():
        print(f"  {name:<22} {statistics.median(values):7.2f} s")
    single = statistics.median(times["single init"]) + statistics.median(times["single first step"])
    pipelined = statistics.median(times["pipelined init"]) + statistics.median(
        times["pipelined first step"]
    )
    print(
        f"  init + first step: single {single:.2f} s, pipelined {pipelined:.2f} s "
        f"(ratio {pipelined / single:.2f})"
    )
    for phase, values in phases.items():
        print(f"    pipelined init phase {phase:<28} {statistics.median(values):7.2f} s")


if __name__ == "__main__":
    main()
