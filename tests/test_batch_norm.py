"""Batch norm's UPDATE_OPS are never dropped silently: SingleDeviceTrainer runs them every step;
the pipelined Trainer refuses the model at build time until moving statistics are carried
through the pipeline (issue #13 item 5, not done yet)."""

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import TemplateError
from planner.plan_format import even_plan

v1 = tf.compat.v1
SPEC = {"x": ((4,), tf.float32)}


def bn_model(features):
    with layer("bn"):
        mean, variance = tf.nn.moments(features["x"], [0])
        moving_mean = v1.get_variable(
            "moving_mean", [4], initializer=v1.zeros_initializer(), trainable=False
        )
        v1.add_to_collection(
            v1.GraphKeys.UPDATE_OPS, v1.assign(moving_mean, 0.9 * moving_mean + 0.1 * mean)
        )
        scale = v1.get_variable("scale", [4], initializer=v1.ones_initializer())
        h = (features["x"] - mean) * tf.math.rsqrt(variance + 1e-3) * scale
    with layer("loss"):
        return tf.reduce_mean(tf.square(h - 1.0))


def test_the_single_device_reference_updates_moving_statistics():
    trainer = SingleDeviceTrainer(
        bn_model, SPEC, lambda: v1.train.GradientDescentOptimizer(0.1), 8, optimize_graph=False
    )
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32) + 3.0
    trainer.train_step({"x": x})
    np.testing.assert_allclose(trainer.get_weights()["bn/moving_mean"], 0.1 * x.mean(0), rtol=1e-5)
    trainer.close()


def test_the_pipelined_trainer_refuses_update_ops_instead_of_dropping_them():
    plan = even_plan(("bn", "loss"), [1, 1], 8, 2, "1f1b")
    with pytest.raises(TemplateError, match=r"UPDATE_OPS .*bn/Assign"):
        Trainer(
            bn_model,
            SPEC,
            lambda: v1.train.GradientDescentOptimizer(0.1),
            plan,
            8,
            optimize_graph=False,
        )
