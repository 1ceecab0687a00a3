"""The I/W split of a stage's backward for zero-bubble schedules, on GraphDefs
(graph_rewrite/backward_split.py `split_weight_gradients`)."""

import tensorflow as tf

from graph_rewrite.backward_split import split_weight_gradients
from graph_rewrite.graphdefs import GradRef

v1 = tf.compat.v1


def _backward(build):
    """The GraphDef `build()` makes, its placeholders dropped (inputs are function arguments),
    and what `build` returned."""
    graph = tf.Graph()
    with graph.as_default():
        out = build()
    backward = graph.as_graph_def()
    for k in reversed([k for k, n in enumerate(backward.node) if n.op == "Placeholder"]):
        del backward.node[k]
    return backward, out


def _dense_layer_backward():
    x = v1.placeholder(tf.float32, [4, 3], name="x")
    w = v1.placeholder(tf.float32, [3, 2], name="w")
    y = v1.placeholder(tf.float32, [4, 2], name="y")  # tanh output
    g = v1.placeholder(tf.float32, [4, 2], name="g")
    pre = tf.raw_ops.TanhGrad(y=y, dy=g, name="pre")
    grad_x = tf.matmul(pre, w, transpose_b=True, name="grad_x")
    grad_w = tf.matmul(x, pre, transpose_a=True, name="grad_w")
    grad_b = tf.reduce_sum(pre, axis=0, name="grad_b")
    return grad_x, grad_w, grad_b


def test_split_weight_gradients_leaves_a_dense_layers_weights_to_w():
    backward, (grad_x, grad_w, grad_b) = _backward(_dense_layer_backward)
    split = split_weight_gradients(
        backward, [grad_x.name], {"w": GradRef(dense=grad_w.name), "b": GradRef(dense=grad_b.name)}
    )
    weight_nodes = {n.name for n in split.weight_graph_def.node}
    input_nodes = {n.name for n in split.input_graph_def.node}
    assert set(split.variables) == {"w", "b"}
    assert {"grad_w", "grad_b"} <= weight_nodes and "pre" not in weight_nodes
    assert {"pre", "grad_x"} <= input_nodes and not {"grad_w", "grad_b"} & input_nodes
    assert all(n.op == "Const" for n in split.weight_graph_def.node if n.name in input_nodes)
    assert set(split.weight_inputs) == {"x:0", "pre:0"}
    assert split.input_results == ("pre:0",)  # the I call returns it for W


def test_a_weight_gradient_the_input_gradient_reads_stays_in_i():
    """Batch norm's beta: the sum over rows of the output gradient is beta's gradient and also
    flows into the input gradient."""

    def build():
        g = v1.placeholder(tf.float32, [4, 2], name="g")
        grad_beta = tf.reduce_sum(g, axis=0, name="grad_beta")
        grad_x = tf.subtract(g, grad_beta / 4.0, name="grad_x")
        return grad_x, grad_beta

    backward, (grad_x, grad_beta) = _backward(build)
    assert (
        split_weight_gradients(backward, [grad_x.name], {"beta": GradRef(grad_beta.name)}) is None
    )


def test_a_gradient_that_would_read_a_tensor_that_cannot_leave_i_stays_there():
    backward, (grad_x, grad_w, grad_b) = _backward(_dense_layer_backward)
    grads = {"w": GradRef(dense=grad_w.name), "b": GradRef(dense=grad_b.name)}
    blocked = split_weight_gradients(backward, [grad_x.name], grads, can_pass=lambda t: False)
    assert blocked is None  # both read TanhGrad's result, which I computes


def test_w_takes_a_gradient_whole_when_it_starts_in_i():
    """The sum of two uses' gradients: one term needs the input part's result, the sum does not."""

    def build():
        x = v1.placeholder(tf.float32, [4, 3], name="x")
        g = v1.placeholder(tf.float32, [4, 3], name="g")
        shared = tf.multiply(g, 2.0, name="shared")  # the input gradient reads it
        grad_x = tf.identity(shared, name="grad_x")
        grad_v = tf.add(tf.reduce_sum(shared * x, 0), tf.reduce_sum(g, 0), name="grad_v")
        return grad_x, grad_v

    backward, (grad_x, grad_v) = _backward(build)
    split = split_weight_gradients(backward, [grad_x.name], {"v": GradRef(dense=grad_v.name)})
    assert split.variables == ("v",)
    assert "shared" not in {n.name for n in split.weight_graph_def.node}
    assert set(split.weight_inputs) == {"shared:0", "x:0", "g:0"}
