"""Stage functions (graph_rewrite/functions.py): a GraphDef turned into a FunctionDef computes
what the GraphDef computes, and a call behaves like the ops it replaces in a session: inlined
under the call's name, on the call's device, finished before anything that depends on the call."""

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf.devices import session_config
from graph_rewrite import functions

v1 = tf.compat.v1
CPU = "/job:localhost/replica:0/task:0/device:CPU:{}"


def body_graph():
    """A GraphDef reading placeholder `x` [4, 6] and a variable handle `w` [6, 6]: multi-output
    ops (Split, Unstack), a while loop (library functions) and a resource read."""
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [4, 6], name="x")
        handle = v1.placeholder(tf.resource, [], name="w")
        w = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)
        w.set_shape([6, 6])
        h = tf.matmul(x, w, name="layer/matmul")
        left, right = tf.split(h, 2, axis=1, name="layer/split")
        rows = tf.unstack(right, name="layer/rows")
        _, looped = tf.while_loop(
            lambda i, a: i < 3,
            lambda i, a: (i + 1, tf.tanh(a) * 1.5),
            [tf.constant(0), left],
            name="layer/loop",
        )
        tf.add(looped, rows[2], name="layer/out")
    graph_def = graph.as_graph_def()
    kept = [n for n in graph_def.node if n.op != "Placeholder"]
    del graph_def.node[:]
    graph_def.node.extend(kept)
    return graph_def, ["layer/out:0", "layer/split:1", "layer/rows:3"]


def expected(x, w):
    h = x @ w
    left, right = h[:, :3], h[:, 3:]
    for _ in range(3):
        left = np.tanh(left) * 1.5
    return [left + right[2], right, right[3]]


def make_function(graph_def, outputs, name="dapple_test_body"):
    return functions.function_def(
        graph_def,
        name,
        [("x:0", tf.float32), ("w", tf.resource)],
        [(t, tf.float32) for t in outputs],
    )


def call_graph(call_device, variable_device, num_calls=1):
    graph_def, outputs = body_graph()
    fdef = make_function(graph_def, outputs)
    graph = tf.Graph()
    functions.register(graph, list(graph_def.library.function) + [fdef])
    with graph.as_default():
        with tf.device(variable_device):
            w = v1.get_variable("w", [6, 6], use_resource=True)
        x = v1.placeholder(tf.float32, [4, 6])
        specs = [tf.TensorSpec([4, 3]), tf.TensorSpec([4, 3]), tf.TensorSpec([3])]
        results = []
        for k in range(num_calls):
            with tf.device(call_device):
                results.append(
                    functions.call(
                        fdef.signature.name, [x, w.handle], specs, name=f"dapple/mb{k}/s1r0/fwd"
                    ).outputs
                )
        init = v1.global_variables_initializer()
    return graph, x, w, results, init


@pytest.mark.parametrize("optimize_graph", [False, True])
def test_a_call_computes_what_the_graph_def_computes(optimize_graph):
    graph, x, w, results, init = call_graph(CPU.format(1), CPU.format(0))
    assert [r.shape.as_list() for r in results[0]] == [[4, 3], [4, 3], [3]]
    value = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with v1.Session(
        graph=graph, config=session_config("CPU", 2, optimize_graph=optimize_graph)
    ) as s:
        s.run(init)
        got = s.run(results[0], {x: value})
        want = expected(value, s.run(w))
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_inlined_ops_run_under_the_call_name_on_the_calls_device():
    graph, x, _, results, init = call_graph(CPU.format(2), CPU.format(0))
    metadata = v1.RunMetadata()
    with v1.Session(graph=graph, config=session_config("CPU", 3, optimize_graph=False)) as s:
        s.run(init)
        s.run(
            results[0],
            {x: np.ones([4, 6], np.float32)},
            options=v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE),
            run_metadata=metadata,
        )
    device_of = {n.node_name: d.device for d in metadata.step_stats.dev_stats for n in d.node_stats}
    assert device_of["dapple/mb0/s1r0/fwd/layer/matmul"] == CPU.format(2)
    assert device_of["dapple/mb0/s1r0/fwd/layer/split"] == CPU.format(2)
    # the variable read goes with the variable, as the placer puts resource ops
    assert device_of["dapple/mb0/s1r0/fwd/ReadVariableOp"] == CPU.format(0)


def test_a_control_edge_from_a_call_waits_for_its_results():
    """The schedule's end ops depend on calls by control edges only (stage 0's backward sends
    nothing): once inlined, such an edge must still mean "the call's results exist"."""
    graph, x, _, results, init = call_graph(CPU.format(1), CPU.format(1))
    with graph.as_default():
        with tf.device(CPU.format(1)), tf.control_dependencies([results[0][0].op]):
            after = tf.constant(0.0, name="after_call")
    metadata = v1.RunMetadata()
    with v1.Session(graph=graph, config=session_config("CPU", 2, optimize_graph=False)) as s:
        s.run(init)
        s.run(
            after.op,
            {x: np.ones([4, 6], np.float32)},
            options=v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE),
            run_metadata=metadata,
        )
    nodes = {n.node_name: n for d in metadata.step_stats.dev_stats for n in d.node_stats}
    out = nodes["dapple/mb0/s1r0/fwd/layer/out"]
    assert nodes["after_call"].all_start_micros >= out.all_start_micros + out.op_end_rel_micros


def test_names_a_tensor_that_is_neither_input_nor_produced():
    graph_def, _ = body_graph()
    with pytest.raises(ValueError, match="layer/missing:0"):
        make_function(graph_def, ["layer/missing:0"])


def test_names_an_output_index_past_the_ops_outputs():
    graph_def, _ = body_graph()
    with pytest.raises(ValueError, match="layer/split:2.*2 outputs"):
        make_function(graph_def, ["layer/split:2"])
