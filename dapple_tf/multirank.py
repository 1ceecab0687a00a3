"""`Trainer` under horovodrun / mpirun: one rank per plan device, rank d holds device id d.

`dapple_tf.Trainer(...)` returns a `MultiRankTrainer` when the launcher started more than one
rank; the user script does not change. On every rank, in the same order:
  1. Horovod starts (dapple_tf.comm.init); rank 0 loads or computes the plan ("auto" profiles
     and plans on rank 0 only) and broadcasts it.
  2. The template is built (same seed, same model_fn: the same graph on every rank), the
     process sets of the plan are registered (stage replica groups, tied-variable groups,
     boundary pairs, in one fixed order), and the rewrite builds only this rank's slot with
     a HorovodTransport (pair broadcasts) and a HorovodGradientSync (per-variable allreduce).
  3. The step ends with `step_end`: a global allreduce of each rank's share of the loss that
     runs after the optimizer update and after every collective of the step, so every rank
     returns the global-batch mean loss and no rank runs ahead.
  4. Variables start from the template's initial values and are then broadcast from the
     lowest rank holding them (replicas and tied users agree bit for bit).

Device: rank d uses its local GPU `local_rank` (the session sees only that GPU, as /GPU:0),
or /CPU:0 without GPUs. The Watchdog (comm.py) bounds every step's wait for other ranks.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from graph_rewrite import rewrite
from graph_rewrite.horovod_transport import HorovodGradientSync, HorovodTransport
from graph_rewrite.partition import partition
from graph_rewrite.place import Slot
from graph_rewrite.template import build_template, initial_values
from planner.plan_format import Plan, PlanError

from . import checkpoint, checkpoint_sharded, comm, devices
from .trainer import Trainer, _prepare_reads, resolve_plan

v1 = tf.compat.v1


class MultiRankTrainer(Trainer):
    """Trainer of one rank of a multi-rank run (see module doc). Same public methods."""

    def __init__(self, model_fn: Callable, feature_spec: Mapping, optimizer_fn: Callable,
                 plan: Plan | str | os.PathLike, global_batch_size: int, *,
                 clip_norm: float | None = None, num_devices: int | None = None,
                 seed: int | None = None, inter_op_threads: int | None = None,
                 optimize_graph: bool = True, heartbeat_dir: str | None = None,
                 layers=None):
        if clip_norm is not None:
            raise NotImplementedError("clip_norm is not supported across ranks yet (the global "
                                      "norm needs every rank's gradients); run without it")
        self.global_batch_size = int(global_batch_size)
        info = comm.init()
        self.rank, self.size = info.rank, info.size
        if isinstance(plan, Plan):
            chosen = plan
            self.plan = comm.share_plan(lambda: chosen)
        else:
            self.plan = comm.share_plan(lambda: resolve_plan(
                plan, model_fn, feature_spec, self.global_batch_size, num_devices, layers))
        if self.plan.global_batch_size != self.global_batch_size:
            raise PlanError(f"plan is for global batch size {self.plan.global_batch_size}, but "
                            f"the trainer was given {self.global_batch_size}")
        self.slot = _slot_of_rank(self.plan, self.rank)
        self.template = build_template(model_fn, feature_spec, seed=seed, layers=layers)
        specs = partition(self.template, self.plan)
        self.ranks_of_variable = _ranks_of_variable(self.plan, specs)
        tied = [tuple(s for s, spec in enumerate(specs) if v in spec.variables)
                for v in self.template.variables]
        tied = [stages for stages in dict.fromkeys(tied) if len(stages) > 1]

        kind = devices.device_kind()
        device = devices.device_name(0, kind)
        self.process_sets = comm.ProcessSets(self.plan, tied)
        self.collectives = comm.Collectives(self.process_sets, self.rank)
        transport = HorovodTransport(self.plan, self.rank, self.collectives, device)
        sync = HorovodGradientSync(self.collectives, self.ranks_of_variable, self.rank,
                                   comm.allgather_objects)
        self.rewritten = rewrite(self.template, self.plan, optimizer_fn,
                                 device_name=lambda d: device, local_slots=[self.slot],
                                 transport=transport, gradient_sync=sync)
        self.graph = self.rewritten.graph
        self.features = self.rewritten.features
        self.train_op = self.rewritten.train_op
        self._global_step_var = self.rewritten.global_step
        with self.graph.as_default(), tf.device(device):
            holds_loss = self.slot.stage == self.plan.num_stages - 1
            share = self.rewritten.loss if holds_loss else tf.constant(0.0, tf.float32)
            share = tf.cast(share, tf.float32)
            ends = [op for op in self.rewritten.end_ops.values()]
            self.loss = self.collectives.step_end(
                share, [self.train_op] + ends + transport.outgoing)
            self._broadcast_init = tf.group(*[
                self.collectives.broadcast_variable(var, name, self.ranks_of_variable[name])
                for name, var in sorted(self.rewritten.variables.items())
                if len(self.ranks_of_variable[name]) > 1], name="dapple/init/broadcast")
        self._prepare_sharded_saver()
        config = devices.session_config(kind, 1, inter_op_threads, optimize_graph)
        if kind == "GPU":
            config.gpu_options.visible_device_list = str(info.local_rank)
        self.session = v1.Session(graph=self.graph, config=comm.session_config(config))
        _prepare_reads(self)
        self._finish_init()
        self.set_weights(initial_values(self.template))
        self.session.run(self._broadcast_init)
        directory, temporary = comm.shared_heartbeat_dir(heartbeat_dir)
        self._remove_heartbeats = temporary and self.rank == 0
        self.watchdog = comm.Watchdog(self.rank, self.size, directory, self.collectives.log).start()
        self._steps_run = 0

    # ---- setup helpers ------------------------------------------------------------------------
    def _prepare_sharded_saver(self):
        local = sorted(checkpoint.variables_by_name(self.graph))
        everyone = comm.allgather_objects(local, "dapple.variable_names")
        self._owner = checkpoint_sharded.owners(everyone, self.plan.devices)
        self._all_variable_ranks = {}
        for rank, names in enumerate(everyone):
            for name in names:
                self._all_variable_ranks.setdefault(name, []).append(rank)
        owned = {n: v for n, v in checkpoint.variables_by_name(self.graph).items()
                 if self._owner[n] == self.rank}
        with self.graph.as_default():
            self._owned_saver = (v1.train.Saver(var_list=owned, max_to_keep=None,
                                                save_relative_paths=True) if owned else None)

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, np.ndarray], run_metadata=None) -> float:
        self.watchdog.step_begin(self._steps_run)
        try:
            loss = super().train_step(batch, run_metadata=run_metadata)
        except tf.errors.OpError as e:
            if "horovod" not in str(e).lower():
                raise
            message = comm.explain_collective_failure(self.watchdog, e, self._steps_run)
            print(message, flush=True)
            raise comm.PeerLostError(message) from e
        self.watchdog.step_end(self._steps_run)
        self._steps_run += 1
        return loss

    # ---- weights and checkpoints ---------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """Every variable of the model (and optimizer), on every rank: each rank contributes
        the variables it owns (see checkpoint_sharded.owners)."""
        mine = {n: v for n, v in super().get_weights().items() if self._owner[n] == self.rank}
        merged: dict[str, np.ndarray] = {}
        for part in comm.allgather_objects(mine, "dapple.get_weights"):
            merged.update(part)
        return merged

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set this rank's variables from `weights` (names of other ranks' variables are
        skipped; names no rank has are an error)."""
        unknown = sorted(set(weights) - set(self._all_variable_ranks))
        if unknown:
            raise KeyError(f"set_weights: unknown variables {unknown}; this model has "
                           f"{sorted(self._all_variable_ranks)}")
        super().set_weights({n: v for n, v in weights.items() if n in self._variables})

    def save(self, path: str | os.PathLike) -> str:
        return checkpoint_sharded.save(self.session, self._owned_saver, path, self.rank,
                                       comm.broadcast_object, comm.allgather_objects)

    def restore(self, path: str | os.PathLike) -> None:
        """Restore this rank's variables from a checkpoint written on any plan (or by a
        single-device run); every rank must call it."""
        checkpoint.restore(self.session, self._saver, path)
        self._random_step = None
        comm.allgather_objects(None, "dapple.restore.done")

    def close(self):
        self.watchdog.stop(remove_directory=self._remove_heartbeats)
        super().close()


def _slot_of_rank(plan: Plan, rank: int) -> Slot:
    for s, stage in enumerate(plan.stages):
        if rank in stage.devices:
            return Slot(s, stage.devices.index(rank))
    raise PlanError(f"rank {rank} holds no stage of plan {plan.notation} (devices "
                    f"{list(plan.devices)}); launch exactly one rank per plan device")


def _ranks_of_variable(plan: Plan, specs) -> dict[str, tuple[int, ...]]:
    """Variable -> every rank holding a stage that reads it (sorted)."""
    out: dict[str, set[int]] = {}
    for spec in specs:
        for v in spec.variables:
            out.setdefault(v, set()).update(plan.stages[spec.index].devices)
    return {v: tuple(sorted(r)) for v, r in out.items()}
