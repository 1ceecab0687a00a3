r"""Profile a model from the command line.

    python -m dapple_tf.profile --model bert --preset tiny --batch-size 8 --out bert.json \
        [--graph-txt bert.txt] [--warmup-steps 2] [--measured-steps 5] [--device /GPU:0] \
        [--fit-batch-sizes 2,16]
        [--layers 'bert/embeddings|bert/encoder/layer_\d+|bert/pooler|cls']

With `--fit-batch-sizes` the profile is the one the "runtime" cost model reads
(`profiler.profile_for_runtime`): every layer measured at those batch sizes and fitted as fixed +
per-row, with its saved bytes and the model's default optimizer's slot bytes and update time;
`--batch-size` is then ignored (the profile's batch size is the largest of them).

Builds the model's template at the given batch size on one device, measures it
(`dapple_tf.profiler`), prints a per-layer table, and writes the Profile as JSON (`--out`) and,
with `--graph-txt`, in the PipeDream/DAPPLE `graph.txt` format that `python -m planner` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from dapple_tf import profiler  # noqa: E402
from planner.profile import Profile  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dapple_tf.profile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="model name in the models registry (e.g. bert)")
    p.add_argument("--preset", default="tiny", help="model size preset (default: tiny)")
    p.add_argument("--batch-size", type=int, required=True, help="rows per profiled step")
    p.add_argument("--out", required=True, help="where to write the Profile JSON")
    p.add_argument("--graph-txt", help="also write the profile in graph.txt format here")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--measured-steps", type=int, default=5)
    p.add_argument("--device", default=None, help="device to profile on (default: TF's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fit-batch-sizes",
        default=None,
        help="comma-separated batch sizes (two or more) for the runtime profile",
    )
    p.add_argument(
        "--layers",
        default=None,
        help="layer rule: a regular expression matched against name-scope paths "
        "(default: top-level name scopes)",
    )
    return p


def write_graph_txt(profile: Profile, path: str) -> None:
    """Writes `profile` in graph.txt format (the planner's writer)."""
    from planner import graph_txt

    graph_txt.write_graph_txt(profile, path)


def main(argv: Sequence[str] | None = None, get_model: Callable | None = None) -> int:
    """Runs the CLI; `get_model(name, preset)` defaults to `models.get_model`."""
    args = _parser().parse_args(argv)
    if get_model is None:
        from models import get_model
    model = get_model(args.model, args.preset)

    def batch_fn(batch_size: int, rng: np.random.Generator):
        return model.synthetic_batch(batch_size, rng)

    if args.fit_batch_sizes:
        sizes = [int(x) for x in args.fit_batch_sizes.split(",") if x.strip()]
        prof = profiler.profile_for_runtime(
            model.model_fn,
            model.feature_spec,
            sizes,
            optimizer_fn=model.default_optimizer,
            warmup_steps=args.warmup_steps,
            measured_steps=args.measured_steps,
            device=args.device,
            seed=args.seed,
            batch_fn=batch_fn,
            layers=args.layers,
        )
        print(f"{args.model} ({args.preset}), batch sizes {sizes}, fixed + per-row fit")
        print(profiler.format_table(prof))
        return _write(prof, args)
    measurement = profiler.measure(
        model.model_fn,
        model.feature_spec,
        args.batch_size,
        warmup_steps=args.warmup_steps,
        measured_steps=args.measured_steps,
        device=args.device,
        seed=args.seed,
        batch_fn=batch_fn,
        layers=args.layers,
    )
    prof = measurement.profile
    print(f"{args.model} ({args.preset}), batch {prof.batch_size}, on {prof.device}")
    print(profiler.format_table(prof))
    print(
        f"traced step: {measurement.step_ms:.3f} ms wall; op time no layer claims: "
        f"{measurement.unattributed_ms:.3f} ms"
    )
    expected = tuple(getattr(model, "layer_names", prof.layer_names))
    if args.layers is None and tuple(expected) != prof.layer_names:
        print(
            f"warning: the model declares layers {list(expected)} but its graph has name scopes "
            f"{list(prof.layer_names)}; plans name the latter",
            file=sys.stderr,
        )
    return _write(prof, args)


def _write(prof: Profile, args) -> int:
    prof.save_json(args.out)
    print(f"wrote {args.out}")
    if args.graph_txt:
        write_graph_txt(prof, args.graph_txt)
        print(f"wrote {args.graph_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
