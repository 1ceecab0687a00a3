"""PipeDream-2BW's two weight versions (schedule `pipedream-2bw`, docs/async.md).

With W(t) the weights before step t and W(-1) = W(0), step t computes the gradient of batch t's
loss at W(t-1) and applies it to W(t): W(t+1) = W(t) - opt(grad f(W(t-1); batch t)).

Per trainable variable the training graph holds a second variable, its *previous weights*
`dapple/previous_weights/<name>` (same shape, dtype and device; not trainable; one per variable,
so a variable tied across stages has one previous version too). Every forward, backward and
weight-gradient call of the step takes the previous weights' handle in place of the variable's
(the stage functions take variables as handle arguments: graph_rewrite/clone.py), so the
step's loss and gradients are those at W(t-1). The gradients are summed and synchronised as
in a synchronous step and the optimizer applies them to the variables themselves. In between,
after every call of the step (each read of the previous weights) and before the optimizer's
update, each previous version is assigned the variable's value W(t): the next step reads it.

The variables are global variables, so checkpoints hold both versions (and the optimizer's
state) and a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import tensorflow as tf

from . import variables as variables_pass

PREVIOUS_WEIGHTS_SCOPE = "dapple/previous_weights"


def previous_weights_name(variable: str) -> str:
    """The checkpoint and graph name of `variable`'s previous weights."""
    return f"{PREVIOUS_WEIGHTS_SCOPE}/{variable}"


def create_previous_weights(
    variables: Mapping[str, tf.Variable], graph: tf.Graph
) -> dict[str, tf.Variable]:
    """variable name -> its previous weights, for every trainable variable of `variables`,
    each on its variable's device (zeros until `copy_to_previous_weights` runs)."""
    trainable = {name: v for name, v in variables.items() if v.trainable}
    created = variables_pass.create_variables(
        {
            previous_weights_name(name): (v.shape, v.dtype.base_dtype, False, v.device)
            for name, v in trainable.items()
        },
        graph,
    )
    return {name: created[previous_weights_name(name)] for name in trainable}


def copy_to_previous_weights(
    previous: Mapping[str, tf.Variable],
    variables: Mapping[str, tf.Variable],
    after: Iterable[tf.Operation],
    name: str,
) -> tf.Operation:
    """One op assigning each previous version its variable's value, after the ops `after`
    (the step's reads of the previous weights); the optimizer's update must wait for it."""
    with tf.control_dependencies(list(after)), tf.name_scope(name + "/"):
        copies = []
        for variable, target in previous.items():
            with tf.device(target.device):
                copies.append(target.assign(variables[variable].read_value(), read_value=False))
        return tf.group(*copies, name="done")
