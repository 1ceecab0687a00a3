"""Host memory per rank: each rank holds only its own stage's parameters and optimizer slots.

    python bench/bench_rank_memory.py [--ranks 4] [--preset large] [--model bert]

Launches `horovodrun --gloo -np N` ranks training the model (default BERT-large: 24 layers,
hidden 1024) on the plan 1:1:...:1 (layers split evenly by count), Adam, global batch N, one
micro-batch per rank. Each rank reports the bytes of the variables its graph holds (parameters
and Adam slots), its resident memory after set-up and after 2 steps (VmRSS and peak VmHWM from
/proc/self/status), and how much of the whole model (all variables of the single-device build)
it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(model: str, preset: str, ranks: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO_ROOT)
    import numpy as np
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    import dapple_tf
    import models
    from dapple_tf import checkpoint
    from graph_rewrite.template import build_template
    from planner.plan_format import even_plan

    spec = models.get_model(model, preset)
    template = build_template(spec.model_fn, spec.feature_spec)
    whole = sum(int(np.prod(info.shape)) * info.dtype.size for info in template.variables.values())
    del template
    plan = even_plan(
        build_template(spec.model_fn, spec.feature_spec).layers, [1] * ranks, ranks, 1, "1f1b"
    )
    trainer = dapple_tf.Trainer(
        spec.model_fn,
        spec.feature_spec,
        lambda: tf.compat.v1.train.AdamOptimizer(1e-4),
        plan,
        ranks,
        optimize_graph=False,
    )
    held = sum(
        int(np.prod(v.shape)) * v.dtype.base_dtype.size
        for v in checkpoint.variables_by_name(trainer.graph).values()
    )
    params = sum(
        int(np.prod(v.shape)) * v.dtype.base_dtype.size
        for v in trainer.rewritten.variables.values()
    )
    after_setup = _status_bytes("VmRSS")
    batch = spec.synthetic_batch(ranks, np.random.default_rng(0))
    for _ in range(2):
        trainer.train_step(batch)
    record = {
        "rank": trainer.rank,
        "layers": sum(len(plan.stages[slot.stage].layers) for slot in trainer.slots),
        "parameter_bytes": params,
        "held_bytes": held,
        "whole_model_parameter_bytes": whole,
        "rss_after_setup": after_setup,
        "rss_after_steps": _status_bytes("VmRSS"),
        "peak_rss": _status_bytes("VmHWM"),
    }
    print("MEMORY " + json.dumps(record), flush=True)
    trainer.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model", default="bert")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.model, args.preset, args.ranks)
        return
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [
        horovodrun,
        "--gloo",
        "-np",
        str(args.ranks),
        "-H",
        f"localhost:{args.ranks}",
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--ranks",
        str(args.ranks),
        "--model",
        args.model,
        "--preset",
        args.preset,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600
    )
    records = sorted(
        (
            json.loads(line.split("MEMORY ", 1)[1])
            for line in out.stdout.splitlines()
            if "MEMORY " in line
        ),
        key=lambda r: r["rank"],
    )
    if out.returncode != 0 or len(records) != args.ranks:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
        raise SystemExit(f"launch failed with status {out.returncode}")
    mib = 2**20
    whole = records[0]["whole_model_parameter_bytes"]
    print(
        f"{args.model}-{args.preset} on {args.ranks} ranks (1:...:1, Adam): whole model "
        f"{whole / mib:.0f} MiB of parameters, {3 * whole / mib:.0f} MiB with Adam's 2 slots"
    )
    print(
        "| rank | layers | parameters MiB | share of the model | parameters + slots MiB |"
        " RSS after set-up MiB | RSS after 2 steps MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['rank']} | {r['layers']} | {r['parameter_bytes'] / mib:.0f} | "
            f"{r['parameter_bytes'] / whole:.2f} | {r['held_bytes'] / mib:.0f} | "
            f"{r['rss_after_setup'] / mib:.0f} | {r['rss_after_steps'] / mib:.0f} | "
            f"{r['peak_rss'] / mib:.0f} |"
        )


if __name__ == "__main__":
    main()
