"""Timeline of one traced pipelined step: tasks, bubble fraction, Gantt PNG and Chrome trace.

    python -m dapple_tf.timeline --model_dir DIR [--step N] [--stages S --micro_batches M]

reads `DIR/trace_step_<N>.pb` (a serialized `RunMetadata` that `train.py --trace_step N` saves
for global step N, the step its progress line calls "step N"; the newest one if `--step` is not
given) and `DIR/plan.json` if present (for S and M), writes
next to it `trace_step_<N>.png` (one row per device: forward and backward of each micro-batch as
labelled boxes, transfers, gradient accumulation, allreduce and apply on thin lanes below) and
`trace_step_<N>.json` (open in chrome://tracing or https://ui.perfetto.dev), and prints the
measured bubble fraction per device next to the theoretical (S-1)/(M+S-1).

Ops are classified by the names the rewriter gives them (ARCHITECTURE.md, "The rewritten
graph", and graph_rewrite/clone.py, boundary.py, accumulate.py, allreduce.py): the clones of
micro-batch i on slot `s<stage>r<replica>` are `dapple/mb<i>/s<stage>r<replica>/fwd/...` and
`.../bwd/...` (split backwards, zb-h1: `.../igrad/...` and `.../wgrad/...`, the I and W
actions); every op under `dapple/mb<i>/s<a>_to_s<b>/` moves data between stages (send/recv
endpoints and the row pieces; forward when a < b, gradients when a > b); gradient sums are
`dapple/accumulate/<slot>/...` and the in-process sum over replicas `dapple/sync/s<k>/...`;
Horovod/NCCL collectives are recognised by op type and optimizer updates by `*Apply*` op types.
Ops of one kind, micro-batch and stage on one device merge into one task (see
`tasks_from_records` for where its box starts).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import sys
from typing import Iterable, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the CLI's output without TF's C++ lines

from dapple_tf.profiler import OpRecord, op_records  # noqa: E402
from planner.schedules import Action  # noqa: E402

KINDS = ("F", "B", "I", "W", "transfer", "accumulate", "allreduce", "apply")
COMPUTE = ("F", "B", "I", "W")  # a schedule's actions; I and W: split backwards (zb-h1)

_TRANSFER = re.compile(r"^dapple/mb(\d+)/s(\d+)_to_s(\d+)(/|$)")
_ENDPOINT = re.compile(r"/(send|recv)(?:_r\d+)?$")
_MICRO_BATCH = re.compile(r"^dapple/mb(\d+)/(.*)$")
_SLOT = re.compile(r"^s(\d+)(?:r\d+)?$")  # slot tag s<stage>r<replica>
_ACCUMULATE = re.compile(r"^dapple/accumulate/(?:s(\d+)(?:r\d+)?/)?")
_SYNC = re.compile(r"^dapple/sync/(?:s(\d+)/)?")  # in-process sum over a stage's replicas
_ALLREDUCE = re.compile(r"allreduce|allgather", re.IGNORECASE)
_COLLECTIVE_TYPE = re.compile(r"^(Horovod|Nccl|Collective)")  # HorovodAllreduce, NcclAllReduce, ...
# Ops that read no micro-batch data: the executor may run them long before their task.
_NO_DATA_TYPES = frozenset(
    {
        "Const",
        "ReadVariableOp",
        "VarHandleOp",
        "Shape",
        "ShapeN",
        "Size",
        "Rank",
        "BroadcastGradientArgs",
        "NoOp",
    }
)
_APPLY_TYPE = re.compile(r"^(Resource)?(Sparse)?Apply")  # optimizer updates: ResourceApplyAdam, ...
_BACKWARD_PART = re.compile(r"^(bwd|gradients(_\d+)?|B_end|B_start|loss_grad)$")
_INPUT_GRADIENT_PART = re.compile(r"^(igrad|I_end)$")  # a split backward's I action
_WEIGHT_GRADIENT_PART = re.compile(r"^(wgrad|W_end)$")  # its W action


@dataclasses.dataclass(frozen=True)
class Task:
    """A box of the chart: one kind of work for one micro-batch of one stage on one device."""

    device: str
    kind: str  # one of KINDS
    micro_batch: int | None  # None for allreduce and apply
    stage: int | None  # the sending stage for transfers
    start_us: int
    end_us: int
    busy_us: int = 0  # summed time of the task's ops (some may run before start_us)
    to_stage: int | None = None  # the receiving stage, transfers only

    @property
    def label(self) -> str:
        if self.kind in COMPUTE:
            return f"{self.kind}{self.micro_batch}"
        if self.kind == "accumulate" and self.micro_batch is not None:
            return f"acc{self.micro_batch}"
        if self.kind == "transfer":
            return f"{self.stage}>{self.to_stage}"
        return {"allreduce": "AR", "accumulate": "acc"}.get(self.kind, self.kind)


def _stage_of(text: str | None) -> int | None:
    return None if text is None else int(text)


def classify(name: str, op_type: str = "") -> tuple[str, int | None, int | None, int | None] | None:
    """(kind, micro_batch, stage, to_stage) of a node by its name, or None for nodes of no task.

    Names follow graph_rewrite (module doc). The stage of a compute op is its slot tag's; without
    one it is None and taken from the device (see `tasks_from_step_stats`).
    """
    m = _TRANSFER.match(name)
    if m:
        return "transfer", int(m.group(1)), int(m.group(2)), int(m.group(3))
    if _COLLECTIVE_TYPE.match(op_type):
        return "allreduce", None, None, None
    m = _MICRO_BATCH.match(name)
    if m:
        parts = m.group(2).split("/")
        slot = _SLOT.match(parts[0])
        stage = int(slot.group(1)) if slot else None
        if any(_WEIGHT_GRADIENT_PART.match(p) for p in parts):
            kind = "W"
        elif any(_INPUT_GRADIENT_PART.match(p) for p in parts):
            kind = "I"
        elif any(_BACKWARD_PART.match(p) for p in parts):
            kind = "B"
        else:
            kind = "F"
        return kind, int(m.group(1)), stage, None
    m = _ACCUMULATE.match(name)
    if m:
        return "accumulate", None, _stage_of(m.group(1)), None
    m = _SYNC.match(name)
    if m:
        return "allreduce", None, _stage_of(m.group(1)), None
    if _ALLREDUCE.search(name):
        return "allreduce", None, None, None
    if _APPLY_TYPE.match(op_type):
        return "apply", None, None, None
    return None


def _parse_label(label: str) -> tuple[str, tuple[str, ...]]:
    """(op type, input names) of a step stats label `name = Type(input, ^control, ...)`."""
    m = re.match(r".* = ([^(]*)\((.*)\)\s*$", label)
    if not m:
        return "", ()
    inputs = tuple(i.strip().lstrip("^") for i in m.group(2).split(",") if i.strip())
    return m.group(1), inputs


def tasks_from_records(
    records: Iterable[tuple[OpRecord, str, Sequence[str]]],
    stage_of_device: Mapping[str, int] | None = None,
) -> list[Task]:
    """Merges classified ops (record, op type, input names) into tasks, sorted by device then
    start. Gradient accumulation ops carry no micro-batch in their names; they get the newest
    micro-batch among their inputs.

    A forward or backward box starts when its inputs are there -- F(i) when its activations have
    arrived, B(i) when F(i) is done and its gradient has arrived -- so ops of the task that need
    no input (constants, shape arithmetic the executor runs early) count in `busy_us` but do not
    stretch the box back in time; neither do ops that read no data (constants, variable reads,
    shape queries)."""
    records = list(records)
    if stage_of_device is None:
        stage_of_device = stages_from_transfers(rec for rec, _, _ in records)
    groups: dict[tuple, list[OpRecord]] = collections.defaultdict(list)
    no_data: set[int] = set()  # ids of records whose op reads no micro-batch data
    for rec, op_type, inputs in records:
        c = classify(rec.name, op_type)
        if c is None:
            continue
        kind, mb, stage, to_stage = c
        if kind == "accumulate" and mb is None:
            found = [int(m.group(1)) for m in map(_MICRO_BATCH.match, inputs) if m]
            mb = max(found) if found else None
        if stage is None and kind in COMPUTE and stage_of_device:
            stage = stage_of_device.get(
                rec.device, _short_device_match(rec.device, stage_of_device)
            )
        groups[(rec.device, kind, mb, stage, to_stage)].append(rec)
        if op_type in _NO_DATA_TYPES:
            no_data.add(id(rec))

    stage_here = {
        device: stage
        for device, kind, _, stage, _ in groups
        if kind in COMPUTE and stage is not None
    }
    arrivals: dict[tuple, int] = {}  # (device, mb, forward?) -> when the last input arrived
    for (device, kind, mb, a, b), recs in groups.items():
        if kind == "transfer" and stage_here.get(device) == b:
            key = (device, mb, a < b)
            arrivals[key] = max(arrivals.get(key, 0), max(r.end_us for r in recs))

    def task(key, recs, ready, floor):
        """The box of one task: its data ops that end after `ready` (when its inputs arrived),
        else after `floor` (a time it certainly starts after: B(i) after F(i) ends), and never
        starting before `floor`, so B(i) is drawn after F(i) whatever the transfer records."""
        device, kind, mb, stage, to_stage = key
        data = [r for r in recs if id(r) not in no_data] or recs
        inside = (
            [r for r in data if r.end_us > ready] or [r for r in data if r.end_us > floor] or data
        )
        start = max(min(r.start_us for r in inside), floor)
        return Task(
            device,
            kind,
            mb,
            stage,
            start,
            max(start, max(r.end_us for r in inside)),
            sum(r.busy_us for r in recs),
            to_stage,
        )

    tasks, forward_end, backward_start, input_end = [], {}, {}, {}
    # forwards first: backwards need them, W its I, accumulation all of them
    order = {"F": 0, "B": 1, "I": 1, "W": 2}
    for key in sorted(groups, key=lambda k: order.get(k[1], 3)):
        device, kind, mb, _, _ = key
        ready = floor = 0
        if kind == "F":
            ready = arrivals.get((device, mb, True), 0)
        elif kind in ("B", "I"):
            floor = forward_end.get((device, mb), 0)
            ready = max(arrivals.get((device, mb, False), 0), floor)
        elif kind == "W":
            ready = floor = input_end.get((device, mb), 0)
        elif kind == "accumulate" and mb is not None:
            ready = backward_start.get((device, mb), 0)
        t = task(key, groups[key], ready, floor)
        if kind == "F":
            forward_end[(device, mb)] = t.end_us
        if kind in ("B", "I"):
            backward_start[(device, mb)] = t.start_us
        if kind == "I":
            input_end[(device, mb)] = t.end_us
        tasks.append(t)
    return sorted(tasks, key=lambda t: (device_sort_key(t.device), t.start_us, t.end_us))


def stages_from_transfers(records: Iterable[OpRecord]) -> dict[str, int]:
    """Device -> stage, read off the boundary ops: the device running `s<a>_to_s<b>/send` holds
    stage a, the one running `.../recv` stage b."""
    out = {}
    for rec in records:
        m, end = _TRANSFER.match(rec.name), _ENDPOINT.search(rec.name)
        if m and end:
            out.setdefault(rec.device, int(m.group(2) if end.group(1) == "send" else m.group(3)))
    return out


def _short_device_match(device: str, stage_of_device: Mapping[str, int]) -> int | None:
    for name, stage in stage_of_device.items():
        if device.lower().endswith(name.lower().lstrip("/")):
            return stage
    return None


def tasks_from_step_stats(
    step_stats, stage_of_device: Mapping[str, int] | None = None
) -> list[Task]:
    """Tasks of one traced step (`RunMetadata.step_stats`).

    `stage_of_device` maps a device name (full, or a suffix such as `CPU:1`) to the stage it
    runs, for names that do not carry the stage."""
    labels = {}
    for dev in step_stats.dev_stats:
        for node in dev.node_stats:
            labels.setdefault(node.node_name, _parse_label(node.timeline_label))
    return tasks_from_records(
        ((r, *labels.get(r.name, ("", ()))) for r in op_records(step_stats)), stage_of_device
    )


# ---- analysis ----------------------------------------------------------------------------------
def device_sort_key(device: str) -> tuple:
    """Orders `/job:.../device:CPU:10` after `CPU:9`: by name with trailing numbers as ints."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", device))


def devices_of(tasks: Sequence[Task]) -> list[str]:
    return sorted({t.device for t in tasks}, key=device_sort_key)


def _union_us(spans: Iterable[tuple[int, int]]) -> int:
    total, end = 0, None
    for s, e in sorted(spans):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def pipeline_window(tasks: Sequence[Task]) -> tuple[int, int]:
    """From the first forward's start to the last backward's end over all devices."""
    compute = [t for t in tasks if t.kind in COMPUTE]
    if not compute:
        raise ValueError("no forward or backward tasks: was the traced step a pipelined one?")
    return min(t.start_us for t in compute), max(t.end_us for t in compute)


def bubble_fraction(tasks: Sequence[Task]) -> dict[str, float]:
    """Per device: the fraction of the pipeline window (`pipeline_window`) in which the device
    runs no forward or backward. This is what (S-1)/(M+S-1) predicts for equal stages; transfers,
    allreduce and apply are outside it."""
    begin, end = pipeline_window(tasks)
    window = max(end - begin, 1)
    out = {}
    for device in devices_of(tasks):
        spans = [(t.start_us, t.end_us) for t in tasks if t.device == device and t.kind in COMPUTE]
        if spans:
            out[device] = 1.0 - _union_us(spans) / window
    return out


def theoretical_bubble(num_stages: int, num_micro_batches: int) -> float:
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def compute_order(tasks: Sequence[Task]) -> dict[str, list[Action]]:
    """Per device, its forward/backward (or F, I, W) actions in the order they started —
    comparable with a schedule's action lists (planner/schedules.py)."""
    out: dict[str, list[Action]] = {}
    for device in devices_of(tasks):
        mine = sorted(
            (t for t in tasks if t.device == device and t.kind in COMPUTE),
            key=lambda t: t.start_us,
        )
        if mine:
            out[device] = [Action(t.kind, t.stage, t.micro_batch) for t in mine]
    return out


# ---- outputs -----------------------------------------------------------------------------------
_COLORS = {
    "F": "#4c78a8",
    "B": "#59a14f",
    "I": "#59a14f",  # a split backward's input gradient: B's colour
    "W": "#8cd17d",
    "transfer": "#9d9d9d",
    "accumulate": "#b07aa1",
    "allreduce": "#f28e2b",
    "apply": "#e15759",
}


# (bottom offset, height) in a device's row: compute on top, transfers, then gradient work.
_LANES = {
    "F": (-0.05, 0.45),
    "B": (-0.05, 0.45),
    "I": (-0.05, 0.45),
    "W": (-0.05, 0.45),
    "transfer": (-0.22, 0.13),
    "accumulate": (-0.40, 0.13),
    "allreduce": (-0.40, 0.13),
    "apply": (-0.40, 0.13),
}


@dataclasses.dataclass(frozen=True)
class Chart:
    """What `render_png` drew, read back from the figure: per row (device), the boxes' labels
    and x extents in milliseconds, in x order."""

    rows: dict[str, list[tuple[str, float, float]]]


def _short(device: str) -> str:
    m = re.search(r"(?:device:)?([A-Za-z]+:\d+)$", device)
    return m.group(1) if m else device


def render_png(tasks: Sequence[Task], path: str, *, title: str = "") -> Chart:
    """Draws a Gantt chart: one row per device; F/B boxes labelled `F<i>`/`B<i>` on the upper
    lane, transfers on a thin middle lane, accumulation/allreduce/apply on a thin lower lane."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not tasks:
        raise ValueError("no tasks to draw")
    devices = devices_of(tasks)
    t0 = min(t.start_us for t in tasks)
    span_ms = (max(t.end_us for t in tasks) - t0) / 1000.0 or 1.0
    fig = Figure(
        figsize=(
            max(8.0, min(24.0, 2.0 + 0.5 * len(tasks) / max(len(devices), 1))),
            1.0 + 0.9 * len(devices),
        )
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row, device in enumerate(devices):
        y = len(devices) - 1 - row
        for t in (t for t in tasks if t.device == device):
            x0, width = (
                (t.start_us - t0) / 1000.0,
                max((t.end_us - t.start_us) / 1000.0, span_ms / 2000),
            )
            compute = t.kind in COMPUTE
            bottom, height = _LANES[t.kind]
            bottom += y
            rect = ax.broken_barh(
                [(x0, width)],
                (bottom, height),
                facecolors=_COLORS[t.kind],
                edgecolors="black",
                linewidth=0.4,
            )
            rect.set_gid(f"{device}|{t.label}")
            if compute and width > span_ms / 90:
                ax.text(
                    x0 + width / 2,
                    bottom + height / 2,
                    t.label,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(range(len(devices)))
    stage_of = {t.device: t.stage for t in tasks if t.kind in COMPUTE and t.stage is not None}
    ax.set_yticklabels(
        [_short(d) + (f"\nstage {stage_of[d]}" if d in stage_of else "") for d in reversed(devices)]
    )
    ax.set_ylim(-0.6, len(devices) - 0.4)
    ax.set_xlim(0, span_ms * 1.01)
    ax.set_xlabel("time since step start (ms)")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.legend(
        handles=[
            Patch(color=_COLORS[k], label=k) for k in KINDS if any(t.kind == k for t in tasks)
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=len(KINDS),
        fontsize=8,
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    # Read the drawn boxes back, so tests check the picture and not the input.
    rows: dict[str, list[tuple[str, float, float]]] = collections.defaultdict(list)
    for coll in ax.collections:
        gid = coll.get_gid()
        if not gid:
            continue
        device, label = gid.rsplit("|", 1)
        for path_ in coll.get_paths():
            xs = path_.vertices[:, 0]
            rows[device].append((label, float(xs.min()), float(xs.max())))
    return Chart({d: sorted(boxes, key=lambda b: (b[1], b[2])) for d, boxes in rows.items()})


def chrome_trace(tasks: Sequence[Task]) -> dict:
    """Chrome trace (`chrome://tracing`, Perfetto): one process per device, one thread per lane
    (compute, communication), an `X` event per task with times in microseconds."""
    events = []
    devices = devices_of(tasks)
    for pid, device in enumerate(devices):
        events.append(
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": device}}
        )
        events.append(
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "compute"}}
        )
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": pid,
                "tid": 1,
                "args": {"name": "communication"},
            }
        )
    pid_of = {d: i for i, d in enumerate(devices)}
    t0 = min((t.start_us for t in tasks), default=0)
    for t in tasks:
        events.append(
            {
                "name": t.label,
                "cat": t.kind,
                "ph": "X",
                "pid": pid_of[t.device],
                "tid": 0 if t.kind in COMPUTE else 1,
                "ts": t.start_us - t0,
                "dur": max(t.end_us - t.start_us, 1),
                "args": {
                    "micro_batch": t.micro_batch,
                    "stage": t.stage,
                    "to_stage": t.to_stage,
                    "busy_us": t.busy_us,
                },
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def format_bubbles(
    tasks: Sequence[Task], num_stages: int | None = None, num_micro_batches: int | None = None
) -> str:
    """A table of the measured bubble fraction per device, with the theoretical one if known."""
    known = {t.stage for t in tasks if t.stage is not None} | {
        t.to_stage for t in tasks if t.to_stage is not None
    }
    stages = num_stages or (max(known) + 1 if known else 1)
    mbs = num_micro_batches or len({t.micro_batch for t in tasks if t.kind in COMPUTE}) or 1
    theory = theoretical_bubble(stages, mbs)
    begin, end = pipeline_window(tasks)
    lines = [
        f"pipeline window {(end - begin) / 1000.0:.3f} ms; S={stages}, M={mbs}: theoretical "
        f"bubble (S-1)/(M+S-1) = {theory:.3f}",
        f"{'device':<40} {'measured bubble':>16}",
    ]
    for device, frac in bubble_fraction(tasks).items():
        lines.append(f"{device:<40} {frac:16.3f}")
    return "\n".join(lines)


# ---- CLI ---------------------------------------------------------------------------------------
def trace_path(model_dir: str, step: int) -> str:
    """Where `train.py --trace_step N` saves the RunMetadata of step N."""
    return os.path.join(model_dir, f"trace_step_{step}.pb")


def _latest_trace(model_dir: str) -> tuple[str, int]:
    found = []
    for path in glob.glob(os.path.join(model_dir, "trace_step_*.pb")):
        m = re.search(r"trace_step_(\d+)\.pb$", path)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise SystemExit(
            f"{model_dir}: no trace_step_<N>.pb found; run train.py --trace_step N "
            f"--model_dir {model_dir} first"
        )
    step, path = max(found)
    return path, step


def load_run_metadata(path: str):
    from tensorflow.core.protobuf import config_pb2

    metadata = config_pb2.RunMetadata()
    with open(path, "rb") as f:
        metadata.ParseFromString(f.read())
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dapple_tf.timeline", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model_dir", required=True)
    p.add_argument("--step", type=int, default=None, help="traced step (default: the newest)")
    p.add_argument("--stages", type=int, default=None, help="S for the theoretical bubble")
    p.add_argument("--micro_batches", type=int, default=None, help="M for the theoretical bubble")
    args = p.parse_args(argv)
    if args.step is None:
        path, step = _latest_trace(args.model_dir)
    else:
        path, step = trace_path(args.model_dir, args.step), args.step
        if not os.path.exists(path):
            raise SystemExit(f"{path}: not found; run train.py --trace_step {step} first")
    stages, micro_batches = args.stages, args.micro_batches
    plan_file = os.path.join(args.model_dir, "plan.json")
    if os.path.exists(plan_file) and (stages is None or micro_batches is None):
        from planner.plan_format import Plan

        plan = Plan.load(plan_file)
        stages = stages or plan.num_stages
        micro_batches = micro_batches or plan.num_micro_batches
    tasks = tasks_from_step_stats(load_run_metadata(path).step_stats)
    if not tasks:
        raise SystemExit(f"{path}: no dapple/mb<i>/ ops in the trace; was it a pipelined step?")
    base = os.path.join(args.model_dir, f"trace_step_{step}")
    render_png(tasks, base + ".png", title=f"{path}")
    with open(base + ".json", "w") as f:
        json.dump(chrome_trace(tasks), f)
    print(format_bubbles(tasks, stages, micro_batches))
    print(f"wrote {base}.png and {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
