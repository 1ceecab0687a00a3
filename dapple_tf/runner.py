"""The training loop behind `train.py`: plan, train, log, checkpoint, resume, trace.

One run = one `model_dir` (default `runs/<model>-<preset>-<plan notation>`); what it holds and
when a run may resume it is in `dapple_tf.run_dir`. Restarting with the same `model_dir`
resumes from the newest readable checkpoint: the step counter continues and the weights are the
checkpoint's. SIGINT/SIGTERM stop the loop at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
from absl import logging

from dapple_tf import run_dir
from dapple_tf.batching import BatchError, notation_micro_batches
from dapple_tf.calibration import StepTimer, prediction_report, record_measurement
from dapple_tf.stop_signals import StopAgreement, StopSignals
from models.data import DataError
from planner.plan_format import PlanError
from planner.schedules import ASYNC, CHUNKED

INTERLEAVED_CHUNKS = 2  # stages per device group of an interleaved notation plan by default


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the flag."""


# Errors that describe the user's input: train.py prints their message without a traceback.
USER_ERRORS = (ConfigError, BatchError, DataError, PlanError, run_dir.RunDirError)


@dataclasses.dataclass
class TrainingConfig:
    model: str = "gnmt"
    preset: str = "tiny"
    dapple_plan: str = "auto"
    global_batch_size: int | None = None
    num_micro_batches: int | None = None
    schedule: str | None = None
    chunks: int | None = None  # interleaved-1f1b notation plans: stages per device group
    num_devices: int | None = None
    cluster: str | None = None
    steps: int = 20
    data_dir: str | None = None
    vocab_size: int | None = None
    seq_length: int | None = None
    model_dir: str | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    clip_norm: float | None = None
    save_every: int = 10
    keep_checkpoints: int = 5
    log_every: int = 1
    trace_step: int | None = None
    seed: int = 0
    calibrate: bool = False
    layers: str | None = None  # layer rule: a regular expression over scope paths
    allow_async: bool = False  # accept an asynchronous schedule (pipedream-2bw)

    @classmethod
    def from_flags(cls, flag_values) -> TrainingConfig:
        return cls(**{f.name: getattr(flag_values, f.name) for f in dataclasses.fields(cls)})


def make_optimizer_fn(name: str, learning_rate: float):
    import tensorflow as tf

    if name == "adam":
        return lambda: tf.compat.v1.train.AdamOptimizer(learning_rate)
    if name == "momentum":
        return lambda: tf.compat.v1.train.MomentumOptimizer(learning_rate, 0.9)
    if name == "sgd":
        return lambda: tf.compat.v1.train.GradientDescentOptimizer(learning_rate)
    raise ConfigError(f"unknown optimizer '{name}'; choose adam, momentum or sgd")


# ---- model and data -----------------------------------------------------------------------------

# Config fields that --vocab_size / --seq_length set, per model with a file reader.
_VOCAB_FIELDS = {"gnmt": ("src_vocab_size", "tgt_vocab_size"), "bert": ("vocab_size",)}
_LENGTH_FIELDS = {"gnmt": ("src_length", "tgt_length"), "bert": ("seq_length",)}


def model_spec(config: TrainingConfig):
    """The ModelSpec for `config`. With --data_dir, the vocabulary size and sequence length
    come from the files (models.<name>.data_config) unless --vocab_size / --seq_length say."""
    import importlib

    import models

    if config.preset not in models.presets(config.model):
        raise ConfigError(
            f"--preset: {config.model} has no preset '{config.preset}'; presets: "
            f"{', '.join(models.presets(config.model))}"
        )
    overrides = {}
    if config.data_dir is not None:
        module = importlib.import_module(f"models.{config.model}")
        if not hasattr(module, "data_config"):
            if config.model in ("vgg19", "amoebanet"):
                return models.get_model(config.model, config.preset)  # images: no sizes to read
            raise ConfigError(
                f"--data_dir: model {config.model} has no file reader; train it "
                f"on synthetic data (leave --data_dir out)"
            )
        overrides = module.data_config(config.data_dir)
    elif config.vocab_size is not None or config.seq_length is not None:
        raise ConfigError("--vocab_size and --seq_length apply to --data_dir runs only")
    for value, fields in (
        (config.vocab_size, _VOCAB_FIELDS.get(config.model, ())),
        (config.seq_length, _LENGTH_FIELDS.get(config.model, ())),
    ):
        if value is not None:
            overrides.update({field: value for field in fields})
    return models.get_model(config.model, config.preset, **overrides)


def batches(
    spec, config: TrainingConfig, global_batch_size: int, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
    """Global batches for steps start_step, start_step+1, ...; the same stream after a resume."""
    if config.data_dir is None:
        step = start_step
        while True:
            rng = np.random.default_rng([config.seed, step])
            yield spec.synthetic_batch(global_batch_size, rng)
            step += 1
    if spec.name == "gnmt":
        from models.gnmt import find_nmt_files

        train_prefix, vocab_prefix = find_nmt_files(config.data_dir)
        stream = spec.input_fn(train_prefix, vocab_prefix, global_batch_size, seed=config.seed)
    else:
        stream = spec.input_fn(config.data_dir, global_batch_size, seed=config.seed)
    for _ in range(start_step):
        next(stream)
    yield from stream


# ---- plan ---------------------------------------------------------------------------------------


def resolve_plan(
    config: TrainingConfig, spec, global_batch_size: int, num_devices: int, optimizer_fn=None
):
    """The Plan for this run: 'auto' profiles the model and asks the planner; a path is read;
    DAPPLE notation ('2:2', '3:1', 'DP4') splits the layers evenly over that many stages, with
    `batching.notation_micro_batches` micro-batches unless --num_micro_batches says (under
    interleaved-1f1b: over --chunks times as many stages, round-robin on those device groups)."""
    from planner.plan_format import Plan, even_plan, parse_notation

    choice = config.dapple_plan
    if choice == "auto":
        from dapple_tf.auto_plan import auto_plan

        cluster = [int(x) for x in config.cluster.split(",")] if config.cluster else None
        return auto_plan(
            spec.model_fn,
            spec.feature_spec,
            global_batch_size,
            num_devices,
            cluster=cluster,
            schedule=config.schedule,
            batch_fn=spec.synthetic_batch,
            optimizer_fn=optimizer_fn,
            layers=config.layers,
            allow_async=config.allow_async,
        )
    if os.path.exists(choice) or choice.endswith(".json"):
        plan = Plan.load(choice)
        if plan.global_batch_size != global_batch_size:
            raise ConfigError(
                f"plan {choice} is for global batch {plan.global_batch_size}, but "
                f"this run uses {global_batch_size} (--global_batch_size)"
            )
        plan.check_layers(_layer_names(config, spec))
        if plan.schedule in ASYNC and not config.allow_async:
            raise ConfigError(
                f"plan {choice} has the asynchronous schedule '{plan.schedule}' (one-step-stale "
                f"weights, docs/async.md): pass --allow_async to train with it"
            )
        return plan
    replicas = parse_notation(choice)
    num_micro_batches = notation_micro_batches(
        replicas, global_batch_size, config.num_micro_batches
    )
    schedule = config.schedule or "1f1b"
    chunks = config.chunks or (INTERLEAVED_CHUNKS if schedule in CHUNKED else 1)
    return even_plan(
        _layer_names(config, spec),
        replicas,
        global_batch_size,
        num_micro_batches,
        schedule,
        chunks,
    )


def _layer_names(config: TrainingConfig, spec) -> tuple[str, ...]:
    """The model's declared layers, or with --layers the layers that rule finds."""
    if config.layers is None:
        return tuple(spec.layer_names)
    from graph_rewrite.template import build_template

    return build_template(spec.model_fn, spec.feature_spec, layers=config.layers).layers


class Summaries:
    """TensorBoard scalars as plain Summary protos (no ops in the training graph, and no
    dependency on the tensorboard package, which tensorflow-cpu does not install)."""

    def __init__(self, model_dir: str, enabled: bool):
        import tensorflow as tf

        self._v1 = tf.compat.v1
        self._writer = None
        if enabled:
            with tf.Graph().as_default():  # the v1 writer refuses to start in eager mode
                self._writer = self._v1.summary.FileWriter(model_dir)

    def resumed_at(self, step: int) -> None:
        """Mark a restart after step `step`: TensorBoard then drops the points an earlier run
        wrote for steps after `step` (they were not checkpointed and are trained again), so no
        step appears twice (a SessionLog START event at step + 1, as tf.estimator writes)."""
        if self._writer is not None:
            self._writer.add_session_log(
                self._v1.SessionLog(status=self._v1.SessionLog.START), step + 1
            )

    def scalars(self, step: int, **values: float) -> None:
        if self._writer is None:
            return
        self._writer.add_summary(
            self._v1.Summary(
                value=[
                    self._v1.Summary.Value(tag=tag, simple_value=float(value))
                    for tag, value in values.items()
                ]
            ),
            step,
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ---- the loop -----------------------------------------------------------------------------------


def local_device_count(requested: int | None) -> int:
    """Stage devices of a single-process run: the GPUs (at most `requested`), or `requested`
    (default 4) logical CPU devices, created before TensorFlow starts."""
    import tensorflow as tf

    from dapple_tf import devices

    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        if requested and requested > gpus:
            raise ConfigError(f"--num_devices={requested} but this machine has {gpus} GPUs")
        return requested or gpus
    count = requested or 4
    devices.create_logical_cpus(count)
    return count


def use_grappler() -> bool:
    """Grappler pays off on GPUs (layout, fused kernels). On CPU stage devices it made tiny
    pipelined graphs slower to start and slower per step (BERT-tiny 2 stages M=4: 19.5 ms vs
    7.3 ms per step), so CPU runs go without it."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def run_training(config: TrainingConfig) -> dict:
    """Train per `config`; returns {'first_loss', 'last_loss', 'steps_run', 'global_step',
    'plan', 'trainer', 'model_dir', 'stopped_by'} ('stopped_by': the signal number that
    stopped training early, else None)."""
    from dapple_tf import comm
    from dapple_tf.trainer import Trainer

    multi_rank = comm.launched_ranks() > 1
    if config.calibrate and (multi_rank or config.dapple_plan != "auto"):
        raise ConfigError(
            "--calibrate re-plans an auto plan of a single-process run; found "
            f"--dapple_plan={config.dapple_plan!r}"
            f"{' under ' + str(comm.launched_ranks()) + ' ranks' if multi_rank else ''}"
        )
    num_devices = comm.launched_ranks() if multi_rank else local_device_count(config.num_devices)
    spec = model_spec(config)
    global_batch_size = config.global_batch_size or spec.default_global_batch_size
    record = run_dir.RunRecord(
        config.model,
        config.preset,
        dataclasses.asdict(spec.config),
        config.optimizer,
        global_batch_size,
    )

    optimizer_fn = make_optimizer_fn(config.optimizer, config.learning_rate)

    def choose_plan():
        plan = resolve_plan(config, spec, global_batch_size, num_devices, optimizer_fn)
        model_dir = config.model_dir or run_dir.default_model_dir(
            config.model, config.preset, plan.notation
        )
        run_dir.check_resumable(model_dir, record, _layer_names(config, spec))
        return plan

    if multi_rank:
        comm.init()
        plan = comm.share_plan(choose_plan)
        is_chief = comm.init().rank == 0
    else:
        plan, is_chief = choose_plan(), True
    model_dir = config.model_dir or run_dir.default_model_dir(
        config.model, config.preset, plan.notation
    )

    def make_trainer(plan):
        return Trainer(
            spec.model_fn,
            spec.feature_spec,
            optimizer_fn,
            plan,
            global_batch_size,
            clip_norm=config.clip_norm,
            num_devices=num_devices,
            seed=config.seed,
            optimize_graph=use_grappler(),
            layers=config.layers,
            allow_async=config.allow_async,
        )

    trainer = make_trainer(plan)
    previous_notation = _saved_plan_notation(model_dir) if is_chief else None
    if is_chief:
        _log_plan(plan, model_dir)
        os.makedirs(model_dir, exist_ok=True)
        run_dir.write_run_record(model_dir, record)
        plan.save(os.path.join(model_dir, run_dir.PLAN_FILE))

    start_step = _resume(trainer, model_dir, plan, previous_notation, is_chief, multi_rank)
    if start_step >= config.steps and is_chief:
        logging.info(
            "step %d already reaches --steps=%d: nothing to train (raise --steps or "
            "use a new --model_dir)",
            start_step,
            config.steps,
        )

    summaries = Summaries(model_dir, enabled=is_chief)
    if start_step > 0:
        summaries.resumed_at(start_step)
    data = batches(spec, config, global_batch_size, start_step)
    first_loss = last_loss = None
    steps_run, stopped_by = 0, None
    agreed_stop = StopAgreement() if multi_rank else (lambda received: received)
    timer = StepTimer()
    calibrate_now = False  # the next step is traced for --calibrate
    try:
        with StopSignals() as stop:
            for step in range(start_step + 1, config.steps + 1):  # the global step after it
                batch = next(data)
                begin = time.perf_counter()
                if calibrate_now:
                    calibrate_now = False
                    loss, run_metadata = trainer.traced_step(batch)
                    trainer, plan = _recalibrate(
                        trainer, plan, run_metadata, timer.median_s, make_trainer, model_dir
                    )
                    timer = StepTimer()
                elif step == config.trace_step:
                    loss, run_metadata = trainer.traced_step(batch)
                    if is_chief:
                        _write_trace(model_dir, step, run_metadata)
                else:
                    loss = trainer.train_step(batch)
                    if timer.add(time.perf_counter() - begin):
                        record_measurement(plan, timer.median_s, len(timer.seconds))
                        if is_chief:
                            logging.info(
                                "%s", prediction_report(plan, timer.median_s, len(timer.seconds))
                            )
                            plan.save(os.path.join(model_dir, run_dir.PLAN_FILE))
                        calibrate_now = config.calibrate and "calibration" not in plan.predicted
                seconds = time.perf_counter() - begin
                steps_run += 1
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                if is_chief and (step % config.log_every == 0 or step == config.steps):
                    logging.info(
                        "step %d  loss %.5f  %.1f examples/s  %.3f s/step",
                        step,
                        loss,
                        global_batch_size / seconds,
                        seconds,
                    )
                    summaries.scalars(
                        step, loss=loss, examples_per_second=global_batch_size / seconds
                    )
                stopped_by = agreed_stop(stop.received)
                if step % config.save_every == 0 or step == config.steps or stopped_by:
                    _save(trainer, model_dir, step, config.keep_checkpoints, is_chief)
                if stopped_by:
                    if is_chief:
                        logging.info(
                            "stopped by %s after step %d; checkpoint %s written; run "
                            "the same command again to resume",
                            signal.Signals(stopped_by).name,
                            step,
                            run_dir.checkpoint_path(model_dir, step),
                        )
                    break
    finally:
        summaries.close()
        if multi_rank:
            agreed_stop.close()
    return {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "steps_run": steps_run,
        "global_step": trainer.global_step,
        "plan": plan,
        "trainer": trainer,
        "model_dir": model_dir,
        "stopped_by": stopped_by,
    }


def _log_plan(plan, model_dir: str) -> None:
    predicted = plan.predicted.get("speedup")
    logging.info(
        "plan %s: %d stage%s, %d micro-batches of %d rows, schedule %s%s; model_dir %s",
        plan.notation,
        plan.num_stages,
        "" if plan.num_stages == 1 else "s",
        plan.num_micro_batches,
        plan.micro_batch_size,
        plan.schedule,
        f", predicted speedup {predicted:.2f}" if predicted else "",
        model_dir,
    )
    for i, stage in enumerate(plan.stages):
        logging.info(
            "  stage %d on devices %s: %s", i, list(stage.devices), ", ".join(stage.layers)
        )


def _resume(
    trainer, model_dir: str, plan, previous_notation: str | None, is_chief: bool, multi_rank: bool
) -> int:
    """Restore the newest readable checkpoint of `model_dir` (chosen by rank 0, so every rank
    restores the same one); returns the global step to continue from (0 without one)."""
    from dapple_tf import checkpoint, comm

    chosen = None
    if is_chief:
        chosen = run_dir.newest_good_checkpoint(
            model_dir, checkpoint.unreadable_reason, logging.warning
        )
    if multi_rank:
        chosen = comm.broadcast_object(chosen, "dapple.resume.checkpoint")
    if chosen is None:
        return 0
    path, _ = chosen
    trainer.restore(path)
    if is_chief:
        logging.info(
            "resumed from %s at step %d%s",
            path,
            trainer.global_step,
            ""
            if previous_notation in (None, plan.notation)
            else f" (written under plan {previous_notation}; checkpoints interchange "
            f"between plans of one model)",
        )
    return trainer.global_step


def _saved_plan_notation(model_dir: str) -> str | None:
    """The notation of the plan in `model_dir`/plan.json (the previous run's), if readable."""
    from planner.plan_format import Plan

    try:
        return Plan.load(os.path.join(model_dir, run_dir.PLAN_FILE)).notation
    except (PlanError, OSError):
        return None


def _save(trainer, model_dir: str, step: int, keep: int, is_chief: bool) -> None:
    trainer.save(run_dir.checkpoint_path(model_dir, step))
    if is_chief:
        run_dir.record_checkpoint(model_dir, step)
        run_dir.prune_checkpoints(model_dir, keep)


def _write_trace(model_dir: str, step: int, run_metadata) -> None:
    from dapple_tf.timeline import trace_path

    path = trace_path(model_dir, step)
    with open(path, "wb") as f:
        f.write(run_metadata.SerializeToString())
    logging.info("trace of step %d written to %s", step, path)


def _recalibrate(trainer, plan, run_metadata, measured_s: float, make_trainer, model_dir: str):
    """--calibrate: re-plan from the traced step's stage times; a different plan takes over from
    a checkpoint of the current weights and optimizer state. Returns (trainer, plan)."""
    from dapple_tf.calibration import replan

    new, factors = replan(plan, run_metadata, measured_s)
    logging.info(
        "calibration: stage factors (measured / predicted) %s; re-planned %s M=%d (was %s M=%d)",
        ", ".join(f"{f:.2f}" for f in factors),
        new.notation,
        new.num_micro_batches,
        plan.notation,
        plan.num_micro_batches,
    )
    if new == plan:
        plan.predicted["calibration"] = new.predicted["calibration"]
        plan.save(os.path.join(model_dir, run_dir.PLAN_FILE))
        return trainer, plan
    path = trainer.save(os.path.join(model_dir, f"calibration-ckpt-{trainer.global_step}"))
    trainer.close()
    trainer = make_trainer(new)
    trainer.restore(path)
    _log_plan(new, model_dir)
    new.save(os.path.join(model_dir, run_dir.PLAN_FILE))
    return trainer, new
