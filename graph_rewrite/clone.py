"""Clone: import a stage's forward or backward GraphDef once per (micro-batch, slot).

`import_graph_def` copies the stage's ops under the name prefix of the clone and the device of
its slot; `input_map` wires placeholders to the real inputs (micro-batch rows, received
tensors, received gradients) and the template's variable handles to the training graph's
variables, which are shared by all clones (variables are never cloned).
"""
from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from .stage_graph import StageGraph


def clone_prefix(micro_batch: int, slot_tag: str) -> str:
    return f"dapple/mb{micro_batch}/{slot_tag}"


def import_forward(stage: StageGraph, device: str, prefix: str,
                   features: Mapping[str, tf.Tensor], received: Mapping[str, tf.Tensor],
                   handles: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Import the forward clone; returns template tensor name -> clone tensor for every tensor
    the stage sends on, its loss, every forward tensor its backward reads, and its inputs."""
    input_map = {}
    for feature, ph in stage.feature_inputs.items():
        input_map[ph] = features[feature]
    for t, ph in stage.boundary_inputs.items():
        input_map[ph] = received[t]
    for v in stage.forward_variables:
        input_map[f"{v}:0"] = handles[v]
    return _import(stage.forward, stage.forward_reads, input_map,
                   list(stage.spec.outputs) + ([stage.loss] if stage.loss else []) +
                   list(stage.forward_refs.values()), device, prefix + "/fwd")


def import_backward(stage: StageGraph, device: str, prefix: str,
                    forward: Mapping[str, tf.Tensor], grad_inputs: Mapping[str, tf.Tensor],
                    loss_grad: tf.Tensor | None,
                    handles: Mapping[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], dict]:
    """Import the backward clone. Returns (input tensor -> its gradient, variable -> gradient
    (tf.Tensor or tf.IndexedSlices))."""
    input_map = {ph: forward[t] for ph, t in stage.forward_refs.items()}
    for t, ph in stage.grad_inputs.items():
        input_map[ph] = grad_inputs[t]
    if stage.loss_grad_input is not None:
        input_map[stage.loss_grad_input] = loss_grad
    for v in stage.backward_variables:
        input_map[f"{v}:0"] = handles[v]
    wanted: list[str] = list(stage.input_grads.values())
    for ref in stage.variable_grads.values():
        wanted += [ref.dense] if ref.dense else [ref.indices, ref.values, ref.dense_shape]
    tensors = _import(stage.backward, stage.backward_reads, input_map, wanted, device,
                      prefix + "/bwd")
    returned = iter(tensors[name] for name in wanted)
    input_grads = {t: next(returned) for t in stage.input_grads}
    variable_grads = {}
    for v, ref in stage.variable_grads.items():
        if ref.dense:
            variable_grads[v] = next(returned)
        else:
            indices, values, dense_shape = next(returned), next(returned), next(returned)
            variable_grads[v] = tf.IndexedSlices(values, indices, dense_shape)
    return input_grads, variable_grads


def _import(graph_def, reads, input_map, wanted, device, name) -> dict[str, tf.Tensor]:
    """Import under `device`; returns wanted tensor name -> tensor, resolving names that are
    inputs (possibly passed straight through) from `input_map`."""
    input_map = {k: v for k, v in input_map.items() if k in reads}
    fetch = list(dict.fromkeys(t for t in wanted if t not in input_map))
    with tf.device(device):
        returned = tf.graph_util.import_graph_def(graph_def, input_map=input_map,
                                                  return_elements=fetch, name=name)
    tensors = dict(zip(fetch, returned))
    tensors.update(input_map)
    return tensors
