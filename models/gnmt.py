"""GNMT (Wu et al. 2016), in the layer-separable form of the MLPerf/DAPPLE GNMT whose profiles
(`gnmt-16-pbs-64.txt`) the planner reads:

- encoder: `encoder_0` is a bidirectional LSTM (forward and backward halves concatenated),
  `encoder_1` an LSTM from 2×units to units, `encoder_2…` LSTMs with residual connections;
- decoder: `decoder_0` is the "recurrent attention" layer: an LSTM over the target embeddings
  whose outputs query additive (Bahdanau) attention over the top encoder outputs; every later
  decoder layer reads [previous layer output; attention context], from `decoder_2` on with a
  residual connection;
- `loss`: projection to the target vocabulary and cross entropy.

Layers, in order: `encoder_embedding`, `encoder_0…`, `decoder_embedding`, `decoder_0…`, `loss`.
The decoder starts from zero states and computes attention after its bottom LSTM (no input
feeding), as in the MLPerf model: this is what lets each decoder layer run over the whole
sequence on its own, so decoder layers can sit on different pipeline stages.

LSTMs are TF's fused BlockLSTM op over the static sequence length of the preset (no while
loops; see `layers.lstm`).
Per-example loss: the mean token cross entropy over the example's target tokens (including
`</s>`); the model loss is the mean over rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from models import layers as L
from models.data import DataError, check_vocab_fits, iterate_batches, load_vocab, read_lines
from models.spec import ModelSpec, adam, resolve_config

UNK, SOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, SOS_ID, EOS_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class GnmtConfig:
    src_vocab_size: int = 36560
    tgt_vocab_size: int = 36560
    num_units: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    src_length: int = 50  # max source tokens (longer sentences are truncated)
    tgt_length: int = 50  # max target tokens, counting <s> (input) / </s> (output)
    dropout: float = 0.0
    learning_rate: float = 1e-3
    global_batch_size: int = 128


PRESETS = {
    "tiny": GnmtConfig(
        src_vocab_size=64,
        tgt_vocab_size=64,
        num_units=16,
        num_encoder_layers=3,
        num_decoder_layers=3,
        src_length=10,
        tgt_length=10,
        learning_rate=1e-2,
        global_batch_size=8,
    ),
    "small": GnmtConfig(
        src_vocab_size=8000,
        tgt_vocab_size=8000,
        num_units=256,
        num_encoder_layers=4,
        num_decoder_layers=4,
        src_length=30,
        tgt_length=30,
    ),
    "gnmt-8": GnmtConfig(num_encoder_layers=4, num_decoder_layers=4),
    "gnmt-16": GnmtConfig(),  # the DAPPLE paper's GNMT-16
    "gnmt-32": GnmtConfig(num_encoder_layers=16, num_decoder_layers=16),
}


def layer_names(cfg: GnmtConfig) -> tuple[str, ...]:
    return (
        ("encoder_embedding",)
        + tuple(f"encoder_{i}" for i in range(cfg.num_encoder_layers))
        + ("decoder_embedding",)
        + tuple(f"decoder_{i}" for i in range(cfg.num_decoder_layers))
        + ("loss",)
    )


def feature_spec(cfg: GnmtConfig):
    return {
        "source_ids": ((cfg.src_length,), tf.int32),
        "source_length": ((), tf.int32),
        "target_input_ids": ((cfg.tgt_length,), tf.int32),
        "target_output_ids": ((cfg.tgt_length,), tf.int32),
        "target_length": ((), tf.int32),
    }


def _bahdanau_attention(query, keys, values, key_mask, units):
    """query [B, Tt, U], keys/values [B, Ts, K]; returns context [B, Tt, K]."""
    q = L.dense(query, units, "query", use_bias=False)  # [B, Tt, A]
    k = L.dense(keys, units, "memory", use_bias=False)  # [B, Ts, A]
    v = L.variable("score_vector", [units], initializer="glorot", fan_in=units)
    b = L.variable("score_bias", [units], initializer="constant")
    scores = tf.reduce_sum(v * tf.tanh(q[:, :, None, :] + k[:, None, :, :] + b), axis=-1)
    scores += L.attention_bias(key_mask)[:, None, :]  # [B, Tt, Ts]
    return tf.matmul(tf.nn.softmax(scores), values)


def build(cfg: GnmtConfig, features):
    u = cfg.num_units
    src_len, tgt_len = features["source_length"], features["target_length"]

    with L.layer_scope("encoder_embedding"):
        table = L.variable("embedding", [cfg.src_vocab_size, u], initializer="glorot", fan_in=u)
        x = tf.gather(table, features["source_ids"])

    for i in range(cfg.num_encoder_layers):
        with L.layer_scope(f"encoder_{i}"):
            inp = L.dropout(x, cfg.dropout)
            if i == 0:
                fw = L.lstm(inp, src_len, u, "forward")
                bw = L.lstm(inp, src_len, u, "backward", reverse=True)
                x = tf.concat([fw, bw], axis=-1)
            else:
                out = L.lstm(inp, src_len, u, "lstm")
                x = out + x if i >= 2 else out
    encoder_outputs = x

    with L.layer_scope("decoder_embedding"):
        table = L.variable("embedding", [cfg.tgt_vocab_size, u], initializer="glorot", fan_in=u)
        y = tf.gather(table, features["target_input_ids"])

    context = None
    for i in range(cfg.num_decoder_layers):
        with L.layer_scope(f"decoder_{i}"):
            if i == 0:
                y = L.lstm(L.dropout(y, cfg.dropout), tgt_len, u, "lstm")
                with tf.compat.v1.variable_scope("attention"):
                    src_mask = tf.sequence_mask(src_len, cfg.src_length)
                    context = _bahdanau_attention(y, encoder_outputs, encoder_outputs, src_mask, u)
            else:
                inp = L.dropout(tf.concat([y, context], axis=-1), cfg.dropout)
                out = L.lstm(inp, tgt_len, u, "lstm")
                y = out + y if i >= 2 else out

    with L.layer_scope("loss"):
        logits = L.dense(
            L.dropout(y, cfg.dropout), cfg.tgt_vocab_size, "projection", use_bias=False
        )
        weights = tf.sequence_mask(tgt_len, cfg.tgt_length, dtype=tf.float32)
        per_example = L.masked_token_xent(logits, features["target_output_ids"], weights)
        return tf.reduce_mean(per_example, name="mean_loss")


def synthetic_batch(cfg: GnmtConfig, batch_size: int, rng: np.random.Generator):
    def side(vocab, length):
        lengths = rng.integers(max(length // 2, 1), length + 1, size=batch_size)
        ids = rng.integers(3, vocab, size=(batch_size, length))
        ids = np.where(np.arange(length)[None, :] < lengths[:, None], ids, EOS_ID)
        return ids.astype(np.int32), lengths.astype(np.int32)

    src, src_len = side(cfg.src_vocab_size, cfg.src_length)
    tgt, tgt_len = side(cfg.tgt_vocab_size, cfg.tgt_length)
    tgt_in = np.concatenate([np.full((batch_size, 1), SOS_ID, np.int32), tgt[:, :-1]], axis=1)
    tgt_out = tgt.copy()
    tgt_out[np.arange(batch_size), tgt_len - 1] = EOS_ID
    return {
        "source_ids": src,
        "source_length": src_len,
        "target_input_ids": tgt_in,
        "target_output_ids": tgt_out,
        "target_length": tgt_len,
    }


# ---- parallel text reader (TF NMT format) --------------------------------------------------------


def load_nmt_vocab(path: str, model_vocab_size: int, model: str) -> dict[str, int]:
    """A TF-NMT vocabulary: one token per line, the first three `<unk>`, `<s>`, `</s>`."""
    vocab = load_vocab(path, "NMT vocabulary")
    first = sorted(vocab, key=vocab.get)[:3]
    if first != [UNK, SOS, EOS]:
        raise DataError(
            f"NMT vocabulary {path} must start with the lines {UNK}, {SOS}, {EOS}; found {first}"
        )
    check_vocab_fits(vocab, path, model_vocab_size, model)
    return vocab


def read_parallel_text(
    src_file: str,
    tgt_file: str,
    src_vocab: dict[str, int],
    tgt_vocab: dict[str, int],
    src_length: int,
    tgt_length: int,
):
    """Token ids of the sentence pairs (one sentence per line, tokens split by spaces); source
    truncated to `src_length` tokens, target to `tgt_length - 1` plus <s> / </s>. Pairs with an
    empty side are skipped (as TF NMT does)."""
    src_lines = read_lines(src_file, "source text")
    tgt_lines = read_lines(tgt_file, "target text")
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"parallel text files differ in length: {src_file} has "
            f"{len(src_lines)} lines, {tgt_file} has {len(tgt_lines)}"
        )
    n = len(src_lines)
    src = np.full((n, src_length), EOS_ID, np.int32)
    tgt_in = np.full((n, tgt_length), EOS_ID, np.int32)
    tgt_out = np.full((n, tgt_length), EOS_ID, np.int32)
    src_len = np.zeros(n, np.int32)
    tgt_len = np.zeros(n, np.int32)
    keep = np.zeros(n, bool)
    for r, (s_line, t_line) in enumerate(zip(src_lines, tgt_lines)):
        s_tokens, t_tokens = s_line.split()[:src_length], t_line.split()[: tgt_length - 1]
        if not s_tokens or not t_tokens:
            continue
        keep[r] = True
        s_ids = [src_vocab.get(t, UNK_ID) for t in s_tokens]
        t_ids = [tgt_vocab.get(t, UNK_ID) for t in t_tokens]
        src[r, : len(s_ids)] = s_ids
        src_len[r] = len(s_ids)
        tgt_in[r, : len(t_ids) + 1] = [SOS_ID] + t_ids
        tgt_out[r, : len(t_ids) + 1] = t_ids + [EOS_ID]
        tgt_len[r] = len(t_ids) + 1
    if not keep.any():
        raise DataError(f"no sentence pair of {src_file} / {tgt_file} has words on both sides")
    return {
        "source_ids": src[keep],
        "source_length": src_len[keep],
        "target_input_ids": tgt_in[keep],
        "target_output_ids": tgt_out[keep],
        "target_length": tgt_len[keep],
    }


def find_nmt_files(data_dir: str, src: str = "en", tgt: str = "vi") -> tuple[str, str]:
    """(train prefix, vocab prefix) of a folder in the TF NMT tutorial's layout:
    `<prefix>.<src>`/`<prefix>.<tgt>` parallel text and `<vocab prefix>.<src|tgt>` vocabularies
    (the files whose names contain 'vocab')."""
    names = sorted(os.listdir(data_dir))
    vocab = [n for n in names if "vocab" in n and n.endswith(f".{src}")]
    text = [n for n in names if "vocab" not in n and n.endswith(f".{src}")]
    if not vocab or not text:
        raise DataError(
            f"{data_dir}: expected parallel text '<prefix>.{src}', '<prefix>.{tgt}' "
            f"and vocabularies '<vocab prefix>.{src}', '<vocab prefix>.{tgt}'; "
            f"found {names}"
        )
    return (
        os.path.join(data_dir, os.path.splitext(text[0])[0]),
        os.path.join(data_dir, os.path.splitext(vocab[0])[0]),
    )


def data_config(data_dir: str, src: str = "en", tgt: str = "vi") -> dict[str, int]:
    """Config fields the files of an NMT folder decide: the vocabularies' sizes and the
    longest sentences (`tgt_length` counts the added <s> / </s>), so nothing is truncated."""
    train_prefix, vocab_prefix = find_nmt_files(data_dir, src, tgt)

    def longest(path):
        return max((len(line.split()) for line in read_lines(path, "parallel text")), default=0)

    return {
        "src_vocab_size": len(load_vocab(f"{vocab_prefix}.{src}", "NMT vocabulary")),
        "tgt_vocab_size": len(load_vocab(f"{vocab_prefix}.{tgt}", "NMT vocabulary")),
        "src_length": longest(f"{train_prefix}.{src}"),
        "tgt_length": longest(f"{train_prefix}.{tgt}") + 1,
    }


def make_input_fn(cfg: GnmtConfig, model: str):
    def input_fn(
        train_prefix: str,
        vocab_prefix: str,
        batch_size: int,
        src: str = "en",
        tgt: str = "vi",
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
    ):
        """Batches from `<train_prefix>.<src>` / `<train_prefix>.<tgt>` with vocabularies
        `<vocab_prefix>.<src>` / `<vocab_prefix>.<tgt>` (the TF NMT tutorial's layout)."""
        src_vocab = load_nmt_vocab(f"{vocab_prefix}.{src}", cfg.src_vocab_size, model)
        tgt_vocab = load_nmt_vocab(f"{vocab_prefix}.{tgt}", cfg.tgt_vocab_size, model)
        arrays = read_parallel_text(
            f"{train_prefix}.{src}",
            f"{train_prefix}.{tgt}",
            src_vocab,
            tgt_vocab,
            cfg.src_length,
            cfg.tgt_length,
        )
        return iterate_batches(
            arrays, batch_size, shuffle, seed, epochs, f"{train_prefix}.{src}/{tgt}"
        )

    return input_fn


def get(preset: str = "tiny", **overrides) -> ModelSpec:
    cfg = resolve_config("gnmt", PRESETS, preset, overrides)
    if cfg.num_encoder_layers < 2 or cfg.num_decoder_layers < 1:
        raise ValueError(
            f"gnmt needs at least 2 encoder layers and 1 decoder layer, got "
            f"{cfg.num_encoder_layers} and {cfg.num_decoder_layers}"
        )
    return ModelSpec(
        name="gnmt",
        preset=preset,
        config=cfg,
        model_fn=lambda features: build(cfg, features),
        feature_spec=feature_spec(cfg),
        layer_names=layer_names(cfg),
        synthetic_batch=lambda batch_size, rng: synthetic_batch(cfg, batch_size, rng),
        input_fn=make_input_fn(cfg, f"gnmt/{preset}"),
        default_global_batch_size=cfg.global_batch_size,
        default_optimizer=adam(cfg.learning_rate),
    )
