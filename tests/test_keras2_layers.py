"""TF1 code using `tf.compat.v1.layers.*` needs Keras 2 under TF 2.21: the `keras2` extra
(`pip install dapple-tf[keras2]`, i.e. tf-keras) with TF_USE_LEGACY_KERAS=1. Skipped where
tf-keras is not installed (the default install)."""

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tf_keras")

from dapple_tf.trainer import SingleDeviceTrainer, Trainer  # noqa: E402
from planner.plan_format import even_plan  # noqa: E402

v1 = tf.compat.v1
SPEC = {"x": ((4,), tf.float32), "y": ((3,), tf.float32)}
RULE = r"net/block_\d|loss"


@pytest.fixture(autouse=True)
def legacy_keras(monkeypatch):
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")


def keras2_model(features):
    with v1.variable_scope("net"):
        with v1.variable_scope("block_0"):
            h = v1.layers.dense(features["x"], 8, activation=tf.nn.relu)
            h = v1.layers.dropout(h, rate=0.2, training=True)
        with v1.variable_scope("block_1"):
            h = v1.layers.dense(h, 3)
    with v1.variable_scope("loss"):
        return tf.reduce_mean(tf.square(h - features["y"]))


def test_a_model_of_keras2_tf_layers_trains_pipelined_as_on_one_device():
    def optimizer():
        return v1.train.AdamOptimizer(0.01)

    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.standard_normal((8, 4)).astype(np.float32),
            "y": rng.standard_normal((8, 3)).astype(np.float32),
        }
        for _ in range(3)
    ]
    reference = SingleDeviceTrainer(
        keras2_model, SPEC, optimizer, 8, seed=2, layers=RULE, optimize_graph=False
    )
    # Keras 2 initializers without a seed draw a new one per build: start from the same weights
    initial = reference.get_weights()
    expected = [reference.train_step(b) for b in batches]
    expected_weights = reference.get_weights()
    reference.close()
    plan = even_plan(("net/block_0", "net/block_1", "loss"), [1, 1], 8, 4, "1f1b")
    trainer = Trainer(
        keras2_model, SPEC, optimizer, plan, 8, seed=2, layers=RULE, optimize_graph=False
    )
    try:
        trainer.set_weights(initial)
        assert [trainer.train_step(b) for b in batches] == pytest.approx(expected, rel=1e-5)
        weights = trainer.get_weights()
        for name, value in expected_weights.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    finally:
        trainer.close()
