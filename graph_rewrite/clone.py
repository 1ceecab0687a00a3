"""Clone: one call of a stage's forward or backward function per (micro-batch, slot).

The call op is named `<prefix>/fwd` or `<prefix>/bwd` (split schedules: `<prefix>/igrad` and
`<prefix>/wgrad`, the I and W actions) and placed on the slot's device; its
arguments wire the function to the real inputs (micro-batch rows, received tensors, received
gradients, running gradient sums) and to the training graph's variable handles, which all
clones share (variables are never cloned). When the session inlines the call, the stage's ops
run as `<prefix>/fwd/<template op>` on that device.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import tensorflow as tf

from . import functions
from .stage_graph import StageFunction, StageGraph


def clone_prefix(micro_batch: int, slot_tag: str) -> str:
    return f"dapple/mb{micro_batch}/{slot_tag}"


def call_forward(
    stage: StageGraph,
    device: str,
    prefix: str,
    features: Mapping[str, tf.Tensor],
    received: Mapping[str, tf.Tensor],
    handles: Mapping[str, tf.Tensor],
    transposed: Mapping[str, tf.Tensor] | None = None,
) -> tuple[dict[str, tf.Tensor], tf.Operation]:
    """Call the stage's forward; returns (template tensor name -> clone tensor for every tensor
    the stage sends on, its loss, every forward tensor its backward reads, and its inputs;
    the call op). `transposed`: variable -> its value transposed, for
    `stage.transposed_weights`."""
    inputs = {}
    for feature, ph in stage.feature_inputs.items():
        inputs[ph] = features[feature]
    for t, ph in stage.boundary_inputs.items():
        inputs[ph] = received[t]
    for v in stage.forward_variables:
        inputs[f"{v}:0"] = handles[v]
    for t, v in stage.transposed_weights.items():
        inputs[t] = transposed[v]
    return _call(
        stage.forward_function, inputs, device, prefix + "/fwd", stage.backward_only_forward_results
    )


@dataclasses.dataclass(frozen=True)
class BackwardCall:
    """What one call of a stage's backward returns."""

    input_grads: dict[str, tf.Tensor]  # input tensor -> its gradient
    variable_grads: dict  # variable -> the new running sum if dense, else tf.IndexedSlices
    # this micro-batch's inputs of the stacked gradients or of its W call (deferred weights)
    weight_inputs: dict[str, tf.Tensor]
    op: tf.Operation  # the call: a control edge from it waits for all its results


def call_backward(
    stage: StageGraph,
    device: str,
    prefix: str,
    forward: Mapping[str, tf.Tensor],
    grad_inputs: Mapping[str, tf.Tensor],
    loss_grad: tf.Tensor | None,
    handles: Mapping[str, tf.Tensor],
    running_sums: Mapping[str, tf.Tensor],
    call_name: str = "bwd",
) -> BackwardCall:
    """Call the stage's backward (`<prefix>/<call_name>`: `bwd`, or `igrad` for a split
    schedule's I action). `running_sums`: variable -> dense gradient summed over the slot's
    earlier micro-batches (empty for its first backward; sums of other variables, such as those
    of deferred weight gradients, are not read)."""
    inputs = {ph: forward[t] for ph, t in stage.forward_refs.items()}
    for t, ph in stage.grad_inputs.items():
        inputs[ph] = grad_inputs[t]
    if stage.loss_grad_input is not None:
        inputs[stage.loss_grad_input] = loss_grad
    for v in stage.backward_variables:
        inputs[f"{v}:0"] = handles[v]
    accumulating = bool(stage.running_sum_inputs) and all(
        v in running_sums for v in stage.running_sum_inputs
    )
    if accumulating:
        for v, ph in stage.running_sum_inputs.items():
            inputs[ph] = running_sums[v]
    function = stage.backward_accumulate_function if accumulating else stage.backward_function
    tensors, op = _call(function, inputs, device, f"{prefix}/{call_name}")
    returned = iter(tensors[name] for name in stage.backward_results(accumulating))
    input_grads = {t: next(returned) for t in stage.input_grads}
    variable_grads = _variable_grads(returned, stage.variable_grads)
    weight_inputs = stage.weight_gradient_inputs + stage.weight_gradient_constants
    if stage.deferred_weights is not None:
        weight_inputs = stage.deferred_weights.inputs
    return BackwardCall(input_grads, variable_grads, {t: tensors[t] for t in weight_inputs}, op)


def _variable_grads(returned, grad_refs) -> dict:
    """variable -> its dense gradient or tf.IndexedSlices, read from the call's results in
    order."""
    variable_grads = {}
    for v, ref in grad_refs.items():
        if ref.dense:
            variable_grads[v] = next(returned)
        else:
            indices, values, dense_shape = next(returned), next(returned), next(returned)
            variable_grads[v] = tf.IndexedSlices(values, indices, dense_shape)
    return variable_grads


@dataclasses.dataclass(frozen=True)
class WeightCall:
    """What one call of a stage's deferred weight gradients (a W action) returns."""

    variable_grads: dict  # variable -> the new running sum if dense, else tf.IndexedSlices
    op: tf.Operation


def call_deferred_weights(
    stage: StageGraph,
    device: str,
    prefix: str,
    inputs: Mapping[str, tf.Tensor],
    running_sums: Mapping[str, tf.Tensor],
) -> WeightCall:
    """Call the stage's deferred weight gradients (`<prefix>/wgrad`) on `inputs`, the
    `weight_inputs` of one micro-batch's backward call. `running_sums`: variable -> dense
    gradient summed over the slot's earlier micro-batches, added to if it holds every dense
    deferred gradient (the slot's first W call: none)."""
    deferred = stage.deferred_weights
    args = dict(inputs)
    accumulating = bool(deferred.running_sum_inputs) and all(
        v in running_sums for v in deferred.running_sum_inputs
    )
    if accumulating:
        for v, ph in deferred.running_sum_inputs.items():
            args[ph] = running_sums[v]
    function = deferred.accumulate_function if accumulating else deferred.function
    tensors, op = _call(function, args, device, prefix + "/wgrad")
    returned = iter(tensors[name] for name in deferred.results(accumulating))
    return WeightCall(_variable_grads(returned, deferred.variable_grads), op)


def call_weight_gradients(
    stage: StageGraph,
    device: str,
    name: str,
    stacked: Mapping[str, tf.Tensor],
    handles: Mapping[str, tf.Tensor],
) -> dict[str, tf.Tensor]:
    """Call the stage's stacked weight-gradient function once: `stacked` maps each of its row
    inputs to that tensor of every micro-batch concatenated along axis 0, and each of its step
    constants to its value. Returns variable -> its gradient summed over those micro-batches."""
    inputs = dict(stacked)
    for v in stage.weight_gradient_variables:
        inputs[f"{v}:0"] = handles[v]
    tensors, _ = _call(stage.weight_gradient_function, inputs, device, name)
    return {v: tensors[t] for v, t in stage.stacked_gradients.items()}


def _call(
    function: StageFunction,
    inputs: Mapping[str, tf.Tensor],
    device: str,
    name: str,
    unshaped: frozenset[int] = frozenset(),
) -> tuple[dict[str, tf.Tensor], tf.Operation]:
    """Call `function` on `device`; returns (output name -> tensor, plus the inputs: names the
    caller asks for may be inputs passed straight through; the call op). Results at the indices
    in `unshaped` keep unknown static shapes."""
    with tf.device(device):
        op = functions.call(
            function.name,
            [inputs[t] for t in function.inputs],
            function.output_specs,
            name,
            unshaped,
        )
    tensors = dict(zip(function.outputs, op.outputs))
    tensors.update(inputs)
    return tensors, op
