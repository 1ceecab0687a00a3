"""Weighted losses (`dapple_tf.WeightedLoss(sum(w * l), sum(w))`): gradients equal single-device
training on the global batch whatever M, also when micro-batches hold different total weight."""

import numpy as np
import pytest
import tensorflow as tf

import dapple_tf
from dapple_tf.layers import layer
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import TemplateError, build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
SEQ, VOCAB, HIDDEN = 6, 11, 8
SPEC = {"ids": ((SEQ,), tf.int32), "labels": ((SEQ,), tf.int32), "weights": ((SEQ,), tf.float32)}
LAYERS = ("embed", "hidden", "lm")


def token_losses(features):
    with layer("embed"):
        table = v1.get_variable("table", [VOCAB, HIDDEN])
        h = tf.gather(table, features["ids"])
    with layer("hidden"):
        w = v1.get_variable("w", [HIDDEN, HIDDEN])
        h = tf.tanh(tf.einsum("bsh,hk->bsk", h, w))
    with layer("lm"):
        out = v1.get_variable("out", [HIDDEN, VOCAB])
        logits = tf.einsum("bsh,hv->bsv", h, out)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=features["labels"], logits=logits
        )


def masked_lm(features):
    losses = token_losses(features)
    with layer("lm"):
        return dapple_tf.WeightedLoss(
            tf.reduce_sum(losses * features["weights"]), tf.reduce_sum(features["weights"])
        )


def make_batches(rows=8, steps=3):
    """Row r has r % 4 + 1 masked tokens... so micro-batches weigh differently."""
    rng = np.random.default_rng(2)
    batches = []
    for _ in range(steps):
        weights = np.zeros((rows, SEQ), np.float32)
        for r in range(rows):
            weights[r, rng.choice(SEQ, size=1 + (r * 5) % SEQ, replace=False)] = 1.0
        batches.append(
            {
                "ids": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32),
                "labels": rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int32),
                "weights": weights,
            }
        )
    return batches


def optimizer():
    return v1.train.GradientDescentOptimizer(0.5)


def run(trainer):
    try:
        return [trainer.train_step(b) for b in make_batches()], trainer.get_weights()
    finally:
        trainer.close()


def test_the_micro_batches_of_the_test_hold_different_weight():
    weights = make_batches()[0]["weights"]
    per_micro_batch = weights.reshape(4, 2, SEQ).sum(axis=(1, 2))
    assert len(set(per_micro_batch)) > 1


@pytest.mark.parametrize(
    "stages,schedule,micro_batches",
    [([1, 1, 1], "1f1b", 4), ([2, 1], "gpipe", 2), ([2, 2, 2], "1f1b", 2)],
)
def test_a_weighted_loss_trains_pipelined_as_on_one_device(stages, schedule, micro_batches):
    expected_losses, expected = run(
        SingleDeviceTrainer(masked_lm, SPEC, optimizer, 8, seed=1, optimize_graph=False)
    )
    plan = even_plan(LAYERS, stages, 8, micro_batches, schedule)
    losses, weights = run(
        Trainer(masked_lm, SPEC, optimizer, plan, 8, seed=1, optimize_graph=False)
    )
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_an_undeclared_weighted_mean_is_taken_as_a_per_row_mean_and_differs():
    """The documented contract: a plain scalar is a mean over the micro-batch's rows."""

    def undeclared(features):
        losses = token_losses(features)
        with layer("lm"):
            return tf.reduce_sum(losses * features["weights"]) / tf.reduce_sum(features["weights"])

    expected_losses, _ = run(
        SingleDeviceTrainer(undeclared, SPEC, optimizer, 8, seed=1, optimize_graph=False)
    )
    plan = even_plan(LAYERS, [1, 1, 1], 8, 4, "1f1b")
    losses, _ = run(Trainer(undeclared, SPEC, optimizer, plan, 8, seed=1, optimize_graph=False))
    assert not np.allclose(losses, expected_losses, rtol=1e-5)


def test_a_denominator_reading_variables_is_refused():
    def model_fn(features):
        losses = token_losses(features)
        with layer("lm"):
            scale = v1.get_variable("scale", [], initializer=v1.ones_initializer())
            return dapple_tf.WeightedLoss(
                tf.reduce_sum(losses), tf.reduce_sum(features["weights"]) * scale
            )

    with pytest.raises(TemplateError, match="denominator .* reads variables"):
        build_template(model_fn, SPEC)
