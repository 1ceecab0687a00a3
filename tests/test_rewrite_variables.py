"""Variables of the training graph (graph_rewrite/variables.py): one import creates resource
variables that behave like `get_variable(..., use_resource=True)` ones: same names (checkpoints
interchange), the requested devices, the usual collections, zeros until weights are loaded."""

import numpy as np
import tensorflow as tf

from graph_rewrite.variables import create_variables

v1 = tf.compat.v1
CPU = "/job:localhost/replica:0/task:0/device:CPU:{}"
SPECS = {
    "layer_0/dense/kernel": ((3, 4), tf.float32, True, CPU.format(1)),
    "layer_0/dense/bias": ((4,), tf.float32, True, CPU.format(1)),
    "layer_1/steps": ((), tf.int64, False, CPU.format(2)),
}


def test_variables_have_the_names_devices_collections_and_zero_values_asked_for():
    graph = tf.Graph()
    created = create_variables(SPECS, graph)
    assert list(created) == list(SPECS)
    with graph.as_default():
        for name, (shape, dtype, trainable, device) in SPECS.items():
            variable = created[name]
            assert variable.name == f"{name}:0"
            assert variable.handle.dtype == tf.resource
            assert variable.shape == shape and variable.dtype == dtype
            assert variable.device == device
        assert v1.trainable_variables() == [
            created["layer_0/dense/kernel"],
            created["layer_0/dense/bias"],
        ]
        assert v1.global_variables() == list(created.values())
        init = v1.global_variables_initializer()
        with v1.Session(graph=graph, config=v1.ConfigProto(device_count={"CPU": 3})) as session:
            session.run(init)
            values = session.run({n: v.read_value() for n, v in created.items()})
    for name, (shape, dtype, _, _) in SPECS.items():
        np.testing.assert_array_equal(values[name], np.zeros(shape, dtype.as_numpy_dtype))


def test_a_checkpoint_of_get_variable_variables_restores_into_them(tmp_path):
    rng = np.random.default_rng(0)
    want = {
        name: rng.normal(size=shape).astype(dtype.as_numpy_dtype)
        for name, (shape, dtype, _, _) in SPECS.items()
    }
    with tf.Graph().as_default() as plain:
        for name, (shape, dtype, trainable, _) in SPECS.items():
            v1.get_variable(
                name, initializer=tf.constant(want[name]), trainable=trainable, use_resource=True
            )
        saver = v1.train.Saver()
        with v1.Session(graph=plain) as session:
            session.run(v1.global_variables_initializer())
            path = saver.save(session, str(tmp_path / "ckpt"))
    graph = tf.Graph()
    created = create_variables(SPECS, graph)
    with graph.as_default():
        saver = v1.train.Saver()
        with v1.Session(graph=graph, config=v1.ConfigProto(device_count={"CPU": 3})) as session:
            saver.restore(session, path)
            got = session.run({n: v.read_value() for n, v in created.items()})
    for name in SPECS:
        np.testing.assert_array_equal(got[name], want[name])
