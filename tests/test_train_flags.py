"""train.py refuses bad flags before any work, with a message naming the flag and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from absl.testing import flagsaver

import train
from dapple_tf.batching import BatchError, notation_micro_batches

REPO = Path(__file__).resolve().parents[1]


def train_py_error(*flags, cwd=REPO):
    """(exit status, stderr) of train.py run with `flags`."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps=-5"], "flag --steps=-5: -5 is not a positive integer"),
        (["--log_every=0"], "flag --log_every=0: 0 is not a positive integer"),
        (["--save_every=0"], "flag --save_every=0: 0 is not a positive integer"),
        (["--global_batch_size=0"], "flag --global_batch_size=0: 0 is not a positive integer"),
        (["--num_micro_batches=0"], "flag --num_micro_batches=0: 0 is not a positive integer"),
        (["--num_devices=0"], "flag --num_devices=0: 0 is not a positive integer"),
        (["--keep_checkpoints=-1"], "flag --keep_checkpoints=-1: -1 is not a non-negative integer"),
        (["--trace_step=0"], "flag --trace_step=0: 0 is not a positive integer"),
        (["--learning_rate=0"], "--learning_rate must be > 0"),
        (["--clip_norm=-1"], "--clip_norm must be > 0"),
        (["--model=resnet"], "value should be one of <vgg19|amoebanet|bert|gnmt|xlnet>"),
        (["--dapple_plan=two-stages"], "expected 'auto', a plan JSON file or DAPPLE notation"),
        (["--dapple_plan=missing.json"], "plan file 'missing.json' does not exist"),
        (
            ["--data_dir=/no/such/dir"],
            "flag --data_dir=/no/such/dir: '/no/such/dir' is not a directory",
        ),
        (["--cluster=16,8"], "host boundaries must increase, found '16,8'"),
        (["--schedule=pipedream-2bw"], "asynchronous"),
        (["--schedule=pipedream-2bw"], "pass --allow_async to use it"),
        (["--cluster=8,x"], "expected increasing device counts like '8,16', found '8,x'"),
        (["--chunks=2"], "--chunks=2 puts several stages on each device group, which only"),
        (["--chunks=0", "--schedule=interleaved-1f1b"], "flag --chunks=0: 0 is not a positive"),
        (["--trace_step=30", "--steps=20"], "--trace_step=30 is after the last step (--steps=20)"),
        (
            ["--dapple_plan=3:1", "--global_batch_size=8"],
            "--global_batch_size=8 is not a multiple of 3; use e.g. --global_batch_size=9",
        ),
        (
            ["--dapple_plan=2:2", "--global_batch_size=8", "--num_micro_batches=8"],
            "micro-batches of 1 rows (--global_batch_size=8 / --num_micro_batches=8) do not divide",
        ),
        (
            ["--dapple_plan=2:2", "--global_batch_size=8", "--num_micro_batches=3"],
            "--global_batch_size=8 does not divide into --num_micro_batches=3",
        ),
    ],
)
def test_bad_flag_is_refused_with_a_message_naming_it(argv, message):
    assert message in parse_error(*argv)


def parse_error(*argv) -> str:
    """The message train.py's flag parsing (types, bounds, validators) refuses `argv` with."""
    with flagsaver.flagsaver():
        train.FLAGS.unparse_flags()
        with pytest.raises(flags.IllegalFlagValueError) as error:
            train.FLAGS(["train.py", *argv])
        train.FLAGS.unparse_flags()
    return str(error.value)


def test_model_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    assert "exists and is not a directory" in parse_error(f"--model_dir={tmp_path / 'file'}")


def test_the_command_line_prints_the_message_and_exits_1_without_a_traceback():
    status, stderr = train_py_error("--steps=-5")
    assert status == 1
    assert "FATAL Flags parsing error: flag --steps=-5: -5 is not a positive integer" in stderr
    assert "Traceback" not in stderr


def test_unknown_preset_and_the_models_default_batch_are_checked_when_the_run_starts():
    status, stderr = train_py_error("--preset=huge")
    assert status == 1
    assert "train.py: error: --preset: gnmt has no preset 'huge'; presets: tiny" in stderr
    assert "Traceback" not in stderr
    status, stderr = train_py_error("--dapple_plan=3:1")  # GNMT's default batch: 8 rows
    assert status == 1
    assert "train.py: error: plan 3:1 needs micro-batches" in stderr
    assert "Traceback" not in stderr


def test_train_py_lists_the_models_of_the_registry():
    import models

    assert train.MODEL_NAMES == models.MODEL_NAMES


def test_flag_checks_run_before_tensorflow_is_imported():
    code = (
        "import sys, train; train.FLAGS(['train.py', '--dapple_plan=2:2', "
        "'--global_batch_size=8']); print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize(
    "replicas, batch, expected",
    [
        ([2, 2], 8, 4),
        ([1, 1], 8, 4),
        ([3, 1], 12, 4),
        ([3, 1], 9, 3),
        ([4], 8, 2),
        ([2, 1], 6, 3),
    ],
)
def test_notation_plans_take_the_largest_micro_batch_count_up_to_twice_the_stages(
    replicas, batch, expected
):
    count = notation_micro_batches(replicas, batch)
    assert count == expected
    assert batch % count == 0 and all((batch // count) % r == 0 for r in replicas)


def test_a_requested_micro_batch_count_is_kept_or_refused():
    assert notation_micro_batches([2, 2], 16, 2) == 2
    with pytest.raises(BatchError, match="need a multiple of 2"):
        notation_micro_batches([2, 2], 16, 16)


@pytest.mark.parametrize("chunks, stages", [(None, 4), (3, 6)])
def test_an_interleaved_notation_plan_puts_chunks_stages_on_each_device_group(chunks, stages):
    """--dapple_plan=1:1 --schedule=interleaved-1f1b: the notation names the 2 device groups;
    the layers split into --chunks (default 2) times as many stages, stage s on group s mod 2."""
    import models
    from dapple_tf.runner import TrainingConfig, resolve_plan

    spec = models.get_model("gnmt", "tiny")  # 9 layers
    config = TrainingConfig(
        model="gnmt", dapple_plan="1:1", schedule="interleaved-1f1b", chunks=chunks
    )
    plan = resolve_plan(config, spec, 16, 2)
    assert plan.schedule == "interleaved-1f1b"
    assert plan.num_stages == stages and plan.device_groups == ((0,), (1,))
    assert [st.devices for st in plan.stages] == [(s % 2,) for s in range(stages)]
    assert plan.num_micro_batches % 2 == 0
