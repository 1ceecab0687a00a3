"""Predicted against measured step time, and one re-plan from measured stage times (issue #14).

`train.py` times its first steps; `StepTimer` says when enough are in and gives their median.
`prediction_report` is the line it logs (the plan's predicted step time beside the measured one).
With `--calibrate` an auto plan is re-planned once: one traced step gives each stage's busy
time (`stage_busy_s`), each stage's layers are scaled so that the profile agrees with the
measurement (`calibrated_profile`), and the planner runs again on that profile and the same
cluster (both kept in the auto plan's `predicted`).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Sequence

from dapple_tf.memory import CLONE
from planner.plan_format import Plan
from planner.profile import Profile

# Steps timed before predicted and measured are compared; the first step (graph warm-up) is not.
TIMED_STEPS = 5


@dataclasses.dataclass
class StepTimer:
    """Step times after the first; `ready` once `wanted` of them are in."""

    wanted: int = TIMED_STEPS
    seen: int = 0
    seconds: list = dataclasses.field(default_factory=list)

    def add(self, seconds: float) -> bool:
        """Records one step; True exactly once, when the wanted steps are in."""
        self.seen += 1
        if self.seen > 1 and len(self.seconds) < self.wanted:
            self.seconds.append(seconds)
            return self.ready
        return False

    @property
    def ready(self) -> bool:
        return len(self.seconds) == self.wanted

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def prediction_report(plan: Plan, measured_s: float, steps: int) -> str:
    predicted = plan.predicted.get("step_time_s")
    if not predicted:
        return (
            f"measured step time {measured_s * 1e3:.2f} ms (median of {steps} steps); plan "
            f"{plan.notation} carries no prediction"
        )
    return (
        f"predicted step time {predicted * 1e3:.2f} ms ({plan.predicted.get('cost_model')} "
        f"cost model), measured {measured_s * 1e3:.2f} ms (median of {steps} steps): "
        f"error {(predicted - measured_s) / measured_s:+.0%}"
    )


def record_measurement(plan: Plan, measured_s: float, steps: int) -> None:
    """Adds `measured` to the plan's predicted dict (written to plan.json with it)."""
    plan.predicted["measured"] = {"step_time_s": measured_s, "steps": steps}


def stage_busy_s(run_metadata, num_stages: int) -> list[float]:
    """Seconds of op time per stage in one traced step, summed over the stage's micro-batches
    and replicas (clone ops `dapple/mb<i>/s<stage>r<replica>/...`)."""
    busy = collections.Counter()
    for dev in run_metadata.step_stats.dev_stats:
        for node in dev.node_stats:
            match = CLONE.match(node.node_name)
            if match and int(match.group(1)) < num_stages:
                busy[int(match.group(1))] += node.all_end_rel_micros
    return [busy[s] / 1e6 for s in range(num_stages)]


def stage_factors(
    predicted_stage_s: Sequence[float],
    measured_busy_s: Sequence[float],
    predicted_step_s: float,
    measured_step_s: float,
) -> list[float]:
    """Per stage, measured over predicted work: the whole step's ratio, split among the stages
    by their shares of the traced busy time against their predicted shares."""
    overall = measured_step_s / predicted_step_s
    total_pred, total_busy = sum(predicted_stage_s), sum(measured_busy_s)
    if total_pred <= 0 or total_busy <= 0:
        return [overall] * len(predicted_stage_s)
    return [
        overall * (busy / total_busy) / (pred / total_pred) if pred > 0 else overall
        for pred, busy in zip(predicted_stage_s, measured_busy_s)
    ]


def calibrated_profile(profile: Profile, plan: Plan, factors: Sequence[float]) -> Profile:
    """`profile` with the times of each stage's layers multiplied by that stage's factor."""
    if len(factors) != plan.num_stages:
        raise ValueError(f"expected one factor per stage ({plan.num_stages}), found {len(factors)}")
    factor_of = {name: factors[s] for s, stage in enumerate(plan.stages) for name in stage.layers}
    times = (
        "forward_ms",
        "backward_ms",
        "forward_fixed_ms",
        "forward_per_row_ms",
        "backward_fixed_ms",
        "backward_per_row_ms",
        "apply_ms",
    )
    layers = []
    for layer in profile.layers:
        k = factor_of.get(layer.name, 1.0)
        layers.append(
            dataclasses.replace(
                layer, **{t: getattr(layer, t) * k for t in times if getattr(layer, t) is not None}
            )
        )
    return dataclasses.replace(profile, layers=tuple(layers))


def replan(plan: Plan, run_metadata, measured_step_s: float) -> tuple[Plan, list[float]]:
    """The auto plan re-planned from the stage times of one traced step; (new plan, factors).
    Needs the profile and cluster the auto plan recorded in `predicted`."""
    import planner
    from planner.cluster import Cluster

    if "profile" not in plan.predicted or "cluster" not in plan.predicted:
        raise ValueError(
            "--calibrate re-plans an auto plan from its recorded profile and "
            "cluster; this plan has none (use --dapple_plan=auto)"
        )
    profile = Profile.from_dict(plan.predicted["profile"], "the plan's recorded profile")
    cluster = Cluster.from_dict(plan.predicted["cluster"], "the plan's recorded cluster")
    predicted_stage_s = [
        plan.num_micro_batches * (f + b)
        for f, b in zip(plan.predicted["stage_forward_s"], plan.predicted["stage_backward_s"])
    ]
    # the trace sums every replica; the prediction is per replica
    busy = [
        b / plan.stages[s].num_replicas
        for s, b in enumerate(stage_busy_s(run_metadata, plan.num_stages))
    ]
    factors = stage_factors(predicted_stage_s, busy, plan.predicted["step_time_s"], measured_step_s)
    calibrated = calibrated_profile(profile, plan, factors)
    new = planner.plan(
        calibrated,
        cluster,
        plan.global_batch_size,
        cost_model=plan.predicted.get("cost_model", "runtime"),
    )
    new.predicted["profile"] = calibrated.to_dict()
    new.predicted["cluster"] = cluster.to_dict()
    new.predicted["calibration"] = {
        "stage_factors": factors,
        "before": {
            "notation": plan.notation,
            "num_micro_batches": plan.num_micro_batches,
            "predicted_step_time_s": plan.predicted["step_time_s"],
            "measured_step_time_s": measured_step_s,
        },
    }
    return new, factors
