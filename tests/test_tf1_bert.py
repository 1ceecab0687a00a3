"""Acceptance of issue #13: a BERT written in the TF1 style of the public release (tf1_bert.py,
unchanged) trains through the layer rule `tf1_bert.LAYERS` exactly as single-device training
does (same seed, same rule), with dropout off and on, Adam, 3 steps."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import tf1_bert
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

GLOBAL_BATCH = 24
STEPS = 3
SEED = 5
PLANS = {
    "2 stages 1f1b M=4": ([1, 1], "1f1b", 4),
    "3:1 gpipe M=4": ([3, 1], "gpipe", 4),
    "4 stages 1f1b M=8": ([1, 1, 1, 1], "1f1b", 8),
    "2x2 1f1b M=4": ([2, 2], "1f1b", 4),
}


def optimizer():
    return tf.compat.v1.train.AdamOptimizer(0.01)


def model(dropout_rate):
    return functools.partial(tf1_bert.bert_classifier, dropout_rate=dropout_rate)


def batches():
    rng = np.random.default_rng(11)
    return [tf1_bert.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def single_device_run(dropout_rate):
    trainer = SingleDeviceTrainer(
        model(dropout_rate),
        tf1_bert.FEATURE_SPEC,
        optimizer,
        GLOBAL_BATCH,
        seed=SEED,
        layers=tf1_bert.LAYERS,
        optimize_graph=False,
    )
    losses = [trainer.train_step(b) for b in batches()]
    weights = trainer.get_weights()
    trainer.close()
    return losses, weights


@pytest.mark.parametrize("dropout_rate", [0.0, 0.1])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_tf1_bert_trains_pipelined_as_on_one_device(plan_name, dropout_rate):
    expected_losses, expected = single_device_run(dropout_rate)
    stages, schedule, micro_batches = PLANS[plan_name]
    layers = build_template(
        model(dropout_rate), tf1_bert.FEATURE_SPEC, layers=tf1_bert.LAYERS
    ).layers
    assert layers == (
        "bert/embeddings",
        "bert/encoder/layer_0",
        "bert/encoder/layer_1",
        "bert/pooler",
        "cls",
    )
    plan = even_plan(layers, stages, GLOBAL_BATCH, micro_batches, schedule)
    trainer = Trainer(
        model(dropout_rate),
        tf1_bert.FEATURE_SPEC,
        optimizer,
        plan,
        GLOBAL_BATCH,
        seed=SEED,
        layers=tf1_bert.LAYERS,
        optimize_graph=False,
    )
    try:
        losses = [trainer.train_step(b) for b in batches()]
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
        weights = trainer.get_weights()
        assert sorted(weights) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=2e-6, err_msg=name)
    finally:
        trainer.close()


def test_dropout_is_on_in_the_reference():
    assert single_device_run(0.1)[0] != single_device_run(0.0)[0]


@pytest.mark.slow
def test_tf1_bert_trains_on_four_ranks_as_on_one_device(tmp_path):
    """4 ranks (horovodrun): plans 2:2 and 1:1:1:1, 1f1b M=4, dropout 0 and 0.1, Adam."""
    from multirank import runner, trainer_checks as checks

    reason = runner.horovod_missing_reason()
    if reason:
        pytest.skip(reason)
    configs = [
        f"{model}/{plan}/1f1b" for model in ("tf1bert0", "tf1bert1") for plan in ("2x2", "4stages")
    ]
    result = runner.run(
        "trainer_checks.py", 4, ["equivalence", tmp_path, ",".join(configs)], timeout_s=900
    )
    assert result.returncode == 0, result.output[-6000:]
    records = result.records("LOSSES")
    for model, rate in checks.TF1_BERT_DROPOUT.items():
        case, layers, optimizer_fn = checks.model_case(model)
        reference = SingleDeviceTrainer(
            case.model_fn,
            case.feature_spec,
            optimizer_fn,
            checks.GLOBAL_BATCH,
            seed=checks.SEED,
            layers=layers,
            optimize_graph=False,
        )
        expected_losses = [reference.train_step(b) for b in checks.batches(case, checks.STEPS)]
        expected = reference.get_weights()
        reference.close()
        for plan in ("2x2", "4stages"):
            tag = f"{model}-{plan}-1f1b"
            for rank, recs in records.items():
                losses = [r for r in recs if r["tag"] == tag][0]["losses"]
                np.testing.assert_allclose(
                    losses, expected_losses, rtol=1e-5, atol=1e-6, err_msg=f"{tag} rank {rank}"
                )
            got = np.load(tmp_path / f"{tag}.npz")
            for name, value in expected.items():
                np.testing.assert_allclose(
                    got["final/" + name], value, rtol=1e-5, atol=2e-6, err_msg=f"{tag} {name}"
                )
