"""`layer(name)`: open a model layer explicitly (a top-level name scope of the template graph)."""

from __future__ import annotations

import contextlib
import re

import tensorflow as tf

_LAYER_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-]*$")


@contextlib.contextmanager
def layer(name: str):
    """Put every op created inside into the top-level name scope `name` (the layer the planner
    assigns to a stage) and variables created with `tf.compat.v1.get_variable` under the variable
    scope `name`. Entering the same name again adds to the same layer (no `_1` suffix), and a
    `layer()` nested in other scopes still opens a top-level scope."""
    if not isinstance(name, str) or not _LAYER_NAME.match(name):
        raise ValueError(f"layer name must be a valid TensorFlow op name without '/', got {name!r}")
    with tf.compat.v1.variable_scope(name, auxiliary_name_scope=False), tf.name_scope(name + "/"):
        yield
