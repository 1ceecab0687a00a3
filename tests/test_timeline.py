"""Timeline: tasks from step stats, bubble fraction, Gantt chart and Chrome trace of a step."""

import json

import pytest
from tensorflow.core.framework import step_stats_pb2
from tensorflow.core.protobuf import config_pb2

from dapple_tf import timeline
from planner import schedules
from planner.schedules import Action

pytestmark = pytest.mark.timeout(120)

DEVICES = [
    "/job:localhost/replica:0/task:0/device:CPU:0",
    "/job:localhost/replica:0/task:0/device:CPU:1",
]


def simulated_step_stats(lists, forward_us, backward_us, transfer_us=0, t0=1_000_000):
    """Step stats of a pipeline running `lists` (one action list per stage, stage s on DEVICES[s])
    where each action starts when its stage is free and its input has arrived. Each action is two
    ops named like the rewriter names them; each stage boundary is a send and a recv op."""
    num_stages = len(lists)
    stats = step_stats_pb2.StepStats()
    devs = [stats.dev_stats.add(device=d) for d in DEVICES[:num_stages]]
    done, free, position = {}, [t0] * num_stages, [0] * num_stages

    def node(dev, name, op_type, start, end):
        n = devs[dev].node_stats.add(
            node_name=name,
            all_start_micros=start,
            op_start_rel_micros=0,
            op_end_rel_micros=end - start,
            all_end_rel_micros=end - start,
        )
        n.timeline_label = f"{name} = {op_type}(x)"

    total = sum(len(a) for a in lists)
    while len(done) < total:
        for s in range(num_stages):
            if position[s] == len(lists[s]):
                continue
            kind, _, i = lists[s][position[s]]
            dep = (s - 1, ("F", i)) if kind == "F" else (s + 1, ("B", i))
            if 0 <= dep[0] < num_stages and dep not in done:
                continue
            ready = max(free[s], done.get(dep, t0) + (transfer_us if dep in done else 0))
            if kind == "F" and s > 0:
                node(
                    s, f"dapple/mb{i}/s{s - 1}_to_s{s}/recv", "Identity", ready - transfer_us, ready
                )
            if kind == "B" and s < num_stages - 1:
                node(
                    s, f"dapple/mb{i}/s{s + 1}_to_s{s}/recv", "Identity", ready - transfer_us, ready
                )
            length = forward_us if kind == "F" else backward_us
            half = ready + length // 2
            if kind == "F":
                node(s, f"dapple/mb{i}/s{s}r0/fwd/layer_{s}/MatMul", "MatMul", ready, half)
                node(s, f"dapple/mb{i}/s{s}r0/fwd/layer_{s}/Relu", "Relu", half, ready + length)
            else:
                node(
                    s,
                    f"dapple/mb{i}/s{s}r0/bwd/gradients/layer_{s}/Relu_grad/ReluGrad",
                    "ReluGrad",
                    ready,
                    half,
                )
                node(
                    s,
                    f"dapple/mb{i}/s{s}r0/bwd/gradients/layer_{s}/MatMul_grad/MatMul",
                    "MatMul",
                    half,
                    ready + length,
                )
            end = ready + length
            if kind == "F" and s < num_stages - 1:
                node(s, f"dapple/mb{i}/s{s}_to_s{s + 1}/send", "Identity", end, end + 1)
            if kind == "B" and s > 0:
                node(s, f"dapple/mb{i}/s{s}_to_s{s - 1}/send", "Identity", end, end + 1)
            done[(s, (kind, i))] = end
            free[s] = end
            position[s] += 1
    end = max(free)
    for s in range(num_stages):
        node(
            s,
            "GradientDescent/update_w/ResourceApplyGradientDescent",
            "ResourceApplyGradientDescent",
            end + 10,
            end + 20,
        )
    node(0, "_SOURCE", "NoOp", t0 - 5, t0 - 4)
    return stats


STAGES, MICRO_BATCHES = 2, 4


@pytest.fixture(scope="module")
def one_f_one_b_tasks():
    lists = schedules.one_f_one_b(STAGES, MICRO_BATCHES)
    return lists, timeline.tasks_from_step_stats(
        simulated_step_stats(lists, 100, 200, transfer_us=5)
    )


def test_compute_tasks_per_device_follow_the_schedule(one_f_one_b_tasks):
    lists, tasks = one_f_one_b_tasks
    assert timeline.compute_order(tasks) == {DEVICES[s]: list(lists[s]) for s in range(STAGES)}


def test_each_action_is_one_task_spanning_its_ops(one_f_one_b_tasks):
    _, tasks = one_f_one_b_tasks
    f2 = [t for t in tasks if t.device == DEVICES[1] and t.kind == "F" and t.micro_batch == 2]
    assert len(f2) == 1 and f2[0].end_us - f2[0].start_us == 100 and f2[0].busy_us == 100


def test_transfers_and_apply_become_tasks(one_f_one_b_tasks):
    _, tasks = one_f_one_b_tasks
    sends = [
        (t.micro_batch, t.stage, t.to_stage)
        for t in tasks
        if t.kind == "transfer" and t.device == DEVICES[0]
    ]
    # device 0 sends activations of each micro-batch and receives each gradient
    assert sorted(sends) == sorted([(i, 0, 1) for i in range(4)] + [(i, 1, 0) for i in range(4)])
    assert [t.kind for t in tasks if t.kind == "apply"] == ["apply", "apply"]
    assert not any(t.kind == "F" and "SOURCE" in t.label for t in tasks)


def test_bubble_of_equal_forward_and_backward_is_the_theoretical_one():
    lists = schedules.one_f_one_b(STAGES, MICRO_BATCHES)
    tasks = timeline.tasks_from_step_stats(simulated_step_stats(lists, 100, 100))
    theory = timeline.theoretical_bubble(STAGES, MICRO_BATCHES)
    assert theory == pytest.approx(1 / 5)
    for device, fraction in timeline.bubble_fraction(tasks).items():
        assert fraction == pytest.approx(theory), device


def test_gpipe_and_1f1b_bubbles_differ_by_what_the_schedule_does_not_overlap():
    # With backward = 2 x forward, GPipe on 2 stages idles each stage one forward plus one
    # backward out of a window of (M+1) forwards and (M+1) backwards.
    tasks = timeline.tasks_from_step_stats(
        simulated_step_stats(schedules.gpipe(STAGES, MICRO_BATCHES), 100, 200)
    )
    window = (MICRO_BATCHES + 1) * 300
    for fraction in timeline.bubble_fraction(tasks).values():
        assert fraction == pytest.approx(300 / window)


def test_png_boxes_per_device_are_the_schedules_actions_in_order(one_f_one_b_tasks, tmp_path):
    lists, tasks = one_f_one_b_tasks
    path = tmp_path / "step.png"
    chart = timeline.render_png(tasks, str(path), title="2 stages, M=4, 1F1B")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    for s, device in enumerate(DEVICES):
        drawn = [label for label, _, _ in chart.rows[device] if label[0] in "FB"]
        assert drawn == schedules.format_actions(lists[s]).split()
        for (_, a0, a1), (_, b0, _) in zip(chart.rows[device], chart.rows[device][1:]):
            assert a0 <= b0
    # the 1 -> 0 gradient transfers of device 0 are drawn too
    assert sum(label == "1>0" for label, _, _ in chart.rows[DEVICES[0]]) == MICRO_BATCHES


def test_chrome_trace_has_one_event_per_task_and_names_devices(one_f_one_b_tasks):
    _, tasks = one_f_one_b_tasks
    trace = json.loads(json.dumps(timeline.chrome_trace(tasks)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(tasks)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == set(DEVICES)
    first = min(spans, key=lambda e: e["ts"])
    assert first["ts"] == 0 and first["name"] == "F0"


def test_cli_reads_the_saved_run_metadata_and_writes_png_and_trace(tmp_path, capsys):
    metadata = config_pb2.RunMetadata()
    metadata.step_stats.CopyFrom(simulated_step_stats(schedules.one_f_one_b(2, 4), 100, 100))
    (tmp_path / "trace_step_7.pb").write_bytes(metadata.SerializeToString())
    assert timeline.main(["--model_dir", str(tmp_path)]) == 0
    assert (tmp_path / "trace_step_7.png").exists()
    trace = json.loads((tmp_path / "trace_step_7.json").read_text())
    assert any(e["name"] == "B3" for e in trace["traceEvents"])
    printed = capsys.readouterr().out
    assert "0.200" in printed  # theoretical and measured bubble of 2 stages, M = 4


def test_stage_of_a_device_is_read_off_its_boundary_ops(one_f_one_b_tasks):
    _, tasks = one_f_one_b_tasks
    stages = {(t.device, t.stage) for t in tasks if t.kind in ("F", "B")}
    assert stages == {(DEVICES[0], 0), (DEVICES[1], 1)}


def test_rewriter_op_names_classify_into_kind_micro_batch_and_stage():
    c = timeline.classify
    assert c("dapple/mb3/s1r0/fwd/layer_2/MatMul", "MatMul") == ("F", 3, 1, None)
    assert c("dapple/mb3/s1r1/bwd/gradients/layer_2/MatMul_grad/MatMul", "MatMul") == (
        "B",
        3,
        1,
        None,
    )
    assert c("dapple/mb3/s1r0/igrad/gradients/layer_2/MatMul_grad/MatMul", "MatMul") == (
        "I",
        3,
        1,
        None,
    )
    assert c("dapple/mb3/s1r0/wgrad/gradients/layer_2/MatMul_grad/MatMul_1", "MatMul") == (
        "W",
        3,
        1,
        None,
    )
    assert c("dapple/mb3/s1r0/W_end", "NoOp") == ("W", 3, 1, None)
    assert c("dapple/mb0/s0_to_s1/send_r1", "IdentityN") == ("transfer", 0, 0, 1)
    assert c("dapple/mb2/s1_to_s0/k0_j1/strided_slice", "StridedSlice") == ("transfer", 2, 1, 0)
    assert c(
        "GradientDescent/update_w/ResourceApplyGradientDescent", "ResourceApplyGradientDescent"
    ) == ("apply", None, None, None)
    assert c("HorovodAllreduce_grads_0", "HorovodAllreduce") == ("allreduce", None, None, None)
    assert c("_SOURCE", "NoOp") is None


def test_device_stages_come_from_send_and_recv_endpoints():
    rec = timeline.OpRecord
    records = [
        rec("dapple/mb0/s0_to_s1/send", "A", 0, 1, 1),
        rec("dapple/mb0/s0_to_s1/recv_r1", "B", 1, 2, 1),
        rec("dapple/mb0/s0_to_s1/k0_j0/Slice", "C", 0, 1, 1),
    ]
    assert timeline.stages_from_transfers(records) == {"A": 0, "B": 1}


# ---- a real traced step of the pipelined Trainer ---------------------------------------------
REAL_LAYERS = ("embed", "block_0", "block_1", "head")


def _chain_model(features):
    import tensorflow as tf

    v1 = tf.compat.v1
    h = features["x"]
    for name in REAL_LAYERS[:-1]:
        with v1.variable_scope(name):
            h = tf.nn.relu(tf.matmul(h, v1.get_variable("w", [h.shape[-1], 64])))
    with v1.variable_scope(REAL_LAYERS[-1]):
        out = tf.matmul(h, v1.get_variable("w", [64, 1]))
        return tf.reduce_mean(tf.square(out - features["y"]))


def _traced_trainer_step(schedule_name):
    import numpy as np
    import tensorflow as tf
    from dapple_tf.trainer import Trainer
    from planner.plan_format import even_plan

    plan = even_plan(REAL_LAYERS, [1, 1], 16, MICRO_BATCHES, schedule_name)
    trainer = Trainer(
        _chain_model,
        {"x": ((32,), tf.float32), "y": ((1,), tf.float32)},
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
        plan,
        16,
        allow_async=schedule_name == "pipedream-2bw",
    )
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.standard_normal((16, 32)).astype(np.float32),
        "y": rng.standard_normal((16, 1)).astype(np.float32),
    }
    try:
        trainer.train_step(batch)
        _, metadata = trainer.traced_step(batch)
    finally:
        trainer.close()
    return timeline.tasks_from_step_stats(metadata.step_stats), trainer.rewritten.schedule


@pytest.mark.parametrize("schedule_name", ["1f1b", "gpipe", "zb-h1", "pipedream-2bw"])
def test_traced_trainer_step_runs_each_devices_actions_in_schedule_order(schedule_name, tmp_path):
    tasks, lists = _traced_trainer_step(schedule_name)  # the lists the graph runs
    assert timeline.compute_order(tasks) == {DEVICES[s]: list(lists[s]) for s in range(STAGES)}
    assert {(t.device, t.stage) for t in tasks if t.kind in timeline.COMPUTE} == {
        (DEVICES[0], 0),
        (DEVICES[1], 1),
    }
    # The picture shows the same: per device row, the F/B (F/I/W) boxes in schedule order.
    chart = timeline.render_png(tasks, str(tmp_path / "step.png"))
    for s, device in enumerate(DEVICES):
        drawn = [label for label, _, _ in chart.rows[device] if label[0] in "FBIW"]
        assert drawn == schedules.format_actions(lists[s]).split()
    for device, fraction in timeline.bubble_fraction(tasks).items():
        assert 0.0 <= fraction < 1.0, device
    assert any(t.kind == "apply" for t in tasks)


def test_a_backward_is_drawn_after_its_forward_even_when_its_gradient_seems_to_arrive_late():
    """Stage 0 of 2: B0's only ops that end after the recorded gradient arrival are none (the
    recv is recorded late), and one of its ops (a Fill) ran at the step's start; B0 must still
    start after F0 ends, at its real ops."""
    rec = timeline.OpRecord
    d0 = DEVICES[0]
    records = [
        (rec("dapple/mb0/s0r0/fwd/layer_0/MatMul", d0, 100, 200, 100), "MatMul", ()),
        (rec("dapple/mb0/s0_to_s1/send", d0, 200, 201, 1), "Identity", ()),
        (rec("dapple/mb0/s0r0/bwd/gradients/layer_0/Fill", d0, 10, 11, 1), "Fill", ()),
        (
            rec("dapple/mb0/s0r0/bwd/gradients/layer_0/MatMul_grad/MatMul", d0, 300, 400, 100),
            "MatMul",
            (),
        ),
        (rec("dapple/mb0/s1_to_s0/recv", d0, 500, 510, 10), "Identity", ()),
        (rec("dapple/mb0/s0_to_s1/recv", DEVICES[1], 201, 202, 1), "Identity", ()),
    ]
    tasks = timeline.tasks_from_records(records)
    boxes = {t.label: (t.start_us, t.end_us) for t in tasks if t.device == d0 and t.kind in "FB"}
    assert boxes == {"F0": (100, 200), "B0": (300, 400)}
    assert timeline.compute_order(tasks)[d0] == [Action("F", 0, 0), Action("B", 0, 0)]


def _bert_tiny_trace(schedule_name, tmp_path):
    """A traced step of BERT-tiny on 2 stages, M=4, through train.py's loop."""
    from dapple_tf import runner

    result = runner.run_training(
        runner.TrainingConfig(
            model="bert",
            preset="tiny",
            dapple_plan="1:1",
            schedule=schedule_name,
            num_devices=2,
            steps=2,
            trace_step=2,
            model_dir=str(tmp_path),
        )
    )
    result["trainer"].close()
    return result["plan"], timeline.load_run_metadata(timeline.trace_path(str(tmp_path), 2))


def test_bert_1f1b_chart_draws_each_devices_actions_in_schedule_order(tmp_path):
    plan, metadata = _bert_tiny_trace("1f1b", tmp_path)
    assert (plan.num_stages, plan.num_micro_batches) == (2, 4)
    # --trace_step=2 traced the step logged as "step 2" (the last one of --steps=2).
    assert sorted(p.name for p in tmp_path.glob("trace_step_*")) == ["trace_step_2.pb"]
    tasks = timeline.tasks_from_step_stats(metadata.step_stats)
    chart = timeline.render_png(tasks, str(tmp_path / "step.png"))
    lists = schedules.action_lists("1f1b", 2, 4)
    for s, device in enumerate(DEVICES):
        drawn = [label for label, _, _ in chart.rows[device] if label[0] in "FB"]
        assert drawn == schedules.format_actions(lists[s]).split(), device
        starts = {label: x0 for label, x0, _ in chart.rows[device]}
        ends = {label: x1 for label, _, x1 in chart.rows[device]}
        for i in range(4):
            assert starts[f"B{i}"] >= ends[f"F{i}"], (device, i)
