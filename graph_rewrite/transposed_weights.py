"""Forward matmuls of micro-batched CPU stages read their weights transposed, once per step.

TensorFlow's oneDNN matmul on x86 CPUs runs `MatMul(x, W)` at half speed when `x` has fewer
than 512 rows, while `MatMul(x, W', transpose_b=True)` with `W'` the stored transpose of `W`
runs at full speed (one core, W 1024x1024, 64 rows: 25.6 against 14.3 ms per 512 rows; at
512 rows both 12.2 ms; bench/README.md, "Micro-batching on one device"). A pipelined stage
multiplies micro-batch rows, so every forward dense layer paid that factor of two.

This pass rewires such a forward MatMul, when its weight is a variable read (the dense
layers of every model here and of `tf.compat.v1.layers.dense`), to read a new function
input: the variable's value transposed, computed once per step per slot by the caller and
shared by the slot's micro-batches. The gradients are unchanged (they read the variable, not
the transposed copy) and the values are the same products, so training stays equal to
single-device training to float rounding. The copy costs one transpose per weight per step
and the weight's memory again while the step's forwards run.
"""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2, types_pb2

from dapple_tf import compat

from . import graphdefs

TRANSPOSED_INPUT_PREFIX = "dapple_transposed"
SMALL_ROWS = 512  # below this many rows oneDNN's MatMul(x, W) was measured at half speed


def prefers_transposed_weights(device: str, rows: int | None) -> bool:
    """True where the pass pays: a CPU stage with oneDNN's kernels on (TensorFlow's Eigen
    MatMul is slower with the transposed operand: 65 against 26 ms per 512 rows at 64 rows)
    and fewer than SMALL_ROWS rows per call."""
    return (
        "CPU" in device.upper()
        and rows is not None
        and rows < SMALL_ROWS
        and compat.onednn_enabled()
    )


def transpose_weight_reads(forward: graph_pb2.GraphDef, variables) -> dict[str, str]:
    """Rewire in place every float32 `MatMul(a, ReadVariableOp(v))` of `forward` with
    transpose_b false, v one of `variables` (handles that are function inputs, not nodes), to
    `MatMul(a, <TRANSPOSED_INPUT_PREFIX>/<v>:0, transpose_b=True)`. Returns that new input
    tensor name -> v, for the caller to feed with v's value transposed."""
    variables = set(variables)
    read_of = {}  # ReadVariableOp name -> variable it reads
    for node in forward.node:
        if node.op == "ReadVariableOp" and node.input:
            source = graphdefs.split_tensor_name(node.input[0])[0]
            if source in variables:
                read_of[node.name] = source
    inputs = {}
    for node in forward.node:
        if node.op != "MatMul" or node.attr["T"].type != types_pb2.DT_FLOAT:
            continue
        if node.attr["transpose_b"].b:
            continue
        op, index = graphdefs.split_tensor_name(node.input[1])
        if op not in read_of or index != 0:
            continue
        name = f"{TRANSPOSED_INPUT_PREFIX}/{read_of[op]}:0"
        inputs[name] = read_of[op]
        node.input[1] = name
        node.attr["transpose_b"].b = True
    return inputs
