"""`python -m planner plan ...` (console script `dapple-plan`): plan, print a summary, write JSON.

    python -m planner plan --profile PATH --profile-batch-size PBS --global-batch-size GBS \\
        --cluster 8,16 [--micro-batch-size MBS] [--cost-model hpgo|dapple-tf|runtime] \\
        [--schedule 1f1b|gpipe|zb-h1|pipedream-2bw --allow_async] [--device-memory-gb 16] \\
        [--out plan.json] [--json]

Also: `python -m planner convert IN OUT [--profile-batch-size PBS]` between graph.txt and JSON,
and `python -m planner schedule --schedule zb-h1 --stages 4 --micro-batches 8 [--chunks V]`:
a schedule's action lists per device group, checked, and a timeline with unit-time actions.
"""

from __future__ import annotations

import argparse
import sys

from planner.api import COST_MODELS, plan
from planner.cluster import GB, Cluster, ClusterError
from planner.plan_format import Plan, PlanError
from planner.profile import Profile, ProfileError
from planner import schedules
from planner.schedules import ASYNC, EXECUTABLE, ScheduleError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m planner", description="DAPPLE hybrid pipeline/data-parallel planner"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="find the best plan for a profile on a cluster")
    p.add_argument(
        "--profile", required=True, help="graph.txt (PipeDream/DAPPLE) or our JSON profile"
    )
    p.add_argument(
        "--profile-batch-size",
        type=_positive_int,
        help="batch size the profile was taken at (required for graph.txt)",
    )
    p.add_argument("--global-batch-size", type=_positive_int, required=True)
    p.add_argument(
        "--cluster",
        required=True,
        help="cumulative host boundaries like 8,16 (2 hosts x 8 devices), or a JSON "
        "file with seps, bandwidths (bytes/s) and device_memory_bytes",
    )
    p.add_argument(
        "--micro-batch-size",
        type=_positive_int,
        help="rows per micro-batch (dapple-tf: of the whole micro-batch; hpgo: per "
        "pipeline replica, default 1); default: the planner chooses",
    )
    p.add_argument("--cost-model", choices=COST_MODELS, default="dapple-tf")
    p.add_argument(
        "--schedule",
        choices=EXECUTABLE,
        help="default: the planner chooses (1f1b or gpipe; never an asynchronous schedule)",
    )
    p.add_argument(
        "--allow_async",
        action="store_true",
        help="accept an asynchronous --schedule (pipedream-2bw: one-step-stale weights, "
        "docs/async.md)",
    )
    p.add_argument(
        "--device-memory-gb",
        type=_positive_float,
        help="per-device memory, 1 GB = 1e9 bytes (default 16, or the cluster file's)",
    )
    p.add_argument(
        "--optimizer-slots",
        type=float,
        default=2.0,
        help="optimizer state per parameter, in parameter copies (Adam 2, momentum 1)",
    )
    p.add_argument("--intra-host-gbps", type=_positive_float, help="p2p GB/s inside a host (25)")
    p.add_argument("--inter-host-gbps", type=_positive_float, help="p2p GB/s between hosts (1)")
    p.add_argument(
        "--allreduce-gbps", type=_positive_float, help="allreduce GB/s between hosts (3)"
    )
    p.add_argument("--out", help="write the plan JSON here")
    p.add_argument("--json", action="store_true", help="print only the plan JSON to stdout")
    c = sub.add_parser("convert", help="convert a profile between graph.txt and JSON")
    c.add_argument("src")
    c.add_argument("dst", help="*.json writes our JSON, anything else graph.txt")
    c.add_argument("--profile-batch-size", type=_positive_int)
    k = sub.add_parser(
        "schedule", help="print a schedule's action lists per device group and a timeline"
    )
    k.add_argument("--schedule", required=True, choices=list(schedules.SCHEDULES))
    k.add_argument("--stages", type=_positive_int, required=True)
    k.add_argument("--micro-batches", type=_positive_int, required=True)
    k.add_argument(
        "--chunks",
        type=_positive_int,
        default=1,
        help="stages per device group (interleaved-1f1b; stage s on group s mod stages/chunks)",
    )
    return parser


def _cluster_from_arg(text: str) -> Cluster:
    if text.strip().endswith(".json"):
        return Cluster.load(text.strip())
    return Cluster.from_seps(text)


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def summary(result: Plan, profile: Profile) -> str:
    p = result.predicted
    desc = {l.name: (l.description or l.name) for l in profile.layers}
    lines = [
        f"plan {result.notation}  ({p.get('cost_model')} cost model, schedule {result.schedule})"
    ]
    if p.get("cost_model") == "hpgo":
        h = p["hpgo"]
        lines.append(
            f"  {h['rp']} pipeline replica(s) x {h['micro_batches_per_pipeline']} micro-batches "
            f"of {h['mbs']} row(s); as a runtime plan: {result.num_micro_batches} "
            f"micro-batches of {h['rp'] * h['mbs']} rows"
        )
        lines.append(
            f"  bottleneck {h['bottleneck_s']:.5f} s, block {h['block_s']:.5f} s, "
            f"latency {h['latency_s']:.5f} s, allreduce overhang {h['delta_s']:.5f} s"
        )
        if h.get("states_note"):
            lines.append(f"  note: {h['states_note']}")
    else:
        lines.append(
            f"  M = {result.num_micro_batches} micro-batches of "
            f"{p.get('micro_batch_size')} rows, bubble {p.get('bubble_fraction', 0):.1%}"
        )
        choice = p.get("schedule_choice")
        if choice:
            lines.append(f"  schedule {result.schedule}: {choice['why']}")
    for s, stage in enumerate(result.stages):
        first, last = desc[stage.layers[0]], desc[stage.layers[-1]]
        mem = p.get("peak_memory_bytes") or []
        mem_text = f", peak memory {_gb(mem[s])}/device" if s < len(mem) else ""
        devs = stage.devices
        dev_text = (
            f"{devs[0]}-{devs[-1]}"
            if list(devs) == list(range(devs[0], devs[-1] + 1))
            else ",".join(map(str, devs))
        )
        lines.append(
            f"  stage {s}: {len(stage.layers)} layers ({first} .. {last}) on "
            f"{len(devs)} device(s) [{dev_text}]{mem_text}"
        )
    lines.append(
        f"  predicted step time {p['step_time_s']:.5f} s, speedup {p['speedup']:.4f} "
        f"(data-parallel baseline {p['dp_speedup']:.4f})"
    )
    if not p.get("executable", True):
        lines.append(f"  NOT EXECUTABLE by the runtime: {p.get('not_executable_because')}")
    lines.append(f"  planned in {p.get('time_to_plan_s', 0):.3f} s")
    return "\n".join(lines)


def _run_plan(args) -> int:
    cluster = _cluster_from_arg(args.cluster)
    if args.schedule in ASYNC and not args.allow_async:
        raise PlanError(
            f"--schedule {args.schedule} is asynchronous (one-step-stale weights, "
            f"docs/async.md): pass --allow_async to plan for it"
        )
    profile = Profile.load(args.profile, args.profile_batch_size)
    result = plan(
        profile,
        cluster,
        args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        cost_model=args.cost_model,
        schedule=args.schedule,
        device_memory_gb=args.device_memory_gb,
        optimizer_slots=args.optimizer_slots,
        intra_host_bandwidth=args.intra_host_gbps and args.intra_host_gbps * GB,
        inter_host_bandwidth=args.inter_host_gbps and args.inter_host_gbps * GB,
        inter_host_allreduce_bandwidth=args.allreduce_gbps and args.allreduce_gbps * GB,
        allow_async=args.allow_async,
    )
    text = result.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(summary(result, profile))
        if args.out:
            print(f"  plan written to {args.out}")
    return 0


def _run_convert(args) -> int:
    from planner.graph_txt import write_graph_txt

    profile = Profile.load(args.src, args.profile_batch_size)
    if args.dst.endswith(".json"):
        profile.save_json(args.dst)
    else:
        write_graph_txt(profile, args.dst)
    print(f"wrote {len(profile.layers)} layers to {args.dst}")
    return 0


def _run_schedule(args) -> int:
    lists = schedules.action_lists(args.schedule, args.stages, args.micro_batches, args.chunks)
    report = schedules.check_schedule(lists, args.stages, args.micro_batches)
    print(
        f"{args.schedule}: {args.stages} stages on {len(lists)} device group(s), "
        f"{args.micro_batches} micro-batches"
    )
    print(schedules.format_lists(lists))
    peaks = " ".join(str(p) for p in report.peak_in_flight)
    print(f"peak in-flight micro-batches per group, summed over its stages: {peaks}")
    print()
    print(schedules.format_timeline(lists, args.stages))
    if args.schedule not in EXECUTABLE:
        print(f"note: the rewriter runs only {', '.join(EXECUTABLE)} so far")
    return 0


COMMANDS = {"plan": _run_plan, "convert": _run_convert, "schedule": _run_schedule}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ProfileError, PlanError, ClusterError, ScheduleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
