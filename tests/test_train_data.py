"""--data_dir at the default (tiny) preset: the model takes its vocabulary size and sequence
length from the bundled files, and the reader then accepts them."""

from pathlib import Path

import pytest

from dapple_tf import runner

DATA = Path(__file__).resolve().parent / "data"


def first_batch(model, data_dir, **flags):
    config = runner.TrainingConfig(model=model, preset="tiny", data_dir=str(data_dir), **flags)
    spec = runner.model_spec(config)
    batch = next(runner.batches(spec, config, 4, start_step=0))
    assert spec.check_batch(batch, "first batch") == 4
    return spec, batch


def test_gnmt_reads_the_iwslt_sample_with_its_vocabularies_and_longest_sentences():
    spec, batch = first_batch("gnmt", DATA / "iwslt15-en-vi-sample")
    cfg = spec.config
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size) == (100, 100)  # the vocabulary files' lines
    assert (cfg.src_length, cfg.tgt_length) == (47, 75)  # longest en / vi sentence (+ </s>)
    assert cfg.num_units == 16  # the rest is the tiny preset
    assert batch["target_input_ids"].max() < 100


def test_bert_reads_mrpc_with_the_full_wordpiece_vocabulary():
    spec, batch = first_batch("bert", DATA / "mrpc")
    assert spec.config.vocab_size == 30522
    assert spec.config.hidden_size == 32
    assert batch["input_ids"].shape[1] == spec.config.seq_length
    assert batch["input_mask"].sum(axis=1).max() <= spec.config.seq_length


def test_sizes_given_on_the_command_line_win_over_the_files():
    spec, batch = first_batch("bert", DATA / "mrpc", seq_length=24, vocab_size=40000)
    assert (spec.config.seq_length, spec.config.vocab_size) == (24, 40000)
    assert batch["input_ids"].shape == (4, 24)


def test_a_model_without_a_reader_refuses_data_dir():
    with pytest.raises(runner.ConfigError, match="xlnet has no file reader"):
        runner.model_spec(runner.TrainingConfig(model="xlnet", data_dir=str(DATA / "mrpc")))


def test_size_flags_without_data_dir_are_refused():
    with pytest.raises(runner.ConfigError, match="apply to --data_dir runs only"):
        runner.model_spec(runner.TrainingConfig(model="bert", seq_length=24))
