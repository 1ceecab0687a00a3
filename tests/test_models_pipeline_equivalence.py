"""Pipelined training of every model's tiny preset equals single-device training: the same
losses and the same weights (model and optimizer variables) after a few steps, for a 2-stage
plan and for a plan with a replicated first stage (dapple_tf.Trainer vs SingleDeviceTrainer).

The optimizer is momentum SGD for every model, not the presets' Adam: Adam divides each update
by the root of the squared gradient, so a weight whose gradient is nearly zero moves by about
the learning rate in a direction set by float rounding, and the two builds (which add the same
numbers in different groupings) can disagree far beyond rounding there. Momentum passes
gradient differences through linearly, so equal gradients show as equal weights.
"""

import numpy as np
import pytest
import tensorflow as tf

import models
from planner.plan_format import even_plan

trainer_module = pytest.importorskip("dapple_tf.trainer")

GLOBAL_BATCH = 8
STEPS = 2
# Pipelined and single-device graphs multiply and sum the same numbers in different groupings
# (micro-batches of 4 or 2 rows, gradients accumulated per micro-batch), so float32 results
# agree to rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-6
# AmoebaNet's per-example normalisation over H×W×C subtracts the mean of a large sum, and the
# kernel gradients of its 1×1 convolutions sum B×H×W terms that nearly cancel: single entries
# were seen 6e-5 apart (relative) after 2 steps, every other entry of the model within 1e-5.
TOLERANCE = {"amoebanet": (1e-4, 1e-6)}

# (model, replicas per stage, micro-batches, config overrides). XLNet and BERT's pre-training
# head tie the word embedding of the first stage to the output layer of the last.
CASES = [(name, [1, 1], 2, {}) for name in models.MODEL_NAMES] + [
    ("gnmt", [2, 1], 2, {}),
    ("xlnet", [1, 2], 2, {}),
    ("bert", [1, 1], 4, {"head": "pretraining"}),
]


# optimize_graph=False skips Grappler, which takes most of the set-up time of these graphs (both
# settings were seen to pass; the Trainer's own tests cover the optimised path).


def optimizer():
    return tf.compat.v1.train.MomentumOptimizer(0.01, 0.9)


def _case_id(name, replicas, micro_batches, overrides):
    return "-".join(
        [name, ":".join(map(str, replicas)), f"M{micro_batches}", *map(str, overrides.values())]
    )


@pytest.mark.parametrize(
    "name,replicas,micro_batches,overrides", CASES, ids=[_case_id(*case) for case in CASES]
)
def test_pipelined_training_equals_single_device_training(name, replicas, micro_batches, overrides):
    spec = models.get_model(name, "tiny", **overrides)
    rtol, atol = TOLERANCE.get(name, (RTOL, ATOL))
    plan = even_plan(spec.layer_names, replicas, GLOBAL_BATCH, micro_batches)
    rng = np.random.default_rng(7)
    batches = [spec.synthetic_batch(GLOBAL_BATCH, rng) for _ in range(STEPS)]
    pipelined = trainer_module.Trainer(
        spec.model_fn, spec.feature_spec, optimizer, plan, GLOBAL_BATCH, optimize_graph=False
    )
    single = trainer_module.SingleDeviceTrainer(
        spec.model_fn, spec.feature_spec, optimizer, GLOBAL_BATCH, optimize_graph=False
    )
    try:
        initial = single.get_weights()
        for step, batch in enumerate(batches):
            got, want = pipelined.train_step(batch), single.train_step(batch)
            np.testing.assert_allclose(
                got, want, rtol=rtol, atol=atol, err_msg=f"{name}: loss of step {step}"
            )
        got_w, want_w = pipelined.get_weights(), single.get_weights()
        assert sorted(got_w) == sorted(want_w)
        assert any(not np.allclose(initial[v], want_w[v]) for v in initial), "nothing trained"
        for var in want_w:
            np.testing.assert_allclose(
                got_w[var], want_w[var], rtol=rtol, atol=atol, err_msg=f"{name}: variable {var}"
            )
    finally:
        pipelined.close()
        single.close()
