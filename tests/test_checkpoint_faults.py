"""Checkpoint faults of train.py runs: a truncated newest checkpoint, SIGTERM during training,
pruning, and summaries after a resume (dapple_tf.runner on GNMT-tiny, plan 1:1)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf import runner

REPO = Path(__file__).resolve().parents[1]


def config(model_dir, **overrides):
    values = {
        "model": "gnmt",
        "preset": "tiny",
        "dapple_plan": "1:1",
        "num_devices": 2,
        "model_dir": str(model_dir),
        "seed": 3,
    }
    values.update(overrides)
    return runner.TrainingConfig(**values)


def train(model_dir, **overrides):
    result = runner.run_training(config(model_dir, **overrides))
    weights = result["trainer"].get_weights()
    result["trainer"].close()
    return result, weights


def scalar_steps(model_dir, tag="loss"):
    """The steps of `tag` that TensorBoard shows: events in file order, and a SessionLog START
    at step s drops the points earlier runs wrote for steps >= s (TensorBoard's purge rule)."""
    points = []
    for path in sorted(Path(model_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if (
                event.HasField("session_log")
                and event.session_log.status == tf.compat.v1.SessionLog.START
            ):
                points = [(step, value) for step, value in points if step < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    points.append((event.step, value.simple_value))
    return points


@pytest.fixture(scope="module")
def truncated_then_resumed(tmp_path_factory):
    """Train 4 steps (a checkpoint every step, keep 2), truncate the newest checkpoint's data,
    then run on to step 5; also an uninterrupted 5-step run to compare with."""
    model_dir = tmp_path_factory.mktemp("faults") / "run"
    first, _ = train(model_dir, steps=4, save_every=1, keep_checkpoints=2)
    files_after_first = sorted(os.listdir(model_dir))
    data = model_dir / "ckpt-4.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    handler, absl_logger = _Capture(), logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
        resumed, resumed_weights = train(model_dir, steps=5, save_every=1, keep_checkpoints=2)
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    _, reference_weights = train(tmp_path_factory.mktemp("faults") / "reference", steps=5)
    return {
        "model_dir": model_dir,
        "first": first,
        "files_after_first": files_after_first,
        "resumed": resumed,
        "log": handler.lines,
        "resumed_weights": resumed_weights,
        "reference_weights": reference_weights,
    }


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


def test_pruning_keeps_the_newest_checkpoints(truncated_then_resumed):
    files = truncated_then_resumed["files_after_first"]
    assert sorted(f for f in files if f.startswith("ckpt-")) == [
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
        "ckpt-4.data-00000-of-00001",
        "ckpt-4.index",
    ]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(
    truncated_then_resumed,
):
    run = truncated_then_resumed
    warnings = [m for level, m in run["log"] if level == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint {run['model_dir'] / 'ckpt-4'} cannot be read (")
    assert ("INFO", f"resumed from {run['model_dir'] / 'ckpt-3'} at step 3") in run["log"]
    assert run["resumed"]["steps_run"] == 2 and run["resumed"]["global_step"] == 5


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(truncated_then_resumed):
    run = truncated_then_resumed
    for name, value in run["reference_weights"].items():
        np.testing.assert_allclose(
            run["resumed_weights"][name], value, rtol=1e-6, atol=1e-7, err_msg=name
        )


def test_summaries_show_each_step_once_after_a_resume(truncated_then_resumed):
    steps = [step for step, _ in scalar_steps(truncated_then_resumed["model_dir"])]
    assert steps == [1, 2, 3, 4, 5]


def test_a_run_already_at_its_last_step_says_so(truncated_then_resumed, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    result, _ = train(truncated_then_resumed["model_dir"], steps=5)
    assert result["steps_run"] == 0
    assert "step 5 already reaches --steps=5: nothing to train" in caplog.text


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_the_resumed_run_is_exact(tmp_path):
    model_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "--model=gnmt",
        "--dapple_plan=1:1",
        "--num_devices=2",
        "--seed=3",
        "--steps=100000",
        "--save_every=100000",
        f"--model_dir={model_dir}",
    ]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stderr:
        lines.append(line)
        if "step 3  loss" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-20:])
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines[-20:])
    log = "".join(lines)
    assert "Traceback" not in log
    stopped = [line for line in lines if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, log[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step >= 3
    assert (
        tf.train.load_checkpoint(str(model_dir / f"ckpt-{step}")).get_tensor("global_step") == step
    )

    resumed, resumed_weights = train(model_dir, steps=step + 2)
    assert resumed["steps_run"] == 2
    _, reference_weights = train(tmp_path / "reference", steps=step + 2)
    for name, value in reference_weights.items():
        np.testing.assert_allclose(resumed_weights[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_sigterm_to_horovodrun_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path):
    from tests.multirank.runner import horovod_missing_reason, horovodrun_path

    if horovod_missing_reason():
        pytest.skip(horovod_missing_reason())
    model_dir = tmp_path / "run"
    command = [
        horovodrun_path(),
        "--gloo",
        "-np",
        "2",
        "-H",
        "localhost:2",
        sys.executable,
        str(REPO / "train.py"),
        "--model=gnmt",
        "--dapple_plan=1:1",
        "--steps=100000",
        "--save_every=100000",
        f"--model_dir={model_dir}",
    ]
    env = dict(os.environ, HOROVOD_DYNAMIC_PROCESS_SETS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
    )
    lines = []
    deadline = time.monotonic() + 400
    for line in process.stdout:
        lines.append(line)
        if "step 3  loss" in line:
            process.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines[-20:])
    lines += process.stdout.readlines()
    process.wait(timeout=120)
    stopped = [line for line in lines if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, "".join(lines[-30:])  # rank 0 reports for all
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    # the checkpoint is merged from both ranks' shards: both stopped after `step` and saved
    assert json.loads((model_dir / "checkpoint.json").read_text())["step"] == step
    assert len(list(model_dir.glob(f"ckpt-{step}.data-*"))) == 2
    assert (
        tf.train.load_checkpoint(str(model_dir / f"ckpt-{step}")).get_tensor("global_step") == step
    )
