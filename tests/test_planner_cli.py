"""`python -m planner plan ...`: the contract tests and users call."""

import json
import os
import subprocess
import sys

import pytest

from planner.__main__ import main
from planner.plan_format import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "profiles", "dapple")
VGG = os.path.join(DATA, "vgg-19-pbs-32.txt")
XLNET = os.path.join(DATA, "xlnet-36-pbs-1.txt")


def test_plan_prints_a_summary_and_writes_the_plan_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--profile",
                XLNET,
                "--profile-batch-size",
                "1",
                "--global-batch-size",
                "128",
                "--cluster",
                "8,16",
                "--cost-model",
                "hpgo",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "plan 8:8" in text
    assert "speedup 14.816" in text and "data-parallel baseline" in text
    assert "stage 0: 24 layers (Input .. Layer_17)" in text
    assert "peak memory" in text
    data = json.loads(out.read_text())
    assert data["notation"] == "8:8"
    for key in ("speedup", "dp_speedup", "step_time_s", "peak_memory_bytes"):
        assert key in data["predicted"]
    assert Plan.from_dict(data).num_micro_batches == 16


def test_json_flag_prints_only_the_plan(capsys):
    assert (
        main(
            [
                "plan",
                "--profile",
                VGG,
                "--profile-batch-size",
                "32",
                "--global-batch-size",
                "512",
                "--cluster",
                "8,16",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "dapple-plan/1"
    assert data["predicted"]["cost_model"] == "dapple-tf"
    plan = Plan.from_dict(data)
    assert plan.rows_divide
    assert max(data["predicted"]["peak_memory_bytes"]) <= 16e9


def test_hpgo_plans_the_runtime_cannot_run_say_so(capsys):
    assert (
        main(
            [
                "plan",
                "--profile",
                VGG,
                "--profile-batch-size",
                "32",
                "--global-batch-size",
                "2048",
                "--cluster",
                "8,16",
                "--cost-model",
                "hpgo",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "plan 15:1" in text and "speedup 14.695" in text
    assert "NOT EXECUTABLE" in text


def test_device_memory_and_schedule_flags_reach_the_plan(capsys):
    assert (
        main(
            [
                "plan",
                "--profile",
                XLNET,
                "--profile-batch-size",
                "1",
                "--global-batch-size",
                "64",
                "--cluster",
                "8",
                "--schedule",
                "1f1b",
                "--device-memory-gb",
                "32",
                "--micro-batch-size",
                "8",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["schedule"] == "1f1b"
    assert data["num_micro_batches"] == 8
    assert data["predicted"]["device_memory_bytes"] == 32e9


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--profile", VGG, "--global-batch-size", "64", "--cluster", "8"],
            "does not record its batch size",
        ),
        (
            [
                "--profile",
                "/nonexistent.txt",
                "--profile-batch-size",
                "1",
                "--global-batch-size",
                "64",
                "--cluster",
                "8",
            ],
            "cannot read profile /nonexistent.txt",
        ),
        (
            [
                "--profile",
                VGG,
                "--profile-batch-size",
                "32",
                "--global-batch-size",
                "64",
                "--cluster",
                "8,4",
            ],
            "increasing positive",
        ),
        (
            [
                "--profile",
                VGG,
                "--profile-batch-size",
                "32",
                "--global-batch-size",
                "64",
                "--cluster",
                "2",
                "--device-memory-gb",
                "0.001",
            ],
            "no plan fits in 0.001 GB",
        ),
    ],
)
def test_errors_exit_2_with_a_message(capsys, argv, message):
    assert main(["plan"] + argv) == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_are_refused_by_the_argument_parser(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "plan",
                "--profile",
                VGG,
                "--profile-batch-size",
                "-3",
                "--global-batch-size",
                "64",
                "--cluster",
                "8",
            ]
        )
    assert "expected a positive integer" in capsys.readouterr().err


def test_convert_writes_json_that_plans_the_same(tmp_path, capsys):
    out = tmp_path / "vgg.json"
    assert main(["convert", VGG, str(out), "--profile-batch-size", "32"]) == 0
    assert (
        main(
            [
                "plan",
                "--profile",
                str(out),
                "--global-batch-size",
                "2048",
                "--cluster",
                "8,16",
                "--cost-model",
                "hpgo",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert data["notation"] == "15:1"


def test_python_dash_m_planner_runs():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "planner",
            "plan",
            "--profile",
            VGG,
            "--profile-batch-size",
            "32",
            "--global-batch-size",
            "512",
            "--cluster",
            "8,16",
            "--cost-model",
            "hpgo",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "plan 14:2" in result.stdout
