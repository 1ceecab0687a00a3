"""Train a DAPPLE model pipelined over the local devices (or every Horovod rank).

    python train.py --model=gnmt --dapple_plan=auto
    horovodrun -np 4 -H localhost:4 python train.py --model=bert --dapple_plan=2:2

The model's template graph is profiled on one device, the planner picks a hybrid pipeline /
data-parallel plan for the devices at hand (or the plan given by --dapple_plan), and training
logs loss and throughput, writes checkpoints and TensorBoard summaries to --model_dir, and
resumes from the last checkpoint there when restarted. SIGINT (Ctrl-C) or SIGTERM stops
training at the next step boundary with a checkpoint. docs/user-guide.md explains every flag.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags

from planner.schedules import EXECUTABLE

# The models train.py knows (models.MODEL_NAMES; repeated here so that flag checks run before
# TensorFlow is imported, tests/test_train_flags.py keeps the two equal).
MODEL_NAMES = ("vgg19", "amoebanet", "bert", "gnmt", "xlnet")

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "gnmt", MODEL_NAMES, "model to train")
flags.DEFINE_string("preset", "tiny", "model size preset (tiny for CPU demos and tests ... paper)")
flags.DEFINE_string(
    "dapple_plan",
    "auto",
    "'auto' (profile + plan), a plan JSON path, or DAPPLE notation like '2:2', "
    "'3:1' or 'DP4' (layers split evenly)",
)
flags.DEFINE_integer(
    "global_batch_size", None, "rows per step (default: the model's default)", lower_bound=1
)
flags.DEFINE_integer(
    "num_micro_batches",
    None,
    "micro-batches per step (notation plans; default: the largest count up to "
    "2 x stages that the batch and the replica counts allow; auto plans choose "
    "their own)",
    lower_bound=1,
)
flags.DEFINE_enum(
    "schedule",
    None,
    list(EXECUTABLE),
    "pipeline schedule (default: the planner's choice, 1f1b for notation plans); "
    "pipedream-2bw is asynchronous and needs --allow_async",
)
flags.DEFINE_integer(
    "chunks",
    None,
    "interleaved-1f1b with a notation plan: stages per device group (default 2); the notation "
    "gives the groups' replica counts, e.g. --dapple_plan=2:2 --chunks=2 is 4 stages on 2 "
    "groups of 2 devices",
    lower_bound=1,
)
flags.DEFINE_bool(
    "allow_async",
    False,
    "accept an asynchronous schedule (pipedream-2bw: each step's gradient is computed on the "
    "previous step's weights; docs/async.md), by --schedule or in a plan file",
)
flags.DEFINE_integer(
    "num_devices",
    None,
    "single process: stage devices to use (default: all GPUs, else 4 logical CPU devices)",
    lower_bound=1,
)
flags.DEFINE_string(
    "cluster",
    None,
    "host boundaries for auto planning, DAPPLE seps like '8,16' (default: one "
    "host holding all devices)",
)
flags.DEFINE_integer("steps", 20, "train until this global step", lower_bound=1)
flags.DEFINE_string(
    "data_dir", None, "real data (model-specific format, see models/README.md); default synthetic"
)
flags.DEFINE_integer(
    "vocab_size",
    None,
    "with --data_dir: the model's vocabulary size (default: the vocabulary file's)",
    lower_bound=1,
)
flags.DEFINE_integer(
    "seq_length",
    None,
    "with --data_dir: tokens per example (default: the longest example in the files)",
    lower_bound=1,
)
flags.DEFINE_string(
    "model_dir",
    None,
    "checkpoints, plan.json, run.json, summaries, traces; a run resumes from "
    "here (default: runs/<model>-<preset>-<plan notation>, ':' written '_')",
)
flags.DEFINE_enum("optimizer", "adam", ["adam", "momentum", "sgd"], "optimizer")
flags.DEFINE_float("learning_rate", 1e-3, "learning rate")
flags.DEFINE_float("clip_norm", None, "clip gradients by this global norm (whole model)")
flags.DEFINE_integer(
    "save_every", 10, "write a checkpoint every N steps (and at the end)", lower_bound=1
)
flags.DEFINE_integer(
    "keep_checkpoints",
    5,
    "keep the newest N checkpoints, delete older ones (0: keep all)",
    lower_bound=0,
)
flags.DEFINE_integer("log_every", 1, "log a progress line every N steps", lower_bound=1)
flags.DEFINE_integer(
    "trace_step",
    None,
    "trace global step N (the step whose progress line reads 'step N') and save "
    "its RunMetadata as model_dir/trace_step_<N>.pb (draw it with "
    "python -m dapple_tf.timeline --model_dir DIR)",
    lower_bound=1,
)
flags.DEFINE_integer("seed", 0, "seed for weights and synthetic data", lower_bound=0)
flags.DEFINE_bool("verbose", False, "also show TensorFlow's own C++ and profiler log lines")


def _positive_or_none(value) -> bool:
    return value is None or value > 0


flags.register_validator("learning_rate", lambda v: v > 0, message="--learning_rate must be > 0")
flags.register_validator(
    "clip_norm", _positive_or_none, message="--clip_norm must be > 0 (leave it out for no clipping)"
)


@flags.validator("cluster")
def _check_cluster(value):
    if value is None:
        return True
    parts = value.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise flags.ValidationError(
            f"expected increasing device counts like '8,16', found '{value}'"
        )
    seps = [int(p) for p in parts]
    if seps != sorted(set(seps)):
        raise flags.ValidationError(f"host boundaries must increase, found '{value}'")
    return True


@flags.validator("dapple_plan")
def _check_dapple_plan(value):
    from planner.plan_format import PlanError, parse_notation

    if value == "auto" or os.path.isfile(value):
        return True
    if value.endswith(".json"):
        raise flags.ValidationError(f"plan file '{value}' does not exist")
    try:
        parse_notation(value)
    except PlanError:
        raise flags.ValidationError(
            f"expected 'auto', a plan JSON file or DAPPLE "
            f"notation like '2:2', '3:1' or 'DP4'; found '{value}'"
        )
    return True


@flags.validator("data_dir")
def _check_data_dir(value):
    if value is not None and not os.path.isdir(value):
        raise flags.ValidationError(f"'{value}' is not a directory")
    return True


@flags.validator("model_dir")
def _check_model_dir(value):
    if value is not None and os.path.exists(value) and not os.path.isdir(value):
        raise flags.ValidationError(f"'{value}' exists and is not a directory")
    return True


@flags.multi_flags_validator(["schedule", "allow_async"])
def _check_async(values):
    from planner.schedules import ScheduleError, check_async_allowed

    try:
        check_async_allowed(values["schedule"], values["allow_async"], "--allow_async")
    except ScheduleError as e:
        raise flags.ValidationError(str(e))
    return True


@flags.multi_flags_validator(["chunks", "schedule"])
def _check_chunks(values):
    from planner.schedules import CHUNKED

    if values["chunks"] is not None and values["schedule"] not in CHUNKED:
        raise flags.ValidationError(
            f"--chunks={values['chunks']} puts several stages on each device group, which only "
            f"--schedule={' or '.join(CHUNKED)} runs (got --schedule={values['schedule']})"
        )
    return True


@flags.multi_flags_validator(["trace_step", "steps"])
def _check_trace_step(values):
    if values["trace_step"] is not None and values["trace_step"] > values["steps"]:
        raise flags.ValidationError(
            f"--trace_step={values['trace_step']} is after the last step "
            f"(--steps={values['steps']}): nothing would be traced"
        )
    return True


@flags.multi_flags_validator(["dapple_plan", "global_batch_size", "num_micro_batches"])
def _check_notation_batch(values):
    """Notation plans: the micro-batch size must divide by every stage's replica count (checked
    here when the batch is given; with the model's default batch, when the run starts)."""
    from planner.plan_format import PlanError, parse_notation

    try:
        replicas = parse_notation(values["dapple_plan"])
    except PlanError:
        return True  # not notation: _check_dapple_plan reports it
    from dapple_tf.batching import BatchError, notation_micro_batches

    if values["global_batch_size"] is None:
        return True
    try:
        notation_micro_batches(replicas, values["global_batch_size"], values["num_micro_batches"])
    except BatchError as e:
        raise flags.ValidationError(str(e))
    return True


def quiet_tensorflow(verbose: bool) -> None:
    """Hide TensorFlow's C++ INFO/WARNING lines (CPU features, profiler sessions) unless asked;
    must run before TensorFlow is imported. A TF_CPP_MIN_LOG_LEVEL already set wins."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # TensorFlow's Python INFO lines ("Restoring parameters from ...") too.
        std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)


# Plans that are checked against this machine (issue #14): the predicted step time is logged
# beside the measured one after the first steps; --calibrate re-plans an auto plan once.
flags.DEFINE_bool(
    "calibrate",
    False,
    "with --dapple_plan=auto (single process): after the first timed steps, "
    "re-plan once from the measured stage times and continue with that plan",
)
flags.DEFINE_string(
    "layers",
    None,
    "layer rule: a regular expression matched (re.fullmatch) against name-scope "
    "paths, e.g. 'bert/embeddings|bert/encoder/layer_\\d+|bert/pooler|cls' "
    "(default: top-level name scopes; see docs/tf1-models.md)",
)


def main(argv):
    del argv
    quiet_tensorflow(FLAGS.verbose)
    from dapple_tf import runner

    try:
        result = runner.run_training(runner.TrainingConfig.from_flags(FLAGS))
    except runner.USER_ERRORS as e:
        sys.exit(f"train.py: error: {e}")
    if result["stopped_by"] is not None:
        sys.exit(128 + result["stopped_by"])  # the shell's convention for "ended by signal N"


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
