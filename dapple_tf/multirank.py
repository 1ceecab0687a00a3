"""`Trainer` under horovodrun / mpirun: one rank per plan device, rank d holds device id d.

`dapple_tf.Trainer(...)` returns a `MultiRankTrainer` when the launcher started more than one
rank; the user script does not change. On every rank, in the same order:
  1. Horovod starts (dapple_tf.comm.init); rank 0 loads or computes the plan ("auto" profiles
     and plans on rank 0 only) and broadcasts it.
  2. The template is built (same seed, same model_fn: the same graph on every rank), the
     process sets of the plan are registered (stage replica groups, tied-variable groups,
     boundary pairs, in one fixed order), and the rewrite builds only this rank's slots (one;
     under interleaved-1f1b one per stage of its device group) with
     a HorovodTransport (pair broadcasts) and a HorovodGradientSync (per-variable allreduce).
  3. The step ends with `step_end`: a global allreduce of each rank's share of the loss that
     runs after the optimizer update and after every collective of the step, so every rank
     returns the global-batch mean loss and no rank runs ahead.
  4. Variables start from the template's initial values and are then broadcast from the
     lowest rank holding them (replicas and tied users agree bit for bit).

Device: rank d uses its local GPU `local_rank` (every session of the process sees only that
GPU, as /GPU:0; pinned in comm.init before any session or device query), or /CPU:0 without
GPUs. The Watchdog (rank_failures.py) bounds every step's wait for other ranks.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from graph_rewrite import rewrite
from graph_rewrite.collective_transport import (
    CollectiveKeys,
    CollectiveTransport,
    all_reduce_sum,
    check_keys,
    fused_all_reduce_sum,
)
from graph_rewrite.horovod_transport import HorovodGradientSync, HorovodTransport
from graph_rewrite.partition import partition
from graph_rewrite.place import Slot
from graph_rewrite.template import build_template, initial_values
from planner.plan_format import Plan, PlanError
from planner.schedules import check_async_allowed

from . import checkpoint, checkpoint_sharded, comm, devices, process_sets, rank_failures, tf_cluster
from .boundary_exchange import BoundaryExchange
from .gradient_reduction import GradientReduction
from .trainer import Trainer, _prepare_reads, resolve_plan

v1 = tf.compat.v1


class MultiRankTrainer(Trainer):
    """Trainer of one rank of a multi-rank run (see module doc). Same public methods."""

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
        heartbeat_dir: str | None = None,
        transport: str | None = None,
        input_fn: Callable | None = None,
        stack_weight_gradients: bool = False,
        bound_zero_bubble_memory: bool = False,
        layers=None,
        allow_async: bool = False,
    ):
        self.global_batch_size = int(global_batch_size)
        self.input_fn = input_fn
        info = comm.init()
        self.rank, self.size = info.rank, info.size
        if isinstance(plan, Plan):
            chosen = plan
            self.plan = comm.share_plan(lambda: chosen)
        else:
            self.plan = comm.share_plan(
                lambda: resolve_plan(
                    plan,
                    model_fn,
                    feature_spec,
                    self.global_batch_size,
                    num_devices,
                    optimizer_fn,
                    ranks=self.size,
                    layers=layers,
                )
            )
        if self.plan.global_batch_size != self.global_batch_size:
            raise PlanError(
                f"plan is for global batch size {self.plan.global_batch_size}, but "
                f"the trainer was given {self.global_batch_size}"
            )
        check_async_allowed(self.plan.schedule, allow_async)
        self.slots = _slots_of_rank(self.plan, self.rank)
        self.template = build_template(model_fn, feature_spec, seed=seed, layers=layers)
        specs = partition(self.template, self.plan)
        self.ranks_of_variable = _ranks_of_variable(self.plan, specs)
        tied = [
            tuple(s for s, spec in enumerate(specs) if v in spec.variables)
            for v in self.template.variables
        ]
        tied = [stages for stages in dict.fromkeys(tied) if len(stages) > 1]

        kind = devices.device_kind()
        config = devices.pinned_config(
            devices.session_config(kind, 1, inter_op_threads, optimize_graph)
        )
        self.process_sets = process_sets.ProcessSets(
            self.plan, tied, boundaries=_stage_boundaries(specs)
        )
        self.collective_log = rank_failures.CollectiveLog()
        self.gradient_reduction = GradientReduction(self.process_sets, self.collective_log)
        self.transport_kind = _transport_kind(transport)
        self.keys = CollectiveKeys(
            self.size, process_sets.gradient_groups(self.plan, tied), self.plan.num_stages
        )
        timeout_s = comm.step_timeout_s()
        if self.transport_kind == "tf":
            self.cluster = tf_cluster.start(self.rank, self.size, comm.allgather_objects, config)
            device = self.cluster.device(kind)
            transport = CollectiveTransport(self.plan, self.rank, self.keys, device, timeout_s)
        else:
            self.cluster = None
            device = devices.device_name(0, kind)
            exchange = BoundaryExchange(self.process_sets, self.rank, self.collective_log)
            transport = HorovodTransport(self.plan, self.rank, exchange, device)

        def tf_sums(grads, ranks, device_of_variable):
            order = list(reversed(self.template.variables))  # later layers' gradients first
            return fused_all_reduce_sum(
                grads,
                order,
                ranks,
                self.keys,
                device_of_variable,
                comm.fusion_bytes(),
                timeout_s,
                self.collective_log,
            )

        def tf_sum_over_all_ranks(tensor, name):
            self.collective_log.add(name, range(self.size))
            return all_reduce_sum(tensor, range(self.size), self.keys, name, timeout_s)

        use_tf = self.transport_kind == "tf"
        self.gradient_sums = _gradient_sum_kind(self.transport_kind)
        sync = HorovodGradientSync(
            self.gradient_reduction,
            self.ranks_of_variable,
            self.rank,
            comm.allgather_objects,
            sum_dense=tf_sums if self.gradient_sums == "tf" else None,
            sum_over_all_ranks=tf_sum_over_all_ranks if use_tf else None,
        )
        self.rewritten = rewrite(
            self.template,
            self.plan,
            optimizer_fn,
            device_name=lambda d: device,
            clip_norm=clip_norm,
            local_slots=self.slots,
            transport=transport,
            gradient_sync=sync,
            input_fn=input_fn,
            stack_weight_gradients=stack_weight_gradients,
            bound_zero_bubble_memory=bound_zero_bubble_memory,
        )
        self.graph = self.rewritten.graph
        self.features = self.rewritten.features
        self.feature_rows = self.rewritten.feature_rows
        self.train_op = self.rewritten.train_op
        self._global_step_var = self.rewritten.global_step
        self._previous_weights_reset = self.rewritten.reset_previous_weights
        with self.graph.as_default(), tf.device(device):
            holds_loss = any(slot.stage == self.plan.num_stages - 1 for slot in self.slots)
            share = self.rewritten.loss if holds_loss else tf.constant(0.0, tf.float32)
            share = tf.cast(share, tf.float32)
            ends = [op for op in self.rewritten.end_ops.values()]
            after = [self.train_op] + ends + transport.outgoing
            if self.transport_kind == "tf":
                self.loss = self._tf_step_end(share, after, timeout_s)
            else:
                self.loss = self.gradient_reduction.step_end(share, after)
            self._broadcast_init = tf.group(
                *[
                    self.gradient_reduction.broadcast_variable(
                        var, name, self.ranks_of_variable[name]
                    )
                    for name, var in sorted(self.rewritten.variables.items())
                    if len(self.ranks_of_variable[name]) > 1
                ],
                name="dapple/init/broadcast",
            )
        check_keys(
            self.keys.names,
            comm.allgather_objects(self.keys.names, "dapple.collective_keys"),
            self.rank,
        )
        self._prepare_sharded_saver()
        target = self.cluster.target if self.cluster is not None else None
        if self.cluster is not None:
            config = self.cluster.session_config(config)
        self.session = devices.new_session(self.graph, comm.session_config(config), target=target)
        _prepare_reads(self)
        self._finish_init()
        self.set_weights(
            initial_values(
                self.template, devices.pinned_config(), names=set(self.rewritten.variables)
            )
        )
        self.session.run(self._broadcast_init)
        self._reset_previous_weights()
        directory, temporary = rank_failures.shared_heartbeat_dir(heartbeat_dir)
        self._remove_heartbeats = temporary and self.rank == 0
        self.watchdog = rank_failures.Watchdog(
            self.rank, self.size, directory, self.collective_log
        ).start()
        self._steps_run = 0

    # ---- setup helpers ------------------------------------------------------------------------
    def _tf_step_end(self, local_loss, control_inputs, timeout_s):
        """The step's last collective (see GradientReduction.step_end), as a TF all-reduce."""
        name = "dapple/step_end"
        self.collective_log.add(name, range(self.size))
        with tf.control_dependencies(list(control_inputs)):
            local_loss = tf.identity(local_loss)
        return all_reduce_sum(local_loss, range(self.size), self.keys, name, timeout_s)

    def _prepare_sharded_saver(self):
        local = sorted(checkpoint.variables_by_name(self.graph))
        everyone = comm.allgather_objects(local, "dapple.variable_names")
        self._owner = checkpoint_sharded.owners(everyone, self.plan.devices)
        self._all_variable_ranks = {}
        for rank, names in enumerate(everyone):
            for name in names:
                self._all_variable_ranks.setdefault(name, []).append(rank)
        owned = {
            n: v
            for n, v in checkpoint.variables_by_name(self.graph).items()
            if self._owner[n] == self.rank
        }
        with self.graph.as_default():
            self._owned_saver = (
                v1.train.Saver(var_list=owned, max_to_keep=None, save_relative_paths=True)
                if owned
                else None
            )

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, np.ndarray] | None = None, run_metadata=None) -> float:
        self.watchdog.step_begin(self._steps_run)
        try:
            loss = super().train_step(batch, run_metadata=run_metadata)
        except tf.errors.OpError as e:
            if not _is_collective_failure(e):
                raise
            message = rank_failures.explain_collective_failure(self.watchdog, e, self._steps_run)
            print(message, flush=True)
            raise rank_failures.PeerLostError(message) from e
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
            raise KeyError(
                f"set_weights: unknown variables {unknown}; this model has "
                f"{sorted(self._all_variable_ranks)}"
            )
        super().set_weights({n: v for n, v in weights.items() if n in self._variables})

    def save(self, path: str | os.PathLike) -> str:
        return checkpoint_sharded.save(
            self.session,
            self._owned_saver,
            path,
            self.rank,
            comm.broadcast_object,
            comm.allgather_objects,
        )

    def restore(self, path: str | os.PathLike) -> None:
        """Restore this rank's variables from a checkpoint written on any plan (or by a
        single-device run); every rank must call it."""
        checkpoint.restore(self.session, self._saver, path, self._newest_only)
        self._random_step = None
        comm.allgather_objects(None, "dapple.restore.done")

    def close(self):
        self.watchdog.stop(remove_directory=self._remove_heartbeats)
        super().close()


def _is_collective_failure(error: Exception) -> bool:
    """A step failed in a collective (Horovod's or TF's): a peer is likely gone."""
    op = getattr(getattr(error, "op", None), "name", "") or ""
    text = str(error).lower()
    return "horovod" in text or "collective" in text or op.startswith("dapple/")


TRANSPORTS = ("tf", "horovod")


def _transport_kind(requested: str | None) -> str:
    """The boundary transport: `transport=` if given, else DAPPLE_TRANSPORT, else "tf" (TF
    collective broadcasts between per-rank servers); "horovod": Horovod pair broadcasts."""
    kind = requested or os.environ.get("DAPPLE_TRANSPORT") or "tf"
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    return kind


def _gradient_sum_kind(transport: str) -> str:
    """Who sums dense gradients across ranks: DAPPLE_GRADIENT_SUMS ("horovod", the default:
    Horovod allreduce, with its tensor fusion; "tf": TF collective all-reduces of fused buckets,
    over the TF servers' gRPC). Measured on the 2-core machine, DP2 of bench_scaling's MLP,
    idle machine: 425 ms a step with Horovod, 494 ms with TF (TF's gRPC moved about 100 MB/s)."""
    del transport  # either transport works with either kind of sum
    kind = os.environ.get("DAPPLE_GRADIENT_SUMS") or "horovod"
    if kind not in TRANSPORTS:
        raise ValueError(f"DAPPLE_GRADIENT_SUMS must be one of {TRANSPORTS}, got {kind!r}")
    return kind


def _slots_of_rank(plan: Plan, rank: int) -> list[Slot]:
    """The slots of plan device `rank`: one, or under interleaved-1f1b one per stage of its
    device group (v chunks)."""
    slots = [
        Slot(s, stage.devices.index(rank))
        for s, stage in enumerate(plan.stages)
        if rank in stage.devices
    ]
    if not slots:
        raise PlanError(
            f"rank {rank} holds no stage of plan {plan.notation} (devices "
            f"{list(plan.devices)}); launch exactly one rank per plan device"
        )
    return slots


def _stage_boundaries(specs) -> list[tuple[int, int]]:
    """(from stage, to stage) for every pair of stages that exchange tensors, sorted (the same
    on every rank: specs come from the same template and plan)."""
    return sorted({(spec.index, b) for spec in specs for b in spec.consumer_stages})


def _ranks_of_variable(plan: Plan, specs) -> dict[str, tuple[int, ...]]:
    """Variable -> every rank holding a stage that reads it, or updates it (batch norm's moving
    statistics), sorted."""
    out: dict[str, set[int]] = {}
    for spec in specs:
        for v in spec.held_variables:
            out.setdefault(v, set()).update(plan.stages[spec.index].devices)
    return {v: tuple(sorted(r)) for v, r in out.items()}
