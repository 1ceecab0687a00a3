"""train.py end to end: plan, progress lines, checkpoints, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]


def _train_command(model_dir, *flags):
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--model=gnmt",
        "--preset=tiny",
        f"--model_dir={model_dir}",
        "--num_devices=3",
        *flags,
    ]


def _run(model_dir, *flags, timeout=600):
    result = subprocess.run(
        _train_command(model_dir, *flags), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout


def _latest_step(model_dir):
    path = Path(model_dir) / "checkpoint.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    process = subprocess.Popen(
        _train_command(model_dir, "--dapple_plan=2:1", "--steps=1000", "--save_every=2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 420
        while _latest_step(model_dir) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint written within 420 s"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved_step = _latest_step(model_dir)
    checkpoint = tf.train.load_checkpoint(str(model_dir / f"ckpt-{saved_step}"))
    assert checkpoint.get_tensor("global_step") == saved_step

    # Resume with zero steps left: the restored weights are exactly the checkpoint's.
    from dapple_tf import runner

    result = runner.run_training(
        runner.TrainingConfig(
            model="gnmt",
            preset="tiny",
            dapple_plan="2:1",
            num_devices=3,
            steps=saved_step,
            model_dir=str(model_dir),
        )
    )
    assert result["steps_run"] == 0
    assert result["global_step"] == saved_step
    weights = result["trainer"].get_weights()
    for name, value in weights.items():
        np.testing.assert_array_equal(value, checkpoint.get_tensor(name), err_msg=name)

    # Resume for real: the step counter continues from the checkpoint.
    log = _run(model_dir, "--dapple_plan=2:1", f"--steps={saved_step + 2}", "--save_every=2")
    assert f"resumed from {model_dir / f'ckpt-{saved_step}'} at step {saved_step}" in log
    assert f"step {saved_step + 1}  loss" in log and f"step {saved_step + 2}  loss" in log
    assert "step 1  loss" not in log
    assert _latest_step(model_dir) == saved_step + 2


@pytest.mark.slow
def test_auto_plan_run_logs_plan_and_progress_and_writes_plan_json(tmp_path):
    log = _run(tmp_path, "--dapple_plan=auto", "--steps=3", "--global_batch_size=12")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "dapple-plan/1" and plan["global_batch_size"] == 12
    assert f"plan {plan['notation']}:" in log
    for step in (1, 2, 3):
        assert f"step {step}  loss" in log
    assert "examples/s" in log
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    assert (tmp_path / "ckpt-3.index").exists()


@pytest.mark.slow
def test_calibrate_logs_predicted_beside_measured_and_records_both_in_the_plan(tmp_path):
    log = _run(
        tmp_path,
        "--dapple_plan=auto",
        "--steps=8",
        "--global_batch_size=8",
        "--calibrate",
        "--save_every=100",
    )
    assert "predicted step time" in log and "measured" in log
    assert "calibration: stage factors (measured / predicted)" in log
    predicted = json.loads((tmp_path / "plan.json").read_text())["predicted"]
    assert predicted["cost_model"] == "runtime"
    assert predicted["measured"]["steps"] == 5 and predicted["measured"]["step_time_s"] > 0
    factors = predicted["calibration"]["stage_factors"]
    assert len(factors) == len(json.loads((tmp_path / "plan.json").read_text())["stages"])
    assert all(f > 0 for f in factors)


def test_calibrate_is_refused_for_a_plan_that_is_not_auto(tmp_path):
    from dapple_tf import runner

    with pytest.raises(ValueError, match="--calibrate re-plans an auto plan.*'2:2'"):
        runner.run_training(
            runner.TrainingConfig(dapple_plan="2:2", calibrate=True, model_dir=str(tmp_path))
        )
