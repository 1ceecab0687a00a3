"""The training loop behind `train.py`: plan, train, log, checkpoint, resume, trace.

One run = one `model_dir`. It holds `plan.json` (the plan in use), checkpoints `ckpt-<step>`
with `checkpoint.json` naming the newest, TensorBoard event files, and traces
`trace_step_<N>.pb`. Restarting with the same `model_dir` resumes from the newest checkpoint:
the step counter continues and the weights are the checkpoint's.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Iterator

import numpy as np
from absl import logging

LATEST_FILE = "checkpoint.json"


@dataclasses.dataclass
class TrainingConfig:
    model: str = "gnmt"
    preset: str = "tiny"
    dapple_plan: str = "auto"
    global_batch_size: int | None = None
    num_micro_batches: int | None = None
    schedule: str | None = None
    num_devices: int | None = None
    cluster: str | None = None
    steps: int = 20
    data_dir: str | None = None
    model_dir: str | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    clip_norm: float | None = None
    save_every: int = 10
    log_every: int = 1
    trace_step: int | None = None
    seed: int = 0
    layers: str | None = None   # layer rule: a regular expression over scope paths

    @classmethod
    def from_flags(cls, flag_values) -> "TrainingConfig":
        return cls(**{f.name: getattr(flag_values, f.name) for f in dataclasses.fields(cls)})


def make_optimizer_fn(name: str, learning_rate: float):
    import tensorflow as tf
    if name == "adam":
        return lambda: tf.compat.v1.train.AdamOptimizer(learning_rate)
    if name == "momentum":
        return lambda: tf.compat.v1.train.MomentumOptimizer(learning_rate, 0.9)
    if name == "sgd":
        return lambda: tf.compat.v1.train.GradientDescentOptimizer(learning_rate)
    raise ValueError(f"unknown optimizer '{name}'; choose adam, momentum or sgd")


# ---- plan ---------------------------------------------------------------------------------------

def resolve_plan(config: TrainingConfig, spec, global_batch_size: int, num_devices: int):
    """The Plan for this run: 'auto' profiles the model and asks the planner; a path is read;
    DAPPLE notation ('2:2', '3:1', 'DP4') splits the layers evenly over that many stages."""
    from planner.plan_format import Plan, even_plan, parse_notation

    choice = config.dapple_plan
    if choice == "auto":
        from dapple_tf.auto_plan import auto_plan
        cluster = [int(x) for x in config.cluster.split(",")] if config.cluster else None
        return auto_plan(spec.model_fn, spec.feature_spec, global_batch_size, num_devices,
                         cluster=cluster, schedule=config.schedule,
                         batch_fn=spec.synthetic_batch, layers=config.layers)
    if os.path.exists(choice) or choice.endswith(".json"):
        plan = Plan.load(choice)
        if plan.global_batch_size != global_batch_size:
            raise ValueError(f"plan {choice} is for global batch {plan.global_batch_size}, but "
                             f"this run uses {global_batch_size} (--global_batch_size)")
        return plan
    replicas = parse_notation(choice)
    num_micro_batches = config.num_micro_batches or max(1, 2 * len(replicas))
    return even_plan(_layer_names(config, spec), replicas, global_batch_size, num_micro_batches,
                     config.schedule or "1f1b")


def _layer_names(config: TrainingConfig, spec) -> tuple[str, ...]:
    """The model's declared layers, or with --layers the layers that rule finds."""
    if config.layers is None:
        return tuple(spec.layer_names)
    from graph_rewrite.template import build_template
    return build_template(spec.model_fn, spec.feature_spec, layers=config.layers).layers


# ---- data ---------------------------------------------------------------------------------------

def _gnmt_files(data_dir: str) -> tuple[str, str, str, str]:
    """(train prefix, vocab prefix, src, tgt) from a folder in the TF NMT tutorial's layout."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.*")))
    vocab = [f for f in files if "vocab" in os.path.basename(f)]
    text = [f for f in files if "vocab" not in os.path.basename(f)]
    if not vocab or not text:
        raise FileNotFoundError(f"{data_dir}: expected parallel text '<prefix>.<src>', "
                                f"'<prefix>.<tgt>' and vocabularies '<vocab prefix>.<src|tgt>'")
    src, tgt = "en", "vi"
    train_prefix = os.path.splitext(text[0])[0]
    vocab_prefix = os.path.splitext(vocab[0])[0]
    return train_prefix, vocab_prefix, src, tgt


def batches(spec, config: TrainingConfig, global_batch_size: int, start_step: int
            ) -> Iterator[dict[str, np.ndarray]]:
    """Global batches for steps start_step, start_step+1, ...; the same stream after a resume."""
    if config.data_dir is None:
        step = start_step
        while True:
            yield spec.synthetic_batch(global_batch_size, np.random.default_rng([config.seed, step]))
            step += 1
    if spec.input_fn is None:
        raise ValueError(f"model {spec.name} has no reader for --data_dir")
    if spec.name == "gnmt":
        train_prefix, vocab_prefix, src, tgt = _gnmt_files(config.data_dir)
        stream = spec.input_fn(train_prefix, vocab_prefix, global_batch_size, src=src, tgt=tgt,
                               seed=config.seed)
    else:
        stream = spec.input_fn(config.data_dir, global_batch_size, seed=config.seed)
    for _ in range(start_step):
        next(stream)
    yield from stream


# ---- checkpoints --------------------------------------------------------------------------------

def latest_checkpoint(model_dir: str) -> tuple[str, int] | None:
    path = os.path.join(model_dir, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return os.path.join(model_dir, data["latest"]), int(data["step"])


def record_checkpoint(model_dir: str, name: str, step: int) -> None:
    path = os.path.join(model_dir, LATEST_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"latest": name, "step": step}, f)
    os.replace(tmp, path)


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

    def scalars(self, step: int, **values: float) -> None:
        if self._writer is None:
            return
        self._writer.add_summary(self._v1.Summary(value=[
            self._v1.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()]), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ---- the loop -----------------------------------------------------------------------------------

def local_device_count(requested: int | None) -> int:
    """Stage devices of a single-process run: the GPUs (at most `requested`), or `requested`
    (default 4) logical CPU devices, created before TensorFlow starts."""
    from dapple_tf import devices
    import tensorflow as tf
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        if requested and requested > gpus:
            raise ValueError(f"--num_devices={requested} but this machine has {gpus} GPUs")
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
    'plan', 'trainer'}."""
    import models
    from dapple_tf import comm
    from dapple_tf.trainer import Trainer

    multi_rank = comm.launched_ranks() > 1
    num_devices = comm.launched_ranks() if multi_rank else local_device_count(config.num_devices)
    spec = models.get_model(config.model, config.preset)
    global_batch_size = config.global_batch_size or spec.default_global_batch_size
    model_dir = config.model_dir or os.path.join("runs", f"{config.model}-{config.preset}")
    os.makedirs(model_dir, exist_ok=True)

    optimizer_fn = make_optimizer_fn(config.optimizer, config.learning_rate)

    def choose_plan():
        return resolve_plan(config, spec, global_batch_size, num_devices)

    if multi_rank:
        comm.init()
        plan = comm.share_plan(choose_plan)
        is_chief = comm.init().rank == 0
    else:
        plan, is_chief = choose_plan(), True
    trainer = Trainer(spec.model_fn, spec.feature_spec, optimizer_fn, plan, global_batch_size,
                      clip_norm=config.clip_norm, num_devices=num_devices, seed=config.seed,
                      optimize_graph=use_grappler(), layers=config.layers)
    if is_chief:
        plan.save(os.path.join(model_dir, "plan.json"))
        predicted = plan.predicted.get("speedup")
        logging.info("plan %s: %d stage%s, %d micro-batches of %d rows, schedule %s%s",
                     plan.notation, plan.num_stages, "" if plan.num_stages == 1 else "s",
                     plan.num_micro_batches,
                     plan.micro_batch_size, plan.schedule,
                     f", predicted speedup {predicted:.2f}" if predicted else "")
        for i, stage in enumerate(plan.stages):
            logging.info("  stage %d on devices %s: %s", i, list(stage.devices),
                         ", ".join(stage.layers))

    start_step = 0
    resume = latest_checkpoint(model_dir)
    if resume is not None:
        path, _ = resume
        trainer.restore(path)
        start_step = trainer.global_step
        if is_chief:
            logging.info("resumed from %s at step %d", path, start_step)
            if start_step >= config.steps:
                logging.info("step %d already reaches --steps=%d: nothing to train (raise --steps "
                             "or use a new --model_dir)", start_step, config.steps)

    summaries = Summaries(model_dir, enabled=is_chief)
    data = batches(spec, config, global_batch_size, start_step)
    first_loss = last_loss = None
    steps_run = 0
    try:
        for step in range(start_step, config.steps):
            batch = next(data)
            begin = time.perf_counter()
            if config.trace_step is not None and step == config.trace_step:
                loss, run_metadata = trainer.traced_step(batch)
                if is_chief:
                    trace_file = os.path.join(model_dir, f"trace_step_{step}.pb")
                    with open(trace_file, "wb") as f:
                        f.write(run_metadata.SerializeToString())
                    logging.info("trace of step %d written to %s", step, trace_file)
            else:
                loss = trainer.train_step(batch)
            seconds = time.perf_counter() - begin
            steps_run += 1
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            done = trainer.global_step
            if is_chief and (done % config.log_every == 0 or done == config.steps):
                logging.info("step %d  loss %.5f  %.1f examples/s  %.3f s/step", done, loss,
                             global_batch_size / seconds, seconds)
                summaries.scalars(done, loss=loss, examples_per_second=global_batch_size / seconds)
            if done % config.save_every == 0 or done == config.steps:
                name = f"ckpt-{done}"
                trainer.save(os.path.join(model_dir, name))
                if is_chief:
                    record_checkpoint(model_dir, name, done)
    finally:
        summaries.close()
    return {"first_loss": first_loss, "last_loss": last_loss, "steps_run": steps_run,
            "global_step": trainer.global_step, "plan": plan, "trainer": trainer}
