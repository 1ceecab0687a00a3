"""Random ops are stateless functions of (seed, op name, step, global row)
(graph_rewrite/random_ops.py): the same numbers per global row whatever the plan."""

import numpy as np
import pytest
import tensorflow as tf

from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.random_ops import RANDOM_ROWS_FEATURE, RandomOpError, op_key
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
SPEC = {"x": ((6,), tf.float32), "y": ((3,), tf.float32)}
LAYERS = ("a", "b", "c", "d")


def noisy_model(features):
    """Dropout on a batch-major and on a flattened tensor, and batch-independent weight noise."""
    with layer("a"):
        w = v1.get_variable("w", [6, 3], initializer=v1.glorot_uniform_initializer())
        h = tf.nn.dropout(tf.matmul(features["x"], w), rate=0.4)
    with layer("b"):
        flat = tf.nn.dropout(tf.reshape(h, [-1, 1]), rate=0.3)  # [batch * 3, 1]
        h = tf.reshape(flat, [-1, 3]) + tf.random.normal([3], stddev=0.1)
    with layer("c"):
        u = v1.get_variable("u", [3, 3], initializer=v1.glorot_uniform_initializer())
        h = tf.matmul(h, u) * tf.random.uniform(tf.shape(h), 0.5, 1.5)
    with layer("d"):
        return tf.reduce_mean(tf.square(h - features["y"]))


def make_batches(steps=3, rows=8):
    rng = np.random.default_rng(4)
    return [
        {
            "x": rng.standard_normal((rows, 6)).astype(np.float32),
            "y": rng.standard_normal((rows, 3)).astype(np.float32),
        }
        for _ in range(steps)
    ]


def optimizer():
    return v1.train.GradientDescentOptimizer(0.1)


def single_device(model_fn=noisy_model, lr_optimizer=optimizer, seed=3):
    trainer = SingleDeviceTrainer(model_fn, SPEC, lr_optimizer, 8, seed=seed, optimize_graph=False)
    losses = [trainer.train_step(b) for b in make_batches()]
    weights = trainer.get_weights()
    trainer.close()
    return losses, weights


def test_random_ops_become_stateless_ops_reading_the_rows_feature():
    template = build_template(noisy_model, SPEC)
    types = {template.graph.get_operation_by_name(op).type for op in template.layer_of_op}
    assert not types & {"RandomUniform", "RandomStandardNormal"}
    assert {"StatelessRandomUniformV2", "StatelessRandomNormalV2"} <= types
    assert RANDOM_ROWS_FEATURE in template.features
    assert template.layers == LAYERS  # replacements stay in the random op's layer


@pytest.mark.parametrize(
    "stages,schedule,micro_batches", [([1, 1, 1, 1], "1f1b", 4), ([2, 2], "1f1b", 2)]
)
def test_pipelined_training_with_random_ops_equals_single_device_training(
    stages, schedule, micro_batches
):
    expected_losses, expected = single_device()
    plan = even_plan(LAYERS, stages, 8, micro_batches, schedule)
    trainer = Trainer(noisy_model, SPEC, optimizer, plan, 8, seed=3, optimize_graph=False)
    try:
        assert [trainer.train_step(b) for b in make_batches()] == pytest.approx(
            expected_losses, rel=1e-5
        )
        weights = trainer.get_weights()
        for name, value in expected.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    finally:
        trainer.close()


def test_the_numbers_change_with_the_step_and_the_seed():
    def frozen():
        return v1.train.GradientDescentOptimizer(0.0)

    batch = make_batches(1)[0]
    trainer = SingleDeviceTrainer(noisy_model, SPEC, frozen, 8, seed=3, optimize_graph=False)
    first, second = trainer.train_step(batch), trainer.train_step(batch)
    trainer.close()
    assert first != second
    other_seed = SingleDeviceTrainer(noisy_model, SPEC, frozen, 8, seed=4, optimize_graph=False)
    other_seed.set_weights({k: v for k, v in trainer_weights(noisy_model, 3).items()})
    assert other_seed.train_step(batch) != first
    other_seed.close()


def trainer_weights(model_fn, seed):
    trainer = SingleDeviceTrainer(model_fn, SPEC, optimizer, 8, seed=seed, optimize_graph=False)
    weights = trainer.get_weights()
    trainer.close()
    return weights


def test_restoring_a_checkpoint_reseeds_from_its_step(tmp_path):
    batches = make_batches()
    trainer = SingleDeviceTrainer(noisy_model, SPEC, optimizer, 8, seed=3, optimize_graph=False)
    trainer.train_step(batches[0])
    path = trainer.save(tmp_path / "ckpt")
    expected = trainer.train_step(batches[1])
    trainer.restore(path)
    assert trainer.train_step(batches[1]) == expected
    trainer.close()


def test_the_op_key_is_a_63_bit_function_of_seed_and_op_name():
    assert op_key(1, "a/dropout/random_uniform/RandomUniform") == op_key(
        1, "a/dropout/random_uniform/RandomUniform"
    )
    assert op_key(1, "a/x") != op_key(2, "a/x")
    assert 0 <= op_key(None, "a/x") < 2**63


def test_a_random_op_without_a_stateless_replacement_is_refused():
    def model_fn(features):
        with layer("a"):
            logits = tf.matmul(features["x"], tf.ones([6, 3]))
            picked = tf.random.categorical(logits, 1)
        with layer("b"):
            return tf.reduce_mean(tf.cast(picked, tf.float32) * logits)

    with pytest.raises(RandomOpError, match="Multinomial"):
        build_template(model_fn, SPEC)
