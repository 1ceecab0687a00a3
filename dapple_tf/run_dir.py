"""What a `--model_dir` holds, and whether a new run may resume it.

    run.json          what trained here: model, preset, model config, optimizer, global batch
    plan.json         the plan of the newest run
    checkpoint.json   {"latest": "ckpt-<step>", "step": <step>}: the newest complete checkpoint
    ckpt-<step>.*     checkpoints (index + data files), keyed by single-device variable names
    events.out.*      TensorBoard summaries;  trace_step_<N>.pb: traced steps

Resume rule (docs/user-guide.md, "Checkpoints"): a checkpoint holds every variable under its
single-device name, so it restores on any plan of the same model. A run therefore resumes a
directory when model, preset, model config, optimizer and global batch size equal those in
`run.json`; the plan (stages, replicas, micro-batches, schedule) may change, and the change is
logged. Anything else is refused with `RunDirError`, naming what differs.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable
from typing import Any

RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
LATEST_FILE = "checkpoint.json"
RUN_FORMAT = "dapple-run/1"
_CHECKPOINT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")


class RunDirError(ValueError):
    """A model_dir that this run must not resume; the message says what differs."""


def default_model_dir(model: str, preset: str, plan_notation: str) -> str:
    """runs/<model>-<preset>-<notation>, the notation's ':' written '_' (runs/gnmt-tiny-2_2)."""
    return os.path.join("runs", f"{model}-{preset}-{plan_notation.replace(':', '_')}")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What decides whether checkpoints of a directory fit this run (saved as run.json)."""

    model: str
    preset: str
    model_config: dict[str, Any]
    optimizer: str
    global_batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> RunRecord:
        if data.get("format") != RUN_FORMAT:
            raise RunDirError(
                f'{source}: expected "format": "{RUN_FORMAT}", found {data.get("format")!r}'
            )
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except KeyError as e:
            raise RunDirError(f"{source}: missing key {e}") from None


def read_run_record(model_dir: str) -> RunRecord | None:
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return RunRecord.from_dict(data, path)


def write_run_record(model_dir: str, record: RunRecord) -> None:
    _write_json(os.path.join(model_dir, RUN_FILE), record.to_dict())


def check_resumable(model_dir: str, record: RunRecord, plan_layers=None) -> None:
    """Raise RunDirError unless this run (`record`) may resume the checkpoints in `model_dir`.
    A directory without checkpoints may always be used. Without run.json (directories of
    older versions), the saved plan's layers must be the model's (`plan_layers`)."""
    if not checkpoint_steps(model_dir) and not os.path.exists(os.path.join(model_dir, LATEST_FILE)):
        return
    saved = read_run_record(model_dir)
    if saved is None:
        _check_old_plan_layers(model_dir, record, plan_layers)
        return
    mine = json.loads(json.dumps(record.to_dict()))  # tuples -> lists, as in the file
    theirs = saved.to_dict()
    differences = [
        f"{key}: {theirs[key]!r} there, {mine[key]!r} now"
        for key in ("model", "preset", "optimizer", "global_batch_size")
        if theirs[key] != mine[key]
    ]
    config_keys = sorted(set(theirs["model_config"]) | set(mine["model_config"]))
    if theirs["model"] != mine["model"] or theirs["preset"] != mine["preset"]:
        config_keys = []  # another model or size: its config fields say nothing more
    differences += [
        f"model config {key}: {theirs['model_config'].get(key)!r} there, "
        f"{mine['model_config'].get(key)!r} now"
        for key in config_keys
        if theirs["model_config"].get(key) != mine["model_config"].get(key)
    ]
    if differences:
        raise RunDirError(
            f"--model_dir {model_dir} holds checkpoints of another run ({'; '.join(differences)})"
            f". Its checkpoints resume only the same model, preset, model config, optimizer and "
            f"global batch size (any plan); use another --model_dir, or the flags of that run"
        )


def _check_old_plan_layers(model_dir: str, record: RunRecord, plan_layers) -> None:
    path = os.path.join(model_dir, PLAN_FILE)
    if plan_layers is None or not os.path.exists(path):
        return
    with open(path) as f:
        stages = json.load(f).get("stages", [])
    saved_layers = [name for stage in stages for name in stage["layers"]]
    if saved_layers != list(plan_layers):
        raise RunDirError(
            f"--model_dir {model_dir} holds checkpoints of a model with layers "
            f"{saved_layers[:4]}..., not {record.model}/{record.preset}; use "
            f"another --model_dir"
        )


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoint_path(model_dir: str, step: int) -> str:
    return os.path.join(model_dir, f"ckpt-{step}")


def checkpoint_steps(model_dir: str) -> list[int]:
    """Steps of the checkpoints in `model_dir` (those with an index file), newest first."""
    if not os.path.isdir(model_dir):
        return []
    found = (_CHECKPOINT_INDEX.match(name) for name in os.listdir(model_dir))
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def recorded_latest(model_dir: str) -> int | None:
    """The step checkpoint.json names, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(model_dir, LATEST_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_checkpoint(model_dir: str, step: int) -> None:
    _write_json(os.path.join(model_dir, LATEST_FILE), {"latest": f"ckpt-{step}", "step": step})


def newest_good_checkpoint(
    model_dir: str, is_readable: Callable[[str], str | None], warn: Callable[[str], None]
) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint that `is_readable` accepts (it returns None, or
    why the checkpoint cannot be read); each rejected one is reported through `warn`, naming
    the file. Candidates: every `ckpt-<step>.index` here, newest first, but none newer than
    what checkpoint.json names (a newer one was not completely written)."""
    recorded = recorded_latest(model_dir)
    if recorded is None and os.path.exists(os.path.join(model_dir, LATEST_FILE)):
        warn(
            f"{os.path.join(model_dir, LATEST_FILE)} is unreadable: looking for the newest "
            f"readable checkpoint"
        )
    for step in checkpoint_steps(model_dir):
        if recorded is not None and step > recorded:
            continue
        path = checkpoint_path(model_dir, step)
        problem = is_readable(path)
        if problem is None:
            return path, step
        warn(f"checkpoint {path} cannot be read ({problem}); trying an older one")
    return None


def prune_checkpoints(model_dir: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` checkpoints (keep=0 keeps all); returns the deleted
    steps. Only `ckpt-<step>.index` / `ckpt-<step>.data-*` files are touched."""
    if keep <= 0:
        return []
    deleted = checkpoint_steps(model_dir)[keep:]
    for step in deleted:
        prefix = checkpoint_path(model_dir, step)
        for path in [prefix + ".index"] + glob.glob(glob.escape(prefix) + ".data-*"):
            os.remove(path)
    return deleted


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
