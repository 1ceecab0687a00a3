"""Pipelined training computes exactly what single-device training on the global batch computes.

Matrix: models {deep MLP, transformer blocks with tied embedding, while-loop RNN} x plans
{2 stages, 4 stages, non-uniform 3:1, 2 stages x 2 replicas} x schedules {gpipe, 1f1b} x
micro-batches {1, 2, 4, 8}: the losses of 5 steps and every final variable (model weights,
momentum slots, global_step) match the single-device build (rtol 1e-5, atol 1e-6, float32).
Grappler is off in both builds (optimize_graph=False) to keep the first step of each of the
96 graphs fast; test_trainer_features.py covers the default configuration.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

GLOBAL_BATCH = 48  # divisible by 8 micro-batches x 3 replicas... per micro-batch: 6 rows / 3
STEPS = 5
SEED = 7
PLANS = {"2stages": [1, 1], "4stages": [1, 1, 1, 1], "3:1": [3, 1], "2x2": [2, 2]}


def optimizer():
    return tf.compat.v1.train.MomentumOptimizer(0.1, momentum=0.9)


def batches(case):
    rng = np.random.default_rng(123)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def single_device_run(name):
    case = models.ALL[name]
    trainer = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer, GLOBAL_BATCH, seed=SEED, optimize_graph=False
    )
    initial = trainer.get_weights()
    losses = [trainer.train_step(b) for b in batches(case)]
    final = trainer.get_weights()
    trainer.close()
    return initial, losses, final


@functools.lru_cache(maxsize=None)
def model_layers(name):
    case = models.ALL[name]
    return build_template(case.model_fn, case.feature_spec).layers


@pytest.mark.parametrize("num_micro_batches", [1, 2, 4, 8])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model", ["mlp", "transformer", "rnn"])
def test_pipelined_training_equals_single_device_training(
    model, plan_name, schedule, num_micro_batches
):
    case = models.ALL[model]
    initial, expected_losses, expected = single_device_run(model)
    plan = even_plan(
        model_layers(model), PLANS[plan_name], GLOBAL_BATCH, num_micro_batches, schedule
    )
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    try:
        start = trainer.get_weights()
        for name, value in initial.items():
            np.testing.assert_array_equal(start[name], value, err_msg=f"initial {name}")
        losses = [trainer.train_step(b) for b in batches(case)]
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
        final = trainer.get_weights()
        assert sorted(final) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        assert trainer.global_step == STEPS
    finally:
        trainer.close()
