"""Sharded checkpoints of a multi-rank run, readable as one ordinary TF checkpoint.

Every variable is written once, by its *owner*: the first replica of the first stage that holds
it (variables every rank holds, like global_step and the optimizer's non-slot variables, belong
to stage 0's first replica). So each stage's first replica writes one shard (stage 0's also the
global variables); replicas never write. The shards are then merged, by rank 0, into one
checkpoint `path` (`path.index` + `path.data-0000k-of-0000n`, one data file per shard) with
TensorFlow's own MergeV2Checkpoints, the op a sharded `Saver` uses. Keys are the single-device
variable names, so the checkpoint restores on any plan, on any number of ranks, and in a plain
single-device graph (dapple_tf.checkpoint.restore, `tf.compat.v1.train.Saver`).

Atomic: shards go to `<path>.tmp-<token>/`, the merge writes `<tmp>/merged`, whose data files
are renamed to their final names first and the index last; a crash before that last rename
leaves the previous checkpoint (and what `checkpoint.json` names) untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable, Sequence

import tensorflow as tf

from .devices import new_session

v1 = tf.compat.v1


def owners(variables_by_rank: Sequence[Sequence[str]], rank_order: Sequence[int]) -> dict[str, int]:
    """variable -> owning rank: the first rank in `rank_order` (the plan's devices in stage
    order, so each stage's first replica comes before its other replicas) that holds it."""
    owner: dict[str, int] = {}
    for rank in rank_order:
        for name in variables_by_rank[rank]:
            owner.setdefault(name, rank)
    return owner


def save(
    session,
    saver_of_owned: v1.train.Saver | None,
    path: str | os.PathLike,
    rank: int,
    broadcast: Callable[[object, str], object],
    allgather: Callable[[object, str], list],
) -> str:
    """Write this rank's shard (if it owns variables), then rank 0 merges all shards into the
    checkpoint `path`. Every rank must call it; all return once `path` is complete."""
    path = os.path.abspath(os.fspath(path))
    token = broadcast(uuid.uuid4().hex[:12] if rank == 0 else None, "dapple.save.token")
    tmp_dir = f"{path}.tmp-{token}"
    os.makedirs(tmp_dir, exist_ok=True)
    shard = None
    if saver_of_owned is not None:
        with session.graph.as_default():  # Saver.save takes its eager path outside a graph
            shard = saver_of_owned.save(
                session,
                os.path.join(tmp_dir, f"shard-rank{rank}"),
                write_meta_graph=False,
                write_state=False,
            )
    shards = [s for s in allgather(shard, "dapple.save.shards") if s is not None]
    error = None
    if rank == 0:
        try:
            _merge(shards, tmp_dir, path)
        except Exception as e:  # noqa: BLE001 - every rank must learn about it
            error = f"{type(e).__name__}: {e}"
    error = broadcast(error, "dapple.save.done")
    if error:
        raise RuntimeError(f"saving checkpoint {path} failed on rank 0: {error}")
    return path


def _merge(shards: list[str], tmp_dir: str, path: str) -> None:
    merged = os.path.join(tmp_dir, "merged")
    with tf.Graph().as_default(), new_session() as session:
        session.run(
            tf.raw_ops.MergeV2Checkpoints(
                checkpoint_prefixes=shards, destination_prefix=merged, delete_old_dirs=False
            )
        )
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    files = sorted(f for f in os.listdir(tmp_dir) if f.startswith("merged."))
    for f in sorted(files, key=lambda f: f.endswith(".index")):  # the index last
        os.replace(os.path.join(tmp_dir, f), path + f[len("merged") :])
    shutil.rmtree(tmp_dir, ignore_errors=True)
