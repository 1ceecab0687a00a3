"""`planner.plan(...)`: profile + cluster + global batch size -> the best Plan, explained."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from planner.cluster import GB, Cluster, ClusterError
from planner.dapple_cost import DappleModel
from planner.dapple_search import OTHER_SCHEDULE_MARGIN, DappleSearch, schedule_label
from planner.hpgo import HpgoModel
from planner.hpgo_search import HpgoSearch
from planner.plan_format import Plan, PlanError, Stage
from planner.profile import Profile, ProfileError
from planner.runtime_cost import RuntimeModel
from planner.schedules import ASYNC, EXECUTABLE, in_flight_peaks
from planner.states import hpgo_states

COST_MODELS = ("dapple-tf", "hpgo", "runtime")


def _as_profile(profile, profile_batch_size) -> Profile:
    if isinstance(profile, Profile):
        if profile_batch_size is not None and profile_batch_size != profile.batch_size:
            raise ProfileError(
                f"profile batch size is {profile.batch_size} but "
                f"profile_batch_size={profile_batch_size} was given"
            )
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return Profile.load(profile, profile_batch_size)
    raise ProfileError(f"expected a Profile or a path to one, got {type(profile).__name__}")


def _as_cluster(cluster, num_devices, device_memory_gb, bandwidths) -> Cluster:
    if cluster is None:
        if num_devices is None:
            raise ClusterError(
                "give a cluster (e.g. [8, 16] or Cluster.from_seps([8, 16])) or num_devices"
            )
        cluster = Cluster.from_seps([int(num_devices)])
    elif isinstance(cluster, (str, list, tuple)):
        cluster = Cluster.from_seps(cluster)
    elif not isinstance(cluster, Cluster):
        raise ClusterError(
            f"expected a Cluster, seps like [8, 16] or '8,16', got {type(cluster).__name__}"
        )
    overrides = {k: v for k, v in (bandwidths or {}).items() if v is not None}
    if device_memory_gb is not None:
        overrides["device_memory_bytes"] = float(device_memory_gb) * GB
    if overrides:
        cluster = dataclasses.replace(cluster, **overrides)
    if num_devices is not None and int(num_devices) != cluster.num_devices:
        raise ClusterError(
            f"num_devices={num_devices} but the cluster {list(cluster.seps)} has "
            f"{cluster.num_devices} devices"
        )
    return cluster


def plan(
    profile: Profile | str | os.PathLike,
    cluster: Cluster | Sequence[int] | str | None = None,
    global_batch_size: int | None = None,
    *,
    num_devices: int | None = None,
    profile_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    cost_model: str = "dapple-tf",
    schedule: str | None = None,
    device_memory_gb: float | None = None,
    optimizer_slots: float = 2.0,
    intra_host_bandwidth: float | None = None,
    inter_host_bandwidth: float | None = None,
    inter_host_allreduce_bandwidth: float | None = None,
    use_all_devices: bool = False,
    allow_async: bool = False,
) -> Plan:
    """The best hybrid pipeline/data-parallel plan for `profile` on `cluster`.

    cost_model "dapple-tf" (default): plans the runtime can execute, memory-checked against the
    device memory (default 16 GB, or the cluster's), step time simulated for the schedule
    (`schedule=None` chooses among the schedules the rewriter runs, see
    `planner.dapple_search.SEARCHED_SCHEDULES`) and micro-batch size (`None` chooses).
    cost_model "hpgo": the published DAPPLE planner's scoring, for comparison; its plans may not
    be executable (then `plan.executable` is False and predicted["executable"] says why).
    cost_model "runtime": this project's runtime as it really runs (`planner.runtime_cost`):
    fixed cost per micro-batch, accumulation, transfer latency, devices sharing a processor;
    it may choose fewer devices than the cluster has (one device, one micro-batch included)
    unless `use_all_devices` (multi-rank runs need a slot on every rank).
    An asynchronous schedule (`planner.schedules.ASYNC`, pipedream-2bw) only with
    `allow_async`; the search itself never chooses one (it compares the synchronous
    schedules; an asynchronous schedule is planned only when named, with 1F1B's step model).
    `predicted` holds step_time_s, speedup, dp_speedup, peak_memory_bytes (per stage), and more.
    """
    started = time.perf_counter()
    if cost_model not in COST_MODELS:
        raise PlanError(f"cost_model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
    if schedule is not None and schedule not in EXECUTABLE:
        raise PlanError(
            f"schedule must be one of {', '.join(EXECUTABLE)} (or None to choose), got {schedule!r}"
        )
    if schedule in ASYNC and not allow_async:
        raise PlanError(
            f"schedule '{schedule}' is asynchronous (its steps use one-step-stale weights, "
            f"docs/async.md); pass allow_async=True to plan for it"
        )
    if (
        not isinstance(global_batch_size, int)
        or isinstance(global_batch_size, bool)
        or global_batch_size <= 0
    ):
        raise PlanError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if micro_batch_size is not None:
        if not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
            raise PlanError(
                f"micro_batch_size must be a positive integer, got {micro_batch_size!r}"
            )
        if cost_model == "dapple-tf" and global_batch_size % micro_batch_size:
            raise PlanError(
                f"micro_batch_size {micro_batch_size} does not divide the global batch "
                f"size {global_batch_size}"
            )
    if optimizer_slots < 0:
        raise PlanError(f"optimizer_slots must be >= 0, got {optimizer_slots}")
    prof = _as_profile(profile, profile_batch_size)
    if not prof.layers:
        raise ProfileError("profile has no layers")
    prof.validate()
    names = prof.layer_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ProfileError(f"profile layer names must be unique; repeated: {dup}")
    clu = _as_cluster(
        cluster,
        num_devices,
        device_memory_gb,
        {
            "intra_host_bandwidth": intra_host_bandwidth,
            "inter_host_bandwidth": inter_host_bandwidth,
            "inter_host_allreduce_bandwidth": inter_host_allreduce_bandwidth,
        },
    )
    if cost_model == "hpgo":
        result = _plan_hpgo(prof, clu, global_batch_size, micro_batch_size or 1, optimizer_slots)
    else:
        result = _plan_dapple(
            prof,
            clu,
            global_batch_size,
            micro_batch_size,
            schedule,
            optimizer_slots,
            runtime=cost_model == "runtime",
            use_all_devices=use_all_devices,
        )
    result.predicted["time_to_plan_s"] = round(time.perf_counter() - started, 4)
    return result


def _describe_cuts(states, ends) -> list[str]:
    return [states.labels[e] for e in ends[:-1]]


def _plan_dapple(
    prof, clu, gbs, mbs, schedule, optimizer_slots, runtime=False, use_all_devices=False
) -> Plan:
    model = (RuntimeModel if runtime else DappleModel)(prof, clu, gbs, optimizer_slots)
    search = DappleSearch(
        model,
        micro_batch_size=mbs,
        schedule=schedule,
        every_micro_batch_size=runtime,
        use_all_devices=use_all_devices,
    )
    best = search.run()
    if best is None:
        need = search.smallest_memory()
        what = f"micro-batch size {mbs}" if mbs else "any micro-batch size"
        if need == float("inf"):
            raise PlanError(
                f"no executable plan for global batch {gbs} on {clu.num_devices} devices "
                f"with {what}"
            )
        raise PlanError(
            f"no plan fits in {clu.device_memory_bytes / GB:g} GB per device (global batch {gbs}, "
            f"{what}, optimizer slots {optimizer_slots:g}); the smallest plan needs "
            f"{need / GB:.3f} GB per device: raise --device-memory-gb to at least "
            f"{need / GB:.3f}, or lower the global/micro batch size"
        )
    ev = best.eval
    layers = model.states.stage_layers(prof, list(best.ends))
    stages = tuple(Stage(tuple(l), d) for l, d in zip(layers, best.devices))
    predicted = {
        "cost_model": "runtime" if runtime else "dapple-tf",
        "step_time_s": ev.step_time_s,
        "speedup": ev.speedup,
        "dp_speedup": model.dp_speedup(clu.num_devices),
        "peak_memory_bytes": [float(x) for x in ev.peak_memory_bytes],
        "device_memory_bytes": clu.device_memory_bytes,
        "micro_batch_size": best.micro_batch_size,
        "single_device_step_s": model.single_device_s,
        "bubble_fraction": ev.bubble_fraction,
        "stage_forward_s": list(ev.forward_s),
        "stage_backward_s": list(ev.backward_s),
        "boundary_transfer_s": list(ev.transfer_s),
        "allreduce_s": list(ev.allreduce_s),
        "cuts_after": _describe_cuts(model.states, best.ends),
        "executable": True,
        "search": {"simulated": search.stats.simulated, "exhaustive": search.stats.exhaustive},
        "schedule_choice": _schedule_choice(search, best),
    }
    return Plan(gbs, gbs // best.micro_batch_size, best.schedule, stages, predicted)


def _schedule_choice(search: DappleSearch, best) -> dict:
    """Which schedules were compared on the chosen layout, their predicted steps, and why the
    plan's schedule won (the plan file's answer to "why this schedule")."""
    times = search.schedule_comparison(best)
    chosen = schedule_label(best.schedule, len(best.ends), len(best.base[0]))
    if len(times) == 1:
        return {"predicted_step_s": times, "chosen": chosen, "why": f"{chosen} was asked for"}
    fitting = {k: t for k, t in times.items() if t is not None}
    fastest = min(fitting, key=fitting.get)
    margin = f"{OTHER_SCHEDULE_MARGIN * 100:g}%"
    others = ", ".join(
        f"{k} {t:.4g} s" if t is not None else f"{k} does not fit"
        for k, t in times.items()
        if k not in (chosen, fastest)
    )
    if fastest == chosen:
        why = f"{chosen} has the shortest predicted step on this layout ({fitting[chosen]:.4g} s)"
    else:
        why = (
            f"{fastest} is predicted {fitting[fastest]:.4g} s against {chosen}'s "
            f"{fitting[chosen]:.4g} s, less than {margin} faster"
        )
    why += f"; others: {others or 'none'}; a schedule other than 1f1b must be {margin} faster"
    return {"predicted_step_s": times, "chosen": chosen, "why": why}


def _plan_hpgo(prof, clu, gbs, mbs, optimizer_slots) -> Plan:
    states = hpgo_states(prof)
    model = HpgoModel(states, clu, prof.batch_size, gbs)
    if gbs // mbs < 1:
        raise PlanError(f"global batch {gbs} is smaller than the micro-batch size {mbs}")
    search = HpgoSearch(model, mbs=mbs)
    hp, score = search.run()
    layers = states.stage_layers(prof, list(hp.ends))
    stages = tuple(Stage(tuple(l), d) for l, d in zip(layers, hp.devices))
    M = max(score.num_micro_batches, 1)
    rows = hp.rp * mbs
    problems = []
    if gbs != M * rows:
        problems.append(f"{M} micro-batches of {rows} rows cover {M * rows} of the {gbs} rows")
    for s, d in enumerate(hp.devices):
        if rows % len(d):
            problems.append(f"stage {s}'s {len(d)} replicas do not divide a {rows}-row micro-batch")
    executable = not problems and gbs % M == 0
    # memory under our model (1f1b), for information: the published model applies no limit
    dm = DappleModel(prof, clu, gbs, optimizer_slots, states=states)
    in_flight = in_flight_peaks("1f1b", len(hp.ends), M)
    peak = [
        dm.stage_memory(b, e, len(d), rows, in_flight[s])
        for s, (b, e, d) in enumerate(zip(hp.begins, hp.ends, hp.devices))
    ]
    predicted = {
        "cost_model": "hpgo",
        "step_time_s": score.step_time_s,
        "speedup": score.speedup,
        "dp_speedup": model.dp_speedup(),
        "peak_memory_bytes": [float(x) for x in peak],
        "single_device_step_s": score.total_s,
        "hpgo": {
            "rp": hp.rp,
            "slots": list(hp.slots),
            "mbs": mbs,
            "micro_batches_per_pipeline": score.num_micro_batches,
            "bottleneck_s": score.bottleneck_s,
            "block_s": score.block_s,
            "latency_s": score.latency_s,
            "delta_s": score.delta_s,
            "stage_times_s": list(score.stage_times_s),
            "input_transfers_s": list(score.input_transfers_s),
            "two_stage_split_formula": hp.two_stage_split,
            "states": states.kind,
            "states_note": states.note,
            "search_notes": search.stats.notes,
            "candidates_scored": search.stats.candidates_scored,
        },
        "cuts_after": _describe_cuts(states, hp.ends),
        "executable": executable,
    }
    if not executable:
        predicted["not_executable_because"] = (
            "; ".join(problems) or f"global batch {gbs} does not divide into {M} micro-batches"
        )
    return Plan(gbs, M, "1f1b", stages, predicted, executable=executable)
