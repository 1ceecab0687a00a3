"""Checkpoints keyed by single-device variable names, so pipelined and plain single-device runs
restore each other's checkpoints. Holds every global variable: model variables, optimizer
slots (e.g. `layer_0/dense/kernel/Adam`), the optimizer's non-slot variables and global_step."""

from __future__ import annotations

import os

import tensorflow as tf

v1 = tf.compat.v1


def variables_by_name(graph: tf.Graph) -> dict[str, tf.Variable]:
    return {v.op.name: v for v in graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}


def make_saver(graph: tf.Graph) -> v1.train.Saver:
    with graph.as_default():
        return v1.train.Saver(
            var_list=variables_by_name(graph),
            max_to_keep=None,
            save_relative_paths=True,
            sharded=False,
        )


def save(session, saver, path: str | os.PathLike) -> str:
    """Write checkpoint `path` (a prefix: path.index, path.data-*) atomically: written under a
    temporary prefix, then renamed, the index last."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with session.graph.as_default():  # Saver.save takes its eager path outside a graph
        written = saver.save(session, tmp, write_meta_graph=False, write_state=False)
    parts = sorted(f for f in os.listdir(directory) if f.startswith(os.path.basename(tmp) + "."))
    for f in sorted(parts, key=lambda f: f.endswith(".index")):
        os.replace(
            os.path.join(directory, f),
            os.path.join(directory, os.path.basename(path) + f[len(os.path.basename(tmp)) :]),
        )
    assert written.startswith(tmp)
    return path


def restore(session, saver, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}.index)")
    with session.graph.as_default():
        saver.restore(session, path)


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """None if checkpoint `path` reads completely (index and every tensor, whose checksums TF
    verifies on read), else why not: a truncated or corrupt file, or a missing data shard."""
    path = os.fspath(path)
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # The reader translates TF status codes into Python built-ins (a short read of a truncated
    # data file is an IndexError, a bad index a DataLossError), hence the list.
    except (tf.errors.OpError, ValueError, OSError, IndexError, RuntimeError) as e:
        message = getattr(e, "message", None) or str(e)
        return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"
    return None
