"""Variables of the training graph, created in one `import_graph_def`.

Per variable the ops `tf.compat.v1.get_variable(name, initializer=zeros, use_resource=True)`
makes (a VarHandleOp named like the single-device variable, so checkpoints interchange, a zeros
initializer, its assign and a read), written as NodeDefs on the variable's device, imported at
once and wrapped as resource variables from their `VariableDef` (the public way
`import_meta_graph` rebuilds variables). Building them op by op in Python cost about 4 ms per
variable on the project machine (577 variables: 2-3 s); this costs under 1 ms. The runtime
loads the real initial values afterwards (`Trainer.set_weights`)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
from tensorflow.core.framework import graph_pb2, variable_pb2


def create_variables(variables: Mapping[str, tuple], graph: tf.Graph) -> dict[str, tf.Variable]:
    """variables: name -> (shape, dtype, trainable, device). Returns name -> tf.Variable, in
    the GLOBAL_VARIABLES (and TRAINABLE_VARIABLES) collections of `graph`."""
    graph_def = graph_pb2.GraphDef()
    for name, (shape, dtype, trainable, device) in variables.items():
        dtype = tf.as_dtype(dtype)
        shape = tf.TensorShape(shape)
        handle = _node(graph_def, name, "VarHandleOp", device)
        handle.attr["dtype"].type = dtype.as_datatype_enum
        handle.attr["shape"].shape.CopyFrom(shape.as_proto())
        handle.attr["shared_name"].s = name.encode()
        handle.attr["container"].s = b""
        handle.attr["debug_name"].s = f"{name}/".encode()
        handle.attr["allowed_devices"].list.SetInParent()
        dims = _node(graph_def, f"{name}/Initializer/zeros/shape_as_tensor", "Const", device)
        dims.attr["dtype"].type = tf.int32.as_datatype_enum
        dims.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(shape.as_list(), tf.int32))
        zero = _node(graph_def, f"{name}/Initializer/zeros/Const", "Const", device)
        zero.attr["dtype"].type = dtype.as_datatype_enum
        zero.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(0, dtype))
        zeros = _node(
            graph_def, f"{name}/Initializer/zeros", "Fill", device, [dims.name, zero.name]
        )
        zeros.attr["T"].type = dtype.as_datatype_enum
        zeros.attr["index_type"].type = tf.int32.as_datatype_enum
        assign = _node(graph_def, f"{name}/Assign", "AssignVariableOp", device, [name, zeros.name])
        assign.attr["dtype"].type = dtype.as_datatype_enum
        assign.attr["validate_shape"].b = False
        read = _node(graph_def, f"{name}/Read/ReadVariableOp", "ReadVariableOp", device, [name])
        read.attr["dtype"].type = dtype.as_datatype_enum
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
        created = {}
        for name, (shape, dtype, trainable, device) in variables.items():
            proto = variable_pb2.VariableDef(
                variable_name=f"{name}:0",
                initializer_name=f"{name}/Assign",
                snapshot_name=f"{name}/Read/ReadVariableOp:0",
                initial_value_name=f"{name}/Initializer/zeros:0",
                is_resource=True,
                trainable=trainable,
            )
            variable = tf.compat.v1.Variable(variable_def=proto, use_resource=True)
            tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, variable)
            if trainable:
                tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES, variable)
            created[name] = variable
    return created


def _node(graph_def, name, op, device, inputs=()):
    node = graph_def.node.add()
    node.name, node.op, node.device = name, op, device
    node.input.extend(inputs)
    return node
