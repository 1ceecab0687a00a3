"""Scaling across ranks: one rank on one core against 2 and 4 ranks pinned one per core.

    python bench/bench_scaling.py [--runs single,1:1,DP2,1:1:1:1,2x2] [--steps 12] [--warmup 3]
                                  [--model mlp|bert|gnmt] [--global-batch N] [--launcher gloo|mpi]
                                  [--stack-weight-gradients] [--zero-bubble] [--interleaved V]

The way GPUs behave: every rank computes on a core of its own. Each run is launched as
`horovodrun --gloo -np N -H localhost:N` (`--launcher mpi`: `horovodrun --mpi`), every rank
pinning itself to core `HOROVOD_LOCAL_RANK mod cores` before TensorFlow starts (what `taskset -c $HOROVOD_LOCAL_RANK`
does); the baseline is one process pinned to core 0 (`SingleDeviceTrainer`, and `Trainer` on one
device with M = 1, M = 8, and M = 8 with `stack_weight_gradients=True`). Model (default, issue
#17): an MLP of 8 dense+ReLU layers of width 1024 and a softmax layer, global batch 512
(`--global-batch` to change it, e.g. 256 for what one DP2 replica computes), momentum.
Step time: median over `--steps` steps after `--warmup` warm-up steps, of the slowest rank
per step (each rank reports its own times; every rank leaves a step only after the step-end
collective, so they agree closely).

Physical limit of a pipeline of S equal stages with M micro-batches on S cores: S*M/(M+S-1)
(1:1 M=8: 1.78x); interleaved over v chunks per core: S*M/(M+(S-1)/v) (1:1, v=2: 1.88x); of
data parallelism on R cores: R. `--interleaved V` adds, for each pipeline run, the same devices
running interleaved-1f1b with V stages each (the layers cut into V*S stages, round-robin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

GLOBAL_BATCH, WIDTH, DEPTH, CLASSES = 512, 1024, 8, 10

# run name -> (ranks, replicas per stage, micro-batches)
RUNS = {
    "1:1": (2, [1, 1], 8),
    "DP2": (2, [2], 1),
    "1:1:1:1": (4, [1, 1, 1, 1], 8),
    "2x2": (4, [2, 2], 4),
}


def pin_to_core(local_rank: int) -> int:
    cores = sorted(os.sched_getaffinity(0))
    core = cores[local_rank % len(cores)]
    os.sched_setaffinity(0, {core})
    return core


def mlp_fn(features):
    import tensorflow as tf
    from dapple_tf.layers import layer

    v1 = tf.compat.v1
    h = features["x"]
    for i in range(DEPTH):
        with layer(f"dense_{i}"):
            w = v1.get_variable("kernel", [h.shape[-1], WIDTH])
            b = v1.get_variable("bias", [WIDTH], initializer=v1.zeros_initializer())
            h = tf.nn.relu(tf.matmul(h, w) + b)
    with layer("softmax"):
        w = v1.get_variable("kernel", [WIDTH, CLASSES])
        logits = tf.matmul(h, w)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=features["y"], logits=logits)
        )


def feature_spec():
    import tensorflow as tf

    return {"x": ((WIDTH,), tf.float32), "y": ((), tf.int32)}


def optimizer():
    import tensorflow as tf

    return tf.compat.v1.train.MomentumOptimizer(0.01, momentum=0.9)


def make_batch(rng, rows=GLOBAL_BATCH):
    import numpy as np

    return {
        "x": rng.standard_normal((rows, WIDTH)).astype(np.float32),
        "y": rng.integers(0, CLASSES, size=(rows,)).astype(np.int32),
    }


def timed_steps(trainer, batch, steps, warmup):
    for _ in range(warmup):
        trainer.train_step(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    return times


def workload(model: str, global_batch: int):
    """(model_fn, feature_spec, optimizer_fn, batch) of `model`: issue #17's MLP, or the tiny
    preset of one of the project's models with its synthetic data and default optimizer."""
    import numpy as np

    rng = np.random.default_rng(0)
    if model == "mlp":
        return mlp_fn, feature_spec(), optimizer, make_batch(rng, global_batch)
    import models

    spec = models.get_model(model, "tiny")
    return (
        spec.model_fn,
        spec.feature_spec,
        spec.default_optimizer,
        spec.synthetic_batch(global_batch, rng),
    )


def worker(
    run: str,
    steps: int,
    warmup: int,
    stack: bool = False,
    model: str = "mlp",
    global_batch=None,
    schedule: str = "1f1b",
    chunks: int = 1,
) -> None:
    """One rank of a horovodrun launch (or the single-process baseline): pin, build, time."""
    local_rank = int(
        os.environ.get("HOROVOD_LOCAL_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    )
    core = pin_to_core(local_rank)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO_ROOT)
    import dapple_tf  # first: TensorFlow's oneDNN kernels, as users get them
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    from graph_rewrite.template import build_template
    from planner.plan_format import even_plan

    global_batch = global_batch or GLOBAL_BATCH
    model_fn, spec, optimizer_fn, batch = workload(model, global_batch)
    layers = build_template(model_fn, spec).layers

    def one_device(micro_batches, stack=False):
        plan = even_plan(layers, [1], global_batch, micro_batches)
        return dapple_tf.Trainer(
            model_fn,
            spec,
            optimizer_fn,
            plan,
            global_batch,
            seed=1,
            num_devices=1,
            stack_weight_gradients=stack,
        )

    if run == "single":
        results = {}
        trainers = {
            "SingleDeviceTrainer": dapple_tf.SingleDeviceTrainer(
                model_fn, spec, optimizer_fn, global_batch, seed=1
            ),
            "one device M=1": one_device(1),
            "one device M=8": one_device(8),
            "one device M=8 stacked": one_device(8, stack=True),
        }
        for trainer in trainers.values():
            timed_steps(trainer, batch, 0, warmup)
        per_round = {name: [] for name in trainers}
        for _ in range(steps):  # interleaved, so load hits all alike
            for name, trainer in trainers.items():
                per_round[name] += timed_steps(trainer, batch, 1, 0)
        for name, times in per_round.items():
            results[name] = times
        print("RESULT " + json.dumps({"rank": 0, "core": core, "times": results}), flush=True)
        return
    _, replicas, micro_batches = RUNS[run]
    plan = even_plan(layers, replicas, global_batch, micro_batches, schedule, chunks)
    trainer = dapple_tf.Trainer(
        model_fn, spec, optimizer_fn, plan, global_batch, seed=1, stack_weight_gradients=stack
    )
    times = timed_steps(trainer, batch, steps, warmup)
    name = run + (" stacked" if stack else "") + ("" if schedule == "1f1b" else f" {schedule}")
    name += f" v={chunks}" if chunks > 1 else ""
    print(
        "RESULT " + json.dumps({"rank": trainer.rank, "core": core, "times": {name: times}}),
        flush=True,
    )
    trainer.close()


def launch(
    run: str,
    steps: int,
    warmup: int,
    env_extra: dict,
    stack: bool = False,
    model: str = "mlp",
    global_batch: int = GLOBAL_BATCH,
    launcher: str = "gloo",
    schedule: str = "1f1b",
    chunks: int = 1,
) -> dict[str, list[float]]:
    """Run `run` (as horovodrun ranks, or one process) and return name -> per-step times (the
    slowest rank's time of each step)."""
    script = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        run,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--model",
        model,
        "--global-batch",
        str(global_batch),
        "--schedule",
        schedule,
        "--interleaved",
        str(chunks),
    ] + (["--stack-weight-gradients"] if stack else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
    if run == "single":
        command = script
    else:
        ranks = RUNS[run][0]
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        command = [horovodrun, f"--{launcher}", "-np", str(ranks), "-H", f"localhost:{ranks}"]
        command += script
    out = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800
    )
    records, decoder = [], json.JSONDecoder()
    for piece in out.stdout.split("RESULT ")[1:]:  # mpirun may join the ranks' lines
        records.append(decoder.raw_decode(piece)[0])
    if out.returncode != 0 or not records:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"{run}: launch failed with status {out.returncode}")
    merged: dict[str, list[float]] = {}
    for record in records:
        for name, times in record["times"].items():
            old = merged.get(name)
            merged[name] = times if old is None else [max(a, b) for a, b in zip(old, times)]
    return merged


def physical_limit(run: str, chunks: int = 1) -> float:
    """Best speedup over one core: R-way data parallel S-stage pipelines on R*S ranks reach
    R*S*M/(M+(S-1)/v) (v chunks per rank, interleaved; 1 otherwise); with fewer cores than
    ranks, the cores bound it (cores/ranks of that)."""
    ranks, replicas, micro_batches = RUNS[run]
    stages = len(replicas)
    limit = replicas[0] * stages * micro_batches / (micro_batches + (stages - 1) / chunks)
    cores = len(os.sched_getaffinity(0))
    return limit * min(1.0, cores / ranks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="single,1:1,DP2,1:1:1:1,2x2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--stack-weight-gradients",
        action="store_true",
        help="also run the multi-rank plans with stack_weight_gradients=True",
    )
    parser.add_argument(
        "--zero-bubble",
        action="store_true",
        help="also run the multi-rank pipelines (M > 1) with the zb-h1 schedule",
    )
    parser.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleaved",
        type=int,
        default=1,
        metavar="V",
        help="also run each pipeline (M > 1) as interleaved-1f1b with V stages per rank",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the launched ranks (repeatable)"
    )
    parser.add_argument("--model", choices=("mlp", "bert", "gnmt"), default="mlp")
    parser.add_argument(
        "--launcher",
        choices=("gloo", "mpi"),
        default="gloo",
        help="horovodrun's controller and collectives: Gloo (TCP) or MPI (shared memory on one host)",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="global batch (default: 512 for the MLP, 64 for the tiny models)",
    )
    args = parser.parse_args(argv)
    global_batch = args.global_batch or (GLOBAL_BATCH if args.model == "mlp" else 64)
    if args.worker:
        worker(
            args.worker,
            args.steps,
            args.warmup,
            args.stack_weight_gradients,
            args.model,
            global_batch,
            args.schedule,
            args.interleaved if args.schedule == "interleaved-1f1b" else 1,
        )
        return
    env_extra = dict(kv.split("=", 1) for kv in args.env)
    results: dict[str, list[float]] = {}
    for run in args.runs.split(","):
        variants = [(False, "1f1b")]  # (stack_weight_gradients, schedule)
        pipeline = run != "single" and len(RUNS[run][1]) > 1
        if args.stack_weight_gradients and run != "single" and RUNS[run][2] > 1:
            variants.append((True, "1f1b"))
        if args.zero_bubble and pipeline:
            variants.append((False, "zb-h1"))
        if args.interleaved > 1 and pipeline:
            variants.append((False, "interleaved-1f1b"))
        for stack, schedule in variants:
            results.update(
                launch(
                    run,
                    args.steps,
                    args.warmup,
                    env_extra,
                    stack,
                    args.model,
                    global_batch,
                    args.launcher,
                    schedule,
                    args.interleaved if schedule == "interleaved-1f1b" else 1,
                )
            )
    base = (
        statistics.median(results["SingleDeviceTrainer"])
        if "SingleDeviceTrainer" in results
        else None
    )
    print(
        f"| run | ranks | step ms (median of {args.steps}) | min-max ms | speedup vs one rank |"
        f" physical limit |"
    )
    print("|---|---|---|---|---|---|")
    for name, times in results.items():
        median = statistics.median(times)
        run, _, variant = name.partition(" ")
        chunks = int(variant.split("v=")[1]) if "v=" in variant else 1
        ranks = RUNS[run][0] if run in RUNS else 1
        limit = f"{physical_limit(run, chunks):.2f}x" if run in RUNS else "1.00x"
        speedup = f"{base / median:.2f}x" if base else "-"
        print(
            f"| {name} | {ranks} | {median * 1e3:.1f} | {min(times) * 1e3:.1f}-"
            f"{max(times) * 1e3:.1f} | {speedup} | {limit} |"
        )


if __name__ == "__main__":
    main()
