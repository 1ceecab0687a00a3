"""Trainer: pipelined training of a plain `model_fn` in one process (ARCHITECTURE.md, Public API).

    trainer = Trainer(model_fn, feature_spec, optimizer_fn, plan, global_batch_size)
    loss = trainer.train_step(batch)         # mean loss over the global batch
    weights = trainer.get_weights()          # by single-device variable name

`get_weights()` returns every global variable: model variables, optimizer slots (e.g.
`layer_0/dense/kernel/Momentum`), the optimizer's non-slot variables (e.g. `beta1_power`) and
`global_step`, keyed by op name (no ':0'). `SingleDeviceTrainer` builds the plain single-device
graph of the same model with the same methods: the reference that pipelined training equals.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from graph_rewrite import rewrite
from graph_rewrite.rewrite import PhaseClock
from graph_rewrite.random_ops import RANDOM_ROWS_FEATURE, rows_feature_value
from graph_rewrite.template import (
    LayerRule,
    WeightedLoss,
    build_model_graph,
    build_template,
    initial_values,
)
from planner.plan_format import Plan, PlanError
from planner.schedules import check_async_allowed

from . import checkpoint, devices

v1 = tf.compat.v1


class _SessionTrainer:
    """Session loop shared by the pipelined and the single-device trainer."""

    graph: tf.Graph
    session: Any
    features: dict[str, tf.Tensor]
    loss: tf.Tensor
    train_op: tf.Operation
    global_batch_size: int
    feature_rows: dict | None = None  # feature -> rows read here; None: whole global batches
    input_fn = None  # the dataset the features default to (Trainer only)
    # pipedream-2bw: the op setting the previous weights to the variables (Trainer only)
    _previous_weights_reset: tf.Operation | None = None

    def _finish_init(self, values: Mapping[str, np.ndarray] | None = None):
        """Create the assign, read and save ops, finalize the graph, initialize every variable:
        those in `values` from them, the others (optimizer slots, global_step) with their
        initializers, in one session run (each run of a new set of fetches costs a Grappler
        pass over the whole graph, minutes for a large pipelined graph)."""
        values = values or {}
        with self.graph.as_default():
            self._variables = checkpoint.variables_by_name(self.graph)
            self._assign_inputs, self._assign_ops = {}, {}
            for name, var in self._variables.items():
                ph = v1.placeholder(var.dtype.base_dtype, var.shape, name=f"dapple/assign/{name}")
                self._assign_inputs[name] = ph
                self._assign_ops[name] = var.assign(ph, read_value=False)
            self._global_step_value = self._global_step_var.read_value()
            self._saver = checkpoint.make_saver(self.graph)
            self._newest_only = None  # restores a checkpoint without the previous weights
            if self._previous_weights_reset is not None:
                self._newest_only = (
                    checkpoint.make_saver(self.graph, without_previous_weights=True),
                    self._previous_weights_reset,
                )
            initializer = v1.variables_initializer(
                [v for n, v in self._variables.items() if n not in values]
            )
        self.graph.finalize()
        self.session.run(
            [initializer] + [self._assign_ops[n] for n in values],
            {self._assign_inputs[n]: value for n, value in values.items()},
        )
        # global_step starts at its initial value; reading it would cost another Grappler pass
        self._random_step = int(values.get("global_step", 0))

    # ---- training ---------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, np.ndarray] | None = None, run_metadata=None) -> float:
        """One step on `global_batch_size` rows; returns the global-batch mean loss. `batch`:
        the whole global batch, or only the rows this process reads (`local_rows`); None when
        the trainer was given `input_fn` (the step takes the dataset's next element). Pass a
        `tf.compat.v1.RunMetadata()` to trace the step into it (full trace)."""
        if batch is None and self.input_fn is None:
            raise ValueError("train_step needs a batch (this trainer has no input_fn)")
        feed = self._feed(batch) if batch is not None else self._random_rows_feed()
        options = None
        if run_metadata is not None:
            options = v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE)
        _, loss = self.session.run(
            [self.train_op, self.loss], feed, options=options, run_metadata=run_metadata
        )
        if self._random_step is not None:
            self._random_step += 1
        return float(loss)

    def traced_step(self, batch) -> tuple[float, Any]:
        """Train one step with a full trace; returns (loss, RunMetadata)."""
        metadata = v1.RunMetadata()
        loss = self.train_step(batch, run_metadata=metadata)
        return loss, metadata

    def run_metadata(self, batch):
        """Train one step with a full trace; returns its RunMetadata (step stats)."""
        return self.traced_step(batch)[1]

    _random_step: int | None = None  # the step random ops are seeded with (None: read it)

    def _feed(self, batch):
        """The feed of one step: each placeholder gets the rows of its feature this process
        reads (`local_rows`), cut from a whole global batch, or given as exactly those rows;
        for models with random ops also the rows feature that seeds them
        (graph_rewrite/random_ops.py), for the same rows."""
        batch = dict(batch or {})
        if RANDOM_ROWS_FEATURE in self.features:
            if self._random_step is None:
                self._random_step = self.global_step
            batch[RANDOM_ROWS_FEATURE] = rows_feature_value(
                0, self.global_batch_size, self.global_batch_size, self._random_step
            )
        missing = sorted(set(self.features) - set(batch))
        if missing:
            raise KeyError(f"batch lacks features {missing}; expected {sorted(self.features)}")
        feed, fed_bytes = {}, 0
        for name, ph in self.features.items():
            value = np.asarray(batch[name])
            rows = self.local_rows.get(name)
            count = self.global_batch_size if rows is None else sum(hi - lo for lo, hi in rows)
            if value.ndim == 0 or value.shape[0] not in (self.global_batch_size, count):
                found = "a scalar" if value.ndim == 0 else f"{value.shape[0]} rows"
                local = (
                    ""
                    if count == self.global_batch_size
                    else f" or this process's {count} rows {list(rows)}"
                )
                raise ValueError(
                    f"feature '{name}' has {found}, expected the global batch size "
                    f"{self.global_batch_size}{local}"
                )
            if value.shape[0] != count:
                value = take_rows(value, rows)
            feed[ph] = value
            fed_bytes += value.nbytes
        self.fed_bytes = fed_bytes
        return feed

    def _random_rows_feed(self):
        """The feed of a step whose features come from `input_fn`: only the rows feature that
        seeds random ops, if the model has any."""
        if RANDOM_ROWS_FEATURE not in self.features:
            return None
        rows = self.local_rows[RANDOM_ROWS_FEATURE]
        return {self.features[RANDOM_ROWS_FEATURE]: self._random_rows_value(rows)}

    def _random_rows_value(self, rows):
        """This step's rows feature (global row, step, ...) of the rows `rows`."""
        if self._random_step is None:
            self._random_step = self.global_step
        return take_rows(
            rows_feature_value(
                0, self.global_batch_size, self.global_batch_size, self._random_step
            ),
            rows,
        )

    @property
    def local_rows(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Feature -> the rows of each global batch this process reads, as [lo, hi) ranges
        (a multi-rank trainer's rank reads only its slot's rows of the features its stage
        uses). `train_step` takes either whole global batches or batches of exactly these
        rows (in this order), so an input pipeline can read only its own rows."""
        return dict(
            self.feature_rows or {name: ((0, self.global_batch_size),) for name in self.features}
        )

    # ---- weights and checkpoints ------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        names = list(self._variables)
        return dict(zip(names, self.session.run([self._read_ops[n] for n in names])))

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(weights) - set(self._variables))
        if unknown:
            raise KeyError(
                f"set_weights: unknown variables {unknown}; this model has "
                f"{sorted(self._variables)}"
            )
        names = list(weights)
        self.session.run(
            [self._assign_ops[n] for n in names],
            {self._assign_inputs[n]: weights[n] for n in names},
        )
        self._random_step = None  # global_step may have changed

    def save(self, path: str | os.PathLike) -> str:
        return checkpoint.save(self.session, self._saver, path)

    def restore(self, path: str | os.PathLike) -> None:
        checkpoint.restore(self.session, self._saver, path, self._newest_only)
        self._random_step = None

    @property
    def global_step(self) -> int:
        return int(self.session.run(self._global_step_value))

    def close(self):
        self.session.close()


def take_rows(value: np.ndarray, rows) -> np.ndarray:
    """The rows of `value` in the [lo, hi) ranges `rows`, in order (one copy of those rows)."""
    if len(rows) == 1:
        lo, hi = rows[0]
        return value[lo:hi]
    return np.concatenate([value[lo:hi] for lo, hi in rows])


def _prepare_reads(trainer: _SessionTrainer):
    with trainer.graph.as_default():
        trainer._read_ops = {
            n: v.read_value() for n, v in checkpoint.variables_by_name(trainer.graph).items()
        }


class Trainer(_SessionTrainer):
    """Pipelined + data-parallel training on this process's devices, equal to single-device
    training on the whole global batch.

    plan: a `Plan`, a path to plan JSON, or "auto" (needs the profiler and planner hook).
    layers: the layer rule (default: top-level name scopes; a regular expression matched with
    `re.fullmatch` against scope paths such as `bert/encoder/layer_3`, a list of them, or a
    function op name -> layer name; see graph_rewrite/template.py and docs/tf1-models.md).
    Extra keyword arguments: clip_norm (global-norm clipping over the whole model), num_devices
    (how many logical CPU devices the session may create when there is no GPU), seed (graph
    seed of the template, so initial weights are reproducible), inter_op_threads, input_fn
    (`input_fn(local_rows) -> tf.data.Dataset` whose elements are dicts of this process's rows
    of each feature, one per step: `train_step()` then takes no batch; under several ranks each
    rank reads only its own rows), transport (multi-rank only: "tf" or "horovod", see
    dapple_tf/multirank.py), stack_weight_gradients (each stage's dense weight gradients that
    are sums over rows, such as a dense layer's kernel and bias, computed once per step over
    the stacked rows of all micro-batches instead of once per micro-batch and summed: fewer,
    larger matmuls; the inputs of those gradients, e.g. the layer inputs, then stay alive
    until the stage's last backward, as under GPipe; graph_rewrite/stacked_gradients.py; not
    with schedule zb-h1, whose W actions compute weight gradients once per micro-batch),
    bound_zero_bubble_memory (zb-h1: stage s holds back fewer than the paper's s W's where a
    pending W holds more bytes than a pending forward, so that no stage holds more than 1F1B's
    first stage: less memory, more bubble; docs/passes/schedule.md),
    allow_async (accept a plan whose schedule is asynchronous, `pipedream-2bw`: each step's
    gradient is computed on the previous step's weights and `train_step` returns the loss at
    those weights; update rule in docs/async.md; refused without it).

    Under horovodrun/mpirun with more than one rank, `Trainer(...)` builds a
    `dapple_tf.multirank.MultiRankTrainer` (this rank's slot only; same methods).
    """

    def __new__(cls, *args, **kwargs):
        if cls is Trainer:
            from . import comm

            if comm.launched_ranks() > 1:
                from .multirank import MultiRankTrainer

                return super().__new__(MultiRankTrainer)
        return super().__new__(cls)

    def __init__(
        self,
        model_fn: Callable,
        feature_spec: Mapping,
        optimizer_fn: Callable,
        plan: Plan | str | os.PathLike,
        global_batch_size: int,
        *,
        clip_norm: float | None = None,
        num_devices: int | None = None,
        seed: int | None = None,
        inter_op_threads: int | None = None,
        optimize_graph: bool = True,
        input_fn: Callable | None = None,
        transport: str | None = None,
        stack_weight_gradients: bool = False,
        bound_zero_bubble_memory: bool = False,
        layers: LayerRule = None,
        allow_async: bool = False,
    ):
        del transport  # multi-rank only (MultiRankTrainer); one process needs no transport
        self.global_batch_size = int(global_batch_size)
        self.input_fn = input_fn
        clock = PhaseClock()
        self.setup_seconds = clock.seconds  # wall time of each phase of __init__
        self.plan = resolve_plan(
            plan,
            model_fn,
            feature_spec,
            self.global_batch_size,
            num_devices,
            optimizer_fn,
            layers=layers,
        )
        check_async_allowed(self.plan.schedule, allow_async)
        clock.mark("plan")
        self.template = build_template(model_fn, feature_spec, seed=seed, layers=layers)
        clock.mark("template")
        kind = devices.check_plan_devices(self.plan, num_devices)
        self.rewritten = rewrite(
            self.template,
            self.plan,
            optimizer_fn,
            device_name=lambda d: devices.device_name(d, kind),
            clip_norm=clip_norm,
            input_fn=input_fn,
            stack_weight_gradients=stack_weight_gradients,
            bound_zero_bubble_memory=bound_zero_bubble_memory,
        )
        clock.mark("rewrite")
        self.graph = self.rewritten.graph
        self.features = self.rewritten.features
        self.feature_rows = self.rewritten.feature_rows
        self.loss = self.rewritten.loss
        self.train_op = self.rewritten.train_op
        self._global_step_var = self.rewritten.global_step
        self._previous_weights_reset = self.rewritten.reset_previous_weights
        self.session = devices.new_session(
            self.graph,
            devices.session_config(
                kind,
                max(self.plan.devices) + 1,
                inter_op_threads,
                optimize_graph,
                fold_constants=False,
            ),
        )
        _prepare_reads(self)
        values = initial_values(self.template, devices.pinned_config())
        clock.mark("initial values")
        unknown = sorted(set(values) - set(checkpoint.variables_by_name(self.graph)))
        if unknown:
            raise KeyError(f"initial values of variables {unknown} the training graph lacks")
        self._finish_init(values)
        self._reset_previous_weights()
        clock.mark("session + variable init (initial values assigned)")

    def _reset_previous_weights(self):
        """pipedream-2bw: the previous weights start as the variables' values, W(-1) = W(0)."""
        if self._previous_weights_reset is not None:
            self.session.run(self._previous_weights_reset)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set the variables named in `weights`. Under pipedream-2bw a trainable variable given
        without its previous weights (`dapple/previous_weights/<name>`) sets those too: the
        pair starts over as at step 0, W(-1) = W(0)."""
        weights = dict(weights)
        for name, previous in self.rewritten.previous_weights.items():
            if name in weights:
                weights.setdefault(previous.op.name, weights[name])
        super().set_weights(weights)


class SingleDeviceTrainer(_SessionTrainer):
    """The plain single-device build of the same model: the reference for equivalence tests and
    the graph whose variable names checkpoints use."""

    def __init__(
        self,
        model_fn: Callable,
        feature_spec: Mapping,
        optimizer_fn: Callable,
        global_batch_size: int,
        *,
        clip_norm: float | None = None,
        seed: int | None = None,
        device: str | None = None,
        optimize_graph: bool = True,
        layers: LayerRule = None,
    ):
        self.global_batch_size = int(global_batch_size)
        self.layers = layers  # the same rule as the pipelined trainer's; the plain build needs none
        self.graph, self.features, self.loss = build_model_graph(model_fn, feature_spec, seed)
        with self.graph.as_default(), tf.device(device):
            if isinstance(self.loss, WeightedLoss):
                self.loss = tf.math.divide(
                    self.loss.numerator, self.loss.denominator, name="dapple/weighted_loss"
                )
            variables = [v for v in v1.trainable_variables()]
            grads = tf.gradients(self.loss, variables)
            pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
            grads = [g for g, _ in pairs]
            if clip_norm is not None:
                grads, _ = tf.clip_by_global_norm(grads, clip_norm)
            self._global_step_var = v1.train.get_or_create_global_step()
            self.optimizer = optimizer_fn()
            # batch norm's moving statistics, as TF1 training loops run them
            with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
                self.train_op = self.optimizer.apply_gradients(
                    [(g, v) for g, (_, v) in zip(grads, pairs)], global_step=self._global_step_var
                )
        self.session = devices.new_session(
            self.graph, devices.session_config("CPU", 1, optimize_graph=optimize_graph)
        )
        _prepare_reads(self)
        self._finish_init()


def resolve_plan(
    plan,
    model_fn,
    feature_spec,
    global_batch_size: int,
    num_devices: int | None,
    optimizer_fn: Callable | None = None,
    ranks: int | None = None,
    layers: LayerRule = None,
) -> Plan:
    """A Plan from a Plan, a plan JSON path, or "auto" (profile + planner search, with the
    layer rule `layers`: for this process's devices, or for `ranks` devices, one per rank,
    under a launcher)."""
    if isinstance(plan, str) and plan == "auto":
        if ranks is not None:
            from dapple_tf.auto_plan import auto_plan

            return auto_plan(
                model_fn,
                feature_spec,
                global_batch_size,
                ranks,
                optimizer_fn=optimizer_fn,
                layers=layers,
            )
        return _auto_plan(
            model_fn, feature_spec, global_batch_size, num_devices, optimizer_fn, layers
        )
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, a path to plan JSON or 'auto', got {plan!r}")
    if plan.global_batch_size != global_batch_size:
        raise PlanError(
            f"plan is for global batch size {plan.global_batch_size}, but the "
            f"trainer was given {global_batch_size}"
        )
    return plan


def _auto_plan(
    model_fn, feature_spec, global_batch_size, num_devices, optimizer_fn, layers=None
) -> Plan:
    """plan='auto': profile the template and search a plan for this process's devices."""
    from dapple_tf.auto_plan import auto_plan  # imports the profiler and planner on demand

    _, count = devices.available_devices(num_devices)
    return auto_plan(
        model_fn, feature_spec, global_batch_size, count, optimizer_fn=optimizer_fn, layers=layers
    )
