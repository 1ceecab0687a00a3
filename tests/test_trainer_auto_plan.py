"""Trainer(plan="auto") profiles the model, takes the planner's plan for the devices it is
given, and still trains exactly like single-device training."""

import numpy as np
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer, Trainer

GLOBAL_BATCH = 16


def optimizer():
    return tf.compat.v1.train.MomentumOptimizer(0.1, momentum=0.9)


def test_auto_plan_uses_the_given_devices_and_matches_single_device_training():
    case = models.MLP
    rng = np.random.default_rng(5)
    batches = [case.make_batch(rng, GLOBAL_BATCH) for _ in range(3)]
    reference = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer, GLOBAL_BATCH, seed=3, optimize_graph=False
    )
    trainer = Trainer(
        case.model_fn,
        case.feature_spec,
        optimizer,
        "auto",
        GLOBAL_BATCH,
        num_devices=2,
        seed=3,
        optimize_graph=False,
    )
    plan = trainer.plan
    assert plan.global_batch_size == GLOBAL_BATCH
    assert set(plan.devices) <= {0, 1}
    assert list(plan.layers) == list(trainer.template.layers)
    assert "speedup" in plan.predicted
    trainer.set_weights(reference.get_weights())
    for batch in batches:
        np.testing.assert_allclose(
            trainer.train_step(batch), reference.train_step(batch), rtol=1e-5, atol=1e-6
        )
    expected = reference.get_weights()
    for name, value in trainer.get_weights().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
