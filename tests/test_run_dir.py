"""model_dir bookkeeping: which runs may resume a directory, which checkpoint is resumed,
which are pruned (dapple_tf.run_dir; no TensorFlow session needed)."""

import json

import pytest

from dapple_tf import run_dir

GNMT = run_dir.RunRecord("gnmt", "tiny", {"num_units": 16, "src_vocab_size": 64}, "adam", 8)


def write_checkpoint_files(model_dir, *steps):
    for step in steps:
        (model_dir / f"ckpt-{step}.index").write_text("index")
        (model_dir / f"ckpt-{step}.data-00000-of-00001").write_text("data")
    run_dir.record_checkpoint(str(model_dir), max(steps))


def test_default_model_dir_is_per_model_preset_and_plan():
    assert run_dir.default_model_dir("gnmt", "tiny", "2:2") == "runs/gnmt-tiny-2_2"
    assert run_dir.default_model_dir("bert", "base", "DP4") == "runs/bert-base-DP4"


def test_a_directory_without_checkpoints_suits_any_run(tmp_path):
    run_dir.write_run_record(str(tmp_path), GNMT)
    run_dir.check_resumable(str(tmp_path), run_dir.RunRecord("bert", "tiny", {}, "sgd", 4))


def test_the_same_model_and_batch_resume_whatever_the_plan(tmp_path):
    write_checkpoint_files(tmp_path, 2)
    run_dir.write_run_record(str(tmp_path), GNMT)
    run_dir.check_resumable(str(tmp_path), GNMT)


@pytest.mark.parametrize(
    "other, message",
    [
        (
            run_dir.RunRecord("bert", "tiny", {"hidden_size": 32}, "adam", 8),
            "model: 'gnmt' there, 'bert' now",
        ),
        (
            run_dir.RunRecord("gnmt", "small", {"num_units": 256}, "adam", 8),
            "preset: 'tiny' there, 'small' now",
        ),
        (
            run_dir.RunRecord("gnmt", "tiny", {"num_units": 16, "src_vocab_size": 100}, "adam", 8),
            "model config src_vocab_size: 64 there, 100 now",
        ),
        (
            run_dir.RunRecord("gnmt", "tiny", GNMT.model_config, "sgd", 8),
            "optimizer: 'adam' there, 'sgd' now",
        ),
        (
            run_dir.RunRecord("gnmt", "tiny", GNMT.model_config, "adam", 12),
            "global_batch_size: 8 there, 12 now",
        ),
    ],
)
def test_another_model_size_optimizer_or_batch_is_refused_naming_the_difference(
    tmp_path, other, message
):
    write_checkpoint_files(tmp_path, 2)
    run_dir.write_run_record(str(tmp_path), GNMT)
    with pytest.raises(run_dir.RunDirError, match="holds checkpoints of another run") as error:
        run_dir.check_resumable(str(tmp_path), other)
    assert message in str(error.value)


def test_an_old_directory_without_run_json_is_checked_by_its_plans_layers(tmp_path):
    write_checkpoint_files(tmp_path, 2)
    (tmp_path / "plan.json").write_text(
        json.dumps({"stages": [{"layers": ["embedding", "layer_0"]}, {"layers": ["loss"]}]})
    )
    run_dir.check_resumable(str(tmp_path), GNMT, ["embedding", "layer_0", "loss"])
    with pytest.raises(run_dir.RunDirError, match="not gnmt/tiny"):
        run_dir.check_resumable(str(tmp_path), GNMT, ["encoder_embedding", "loss"])


def test_newest_readable_checkpoint_is_chosen_and_each_bad_one_is_named(tmp_path):
    write_checkpoint_files(tmp_path, 2, 4, 6)
    warnings = []
    bad = {str(tmp_path / "ckpt-6"): "DataLossError: truncated"}
    chosen = run_dir.newest_good_checkpoint(str(tmp_path), bad.get, warnings.append)
    assert chosen == (str(tmp_path / "ckpt-4"), 4)
    assert warnings == [
        (
            f"checkpoint {tmp_path / 'ckpt-6'} cannot be read (DataLossError: "
            f"truncated); trying an older one"
        )
    ]


def test_a_checkpoint_newer_than_checkpoint_json_is_not_resumed(tmp_path):
    write_checkpoint_files(tmp_path, 2, 4)
    run_dir.record_checkpoint(str(tmp_path), 2)  # ckpt-4 was written, but not recorded
    assert run_dir.newest_good_checkpoint(str(tmp_path), lambda p: None, print) == (
        str(tmp_path / "ckpt-2"),
        2,
    )


def test_an_unreadable_checkpoint_json_falls_back_to_the_files_with_a_warning(tmp_path):
    write_checkpoint_files(tmp_path, 2, 4)
    (tmp_path / "checkpoint.json").write_text('{"latest": "ckpt-4", "st')
    warnings = []
    assert run_dir.newest_good_checkpoint(str(tmp_path), lambda p: None, warnings.append) == (
        str(tmp_path / "ckpt-4"),
        4,
    )
    assert "checkpoint.json is unreadable" in warnings[0]


def test_no_readable_checkpoint_means_a_fresh_start(tmp_path):
    write_checkpoint_files(tmp_path, 2)
    assert run_dir.newest_good_checkpoint(str(tmp_path), lambda p: "bad", lambda m: None) is None


def test_pruning_keeps_the_newest_n_and_only_touches_checkpoint_files(tmp_path):
    write_checkpoint_files(tmp_path, 1, 2, 3, 10)
    (tmp_path / "trace_step_1.pb").write_text("")
    assert run_dir.prune_checkpoints(str(tmp_path), 2) == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json",
        "ckpt-10.data-00000-of-00001",
        "ckpt-10.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
        "trace_step_1.pb",
    ]
    assert run_dir.prune_checkpoints(str(tmp_path), 0) == []


def test_train_refuses_another_models_directory_before_building_the_trainer(tmp_path):
    from dapple_tf import runner

    write_checkpoint_files(tmp_path, 2)
    run_dir.write_run_record(str(tmp_path), GNMT)
    with pytest.raises(run_dir.RunDirError, match="model: 'gnmt' there, 'bert' now"):
        runner.run_training(
            runner.TrainingConfig(
                model="bert", dapple_plan="1:1", num_devices=2, model_dir=str(tmp_path)
            )
        )
    assert json.loads((tmp_path / "run.json").read_text())["model"] == "gnmt"  # untouched
