"""The executed order of forward/backward tasks on each device equals the schedule.

Read from the RunMetadata of a real traced step: every action has explicit boundary ops, and the
start time of those ops orders the actions of a stage."""

import re

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import Trainer
from graph_rewrite.template import build_template
from planner.plan_format import even_plan
from planner.schedules import Action, action_lists, format_actions

BOUNDARY = re.compile(r"^dapple/mb(\d+)/s(\d+)_to_s(\d+)/(send|recv)(_r\d+)?$")
W_CALL = re.compile(r"^dapple/mb(\d+)/s(\d+)r0/wgrad/")


def action_times(run_metadata, num_stages, backward="B", replica_suffix=""):
    """stage -> {action: start micros} from the boundary ops of the traced step. Stage s's F(i)
    is its forward recv (stage 0: its forward send); B(i) (or I(i): `backward`) its gradient
    recv (last stage: its gradient send). `replica_suffix`: "_r0" reads replica 0's ops of
    stages with several replicas."""
    start = {}
    for dev in run_metadata.step_stats.dev_stats:
        for node in dev.node_stats:
            match = BOUNDARY.match(node.node_name)
            if match and (match.group(5) or "") == replica_suffix:
                start[node.node_name] = node.all_start_micros
    times = {s: {} for s in range(num_stages)}
    for name, micros in start.items():
        i, a, b, kind, _ = BOUNDARY.match(name).groups()
        i, a, b = int(i), int(a), int(b)
        if a < b and kind == "recv":
            times[b][Action("F", b, i)] = micros
        if a < b and kind == "send" and a == 0:
            times[0][Action("F", 0, i)] = micros
        if a > b and kind == "recv":
            times[b][Action(backward, b, i)] = micros
        if a > b and kind == "send" and a == num_stages - 1:
            times[a][Action(backward, a, i)] = micros
    return times


def w_intervals(run_metadata):
    """(stage, micro-batch) -> (first start, last end) micros of the ops of replica 0's W call
    (`dapple/mb<i>/s<s>r0/wgrad/...`, its inlined body)."""
    spans = {}
    for dev in run_metadata.step_stats.dev_stats:
        for node in dev.node_stats:
            match = W_CALL.match(node.node_name)
            if match:
                key = (int(match.group(2)), int(match.group(1)))
                start, end = node.all_start_micros, node.all_start_micros + node.all_end_rel_micros
                lo, hi = spans.get(key, (start, end))
                spans[key] = (min(lo, start), max(hi, end))
    return spans


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_each_stage_executes_its_forward_and_backward_tasks_in_schedule_order(schedule):
    case = models.MLP
    layers = build_template(case.model_fn, case.feature_spec).layers
    num_stages, num_micro_batches, gbs = 4, 8, 32
    plan = even_plan(layers, [1] * num_stages, gbs, num_micro_batches, schedule)
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
        plan,
        gbs,
        seed=1,
    )
    batch = case.make_batch(np.random.default_rng(0), gbs)
    trainer.train_step(batch)
    _, metadata = trainer.traced_step(batch)
    times = action_times(metadata, num_stages)
    expected = action_lists(schedule, num_stages, num_micro_batches)
    for s in range(num_stages):
        assert len(times[s]) == 2 * num_micro_batches, f"stage {s}: {sorted(times[s])}"
        executed = sorted(times[s], key=times[s].get)
        assert format_actions(executed) == format_actions(expected[s]), f"stage {s}"


def test_zb_h1_runs_each_w_after_its_i_and_before_the_next_action_of_its_list():
    """4 stages, M = 8, zb-h1: F and I in list order (boundary ops, as above); every op of W(i)
    starts after I(i) started and ends before the action after W(i) in the stage's list
    starts, so the W's sit where the list puts them."""
    case = models.MLP
    layers = build_template(case.model_fn, case.feature_spec).layers
    num_stages, num_micro_batches, gbs = 4, 8, 32
    plan = even_plan(layers, [1] * num_stages, gbs, num_micro_batches, "zb-h1")
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
        plan,
        gbs,
        seed=1,
    )
    batch = case.make_batch(np.random.default_rng(0), gbs)
    trainer.train_step(batch)
    _, metadata = trainer.traced_step(batch)
    times = action_times(metadata, num_stages, backward="I")
    spans = w_intervals(metadata)
    expected = trainer.rewritten.schedule  # zb-h1's lists, held-back counts memory-bounded
    for s in range(num_stages):
        assert len(times[s]) == 2 * num_micro_batches, f"stage {s}: {sorted(times[s])}"
        executed = sorted(times[s], key=times[s].get)
        assert format_actions(executed) == format_actions(
            [a for a in expected[s] if a.kind != "W"]
        ), f"stage {s}"
        for k, action in enumerate(expected[s]):
            if action.kind != "W":
                continue
            first, last = spans[(s, action.micro_batch)]
            assert first >= times[s][Action("I", s, action.micro_batch)], action
            if k + 1 < len(expected[s]):
                following = expected[s][k + 1]
                if following.kind == "W":  # two W's in a row: the next one's first op
                    assert last <= spans[(s, following.micro_batch)][0], (action, following)
                else:
                    assert last <= times[s][following], (action, following)


@pytest.mark.parametrize("replicas", [[1, 1], [2, 2]], ids=["2-devices", "2-groups-of-2"])
def test_each_device_executes_its_groups_interleaved_list_in_order(replicas):
    """interleaved-1f1b, 4 stages in 2 chunks on 2 device groups, M = 4: each device runs the
    actions of its two stages in the order of its group's list (the boundary ops of replica 0,
    as above, merged over the group's stages)."""
    case = models.MLP
    layers = build_template(case.model_fn, case.feature_spec).layers
    num_stages, chunks, num_micro_batches, gbs = 4, 2, 4, 32
    plan = even_plan(layers, replicas, gbs, num_micro_batches, "interleaved-1f1b", chunks)
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
        plan,
        gbs,
        seed=1,
    )
    batch = case.make_batch(np.random.default_rng(0), gbs)
    trainer.train_step(batch)
    _, metadata = trainer.traced_step(batch)
    times = action_times(metadata, num_stages, replica_suffix="_r0" if replicas[0] > 1 else "")
    expected = action_lists("interleaved-1f1b", num_stages, num_micro_batches, chunks)
    for g, actions in enumerate(expected):
        group_times = {
            a: t for s in range(g, num_stages, len(replicas)) for a, t in times[s].items()
        }
        assert len(group_times) == len(actions), f"group {g}: {sorted(group_times)}"
        executed = sorted(group_times, key=group_times.get)
        assert format_actions(executed) == format_actions(actions), f"group {g}"
