"""Real data trains: 50 single-device steps on CPU clearly reduce the training loss of GNMT on
the IWSLT'15 en-vi sample and of BERT on GLUE MRPC (run with `-s` or `-rP` to see the numbers;
models/README.md records them)."""

import os

import numpy as np

import models
from models.testing import SessionTrainer

DATA = os.path.join(os.path.dirname(__file__), "data")
STEPS = 50


def _train(spec, batches):
    trainer = SessionTrainer(spec)
    try:
        losses = [trainer.train_step(next(batches)) for _ in range(STEPS)]
    finally:
        trainer.close()
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(
        f"\n{spec.name}: first loss {first:.4f}, mean of the last 5 of {STEPS} steps {last:.4f}"
        f"\n  all: {np.round(losses, 3).tolist()}"
    )
    return first, last, losses


def test_gnmt_50_steps_on_iwslt_sample_cut_the_training_loss_by_more_than_half(record_property):
    iwslt = os.path.join(DATA, "iwslt15-en-vi-sample")
    spec = models.get_model(
        "gnmt",
        "tiny",
        src_vocab_size=100,
        tgt_vocab_size=100,
        src_length=20,
        tgt_length=20,
        num_units=32,
    )
    batches = spec.input_fn(
        os.path.join(iwslt, "iwslt15.tst2013.100"),
        os.path.join(iwslt, "iwslt15.vocab.100"),
        batch_size=16,
        seed=0,
    )
    first, last, losses = _train(spec, batches)
    record_property("gnmt_iwslt_first_loss", first)
    record_property("gnmt_iwslt_last_loss", last)
    assert np.isfinite(losses).all()
    assert first > 4.0  # ≈ ln(100) at the start: nothing learnt yet
    assert last < 0.5 * first


def test_bert_50_steps_on_mrpc_cut_the_training_loss_by_more_than_half(record_property):
    spec = models.get_model("bert", "tiny", vocab_size=30522, seq_length=64, learning_rate=2e-3)
    batches = spec.input_fn(os.path.join(DATA, "mrpc"), batch_size=16, max_rows=64, seed=0)
    first, last, losses = _train(spec, batches)
    record_property("bert_mrpc_first_loss", first)
    record_property("bert_mrpc_last_loss", last)
    assert np.isfinite(losses).all()
    assert 0.6 < first < 0.8  # ≈ ln 2: a binary classifier that knows nothing yet
    assert last < 0.5 * first
