"""Checkpoints keyed by single-device variable names, so pipelined and plain single-device runs
restore each other's checkpoints. Holds every global variable: model variables, optimizer
slots (e.g. `layer_0/dense/kernel/Adam`), the optimizer's non-slot variables and global_step."""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from graph_rewrite.weight_versions import PREVIOUS_WEIGHTS_SCOPE

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
    _check_weight_versions(path, session.graph)
    with session.graph.as_default():
        saver.restore(session, path)


def _check_weight_versions(path: str, graph: tf.Graph) -> None:
    """A checkpoint of an asynchronous schedule (pipedream-2bw) holds each weight's previous
    version too (`dapple/previous_weights/<name>`, graph_rewrite/weight_versions.py): a
    synchronous graph restores the newest version, the variables' own names, with a warning.
    A pipedream-2bw graph needs the previous versions: refuse a checkpoint without them."""
    prefix = PREVIOUS_WEIGHTS_SCOPE + "/"
    saved = {name for name, _ in tf.train.list_variables(path)}
    present = set(variables_by_name(graph))
    if any(n.startswith(prefix) and n not in present for n in saved):
        warnings.warn(
            f"checkpoint {path} was saved under an asynchronous schedule (pipedream-2bw) and "
            f"holds two versions of the weights; restoring the newest one (the weights the "
            f"next step would have updated) into this synchronous trainer",
            stacklevel=3,
        )
    missing = sorted(n for n in present if n.startswith(prefix) and n not in saved)
    if missing:
        raise ValueError(
            f"checkpoint {path} holds one version of the weights, but this trainer's "
            f"schedule (pipedream-2bw) needs the previous version too ({len(missing)} "
            f"variables, e.g. '{missing[0]}'): restore checkpoints saved under pipedream-2bw"
        )


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
