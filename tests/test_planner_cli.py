"""`python -m planner plan ...`: the contract tests and users call."""

import json
import os
import subprocess
import sys

import pytest

from planner.__main__ import main
from planner import schedules
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


XLNET_ON_8 = [
    "plan",
    "--profile",
    XLNET,
    "--profile-batch-size",
    "1",
    "--global-batch-size",
    "64",
    "--cluster",
    "8",
    "--micro-batch-size",
    "8",
    "--json",
]


def test_an_async_schedule_is_planned_only_with_allow_async(capsys):
    assert main(XLNET_ON_8 + ["--schedule", "pipedream-2bw"]) == 2
    assert "pass --allow_async" in capsys.readouterr().err
    assert main(XLNET_ON_8 + ["--schedule", "pipedream-2bw", "--allow_async"]) == 0
    two_bw = json.loads(capsys.readouterr().out)
    assert two_bw["schedule"] == "pipedream-2bw"
    assert main(XLNET_ON_8 + ["--schedule", "1f1b"]) == 0
    one_f_one_b = json.loads(capsys.readouterr().out)
    # the previous weights: one more copy of each stage's parameters
    assert two_bw["notation"] == one_f_one_b["notation"]
    assert all(
        a > b
        for a, b in zip(
            two_bw["predicted"]["peak_memory_bytes"], one_f_one_b["predicted"]["peak_memory_bytes"]
        )
    )


def test_the_search_never_chooses_an_async_schedule_even_when_allowed(capsys):
    assert main(XLNET_ON_8 + ["--allow_async"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] in ("1f1b", "gpipe")


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


def test_schedule_prints_the_checked_lists_per_group_and_a_timeline(capsys):
    argv = ["schedule", "--schedule", "zb-h1", "--stages", "4", "--micro-batches", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lists = schedules.action_lists("zb-h1", 4, 8)
    assert schedules.format_lists(lists) in out
    assert "peak in-flight micro-batches per group, summed over its stages: 4 4 4 4" in out
    assert "group 0 |F0 F1 F2 F3 .  .  .  I0 W0 F4" in out
    assert "step: 27 time units (F=1, B=2, I=1, W=1), bubble 11.1%" in out
    assert "the rewriter runs only" not in out


def test_schedule_chunks_put_several_stages_on_a_group(capsys):
    argv = ["schedule", "--schedule", "interleaved-1f1b", "--stages", "4", "--micro-batches", "4"]
    assert main(argv + ["--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert "the rewriter runs only" not in out
    assert "4 stages on 2 device group(s)" in out
    assert "group 1 (stages 1, 3): 1F0 1F1 3F0 3B0" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["interleaved-1f1b", "8", "6", "2"], "needs a multiple of 4 micro-batches, got 6"),
        (["1f1b", "4", "8", "2"], "schedule '1f1b' puts one stage on each device group"),
    ],
)
def test_schedule_sizes_a_schedule_cannot_serve_exit_2_with_a_message(capsys, argv, message):
    name, stages, micro_batches, chunks = argv
    argv = ["schedule", "--schedule", name, "--stages", stages, "--micro-batches", micro_batches]
    assert main(argv + ["--chunks", chunks]) == 2
    assert message in capsys.readouterr().err


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
