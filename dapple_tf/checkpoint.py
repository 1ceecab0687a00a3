"""Checkpoints keyed by single-device variable names, so pipelined and plain single-device runs
restore each other's checkpoints. Holds every global variable: model variables, optimizer
slots (e.g. `layer_0/dense/kernel/Adam`), the optimizer's non-slot variables and global_step;
under pipedream-2bw also each weight's previous version (`restore` says how they interchange)."""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from graph_rewrite.weight_versions import PREVIOUS_WEIGHTS_SCOPE

v1 = tf.compat.v1


def variables_by_name(graph: tf.Graph) -> dict[str, tf.Variable]:
    return {v.op.name: v for v in graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}


def make_saver(graph: tf.Graph, without_previous_weights: bool = False) -> v1.train.Saver:
    """A saver of every global variable of `graph` (but pipedream-2bw's previous weights when
    `without_previous_weights`)."""
    var_list = variables_by_name(graph)
    if without_previous_weights:
        var_list = {n: v for n, v in var_list.items() if not _is_previous_weights(n)}
    with graph.as_default():
        return v1.train.Saver(
            var_list=var_list,
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


def restore(session, saver, path: str | os.PathLike, newest_only=None) -> None:
    """Restore checkpoint `path` with `saver`. Weight versions (pipedream-2bw,
    graph_rewrite/weight_versions.py, `dapple/previous_weights/<name>`): a synchronous graph
    restores a pipedream-2bw checkpoint's newest weights, the variables' own names, with a
    warning. A pipedream-2bw graph restores a checkpoint without previous weights (saved by a
    synchronous run) through `newest_only` = (a saver without the previous weights, the op
    setting them to the variables), so the pair starts over as at step 0, with a warning."""
    path = os.fspath(path)
    if not os.path.exists(path + ".index"):
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path}.index)")
    saved = {name for name, _ in tf.train.list_variables(path)}
    present = set(variables_by_name(session.graph))
    if any(_is_previous_weights(n) and n not in present for n in saved):
        warnings.warn(
            f"checkpoint {path} was saved under an asynchronous schedule (pipedream-2bw) and "
            f"holds two versions of the weights; restoring the newest one (the weights the "
            f"next step would have updated) into this synchronous trainer",
            stacklevel=3,
        )
    missing = sorted(n for n in present if _is_previous_weights(n) and n not in saved)
    if missing and (newest_only is None or any(_is_previous_weights(n) for n in saved)):
        raise ValueError(
            f"checkpoint {path} lacks previous weights this pipedream-2bw graph holds "
            f"({len(missing)} variables, e.g. '{missing[0]}')"
        )
    with session.graph.as_default():
        if missing:
            warnings.warn(
                f"checkpoint {path} holds one version of the weights (saved under a "
                f"synchronous schedule); pipedream-2bw starts its previous weights from them, "
                f"as at step 0",
                stacklevel=3,
            )
            saver_without_previous, reset_previous = newest_only
            saver_without_previous.restore(session, path)
            session.run(reset_previous)
        else:
            saver.restore(session, path)


def _is_previous_weights(name: str) -> bool:
    return name.startswith(PREVIOUS_WEIGHTS_SCOPE + "/")


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
