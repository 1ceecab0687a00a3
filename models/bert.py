"""BERT (Devlin et al. 2019): post-LN Transformer encoder with a classification head (sentence
pairs, e.g. GLUE MRPC) or the pre-training head (masked LM with tied embeddings + next sentence).

Layers: `embedding`, `layer_0` … `layer_{L-1}`, `pooler`, `loss` (the DAPPLE profiles'
`embeddings`, `layer_i`, `pooler`; the profile's `input_ids`/`attention_mask`/`reshape_input`
nodes are the feature placeholders and reshapes inside `embedding`).

Per-example loss: classification cross entropy; pre-training: the weighted mean over the
masked positions of the MLM cross entropy plus the NSP cross entropy. The model loss is the mean
over rows, so micro-batches weighted by their rows reproduce the full batch.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from models import layers as L
from models.data import DataError, check_vocab_fits, iterate_batches, read_lines
from models.spec import ModelSpec, adam, resolve_config
from models.wordpiece import WordPieceTokenizer


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    seq_length: int = 128
    type_vocab_size: int = 2
    head: str = "classification"  # or "pretraining"
    num_labels: int = 2
    max_predictions: int = 20  # masked positions per example (pretraining head)
    dropout: float = 0.0
    learning_rate: float = 1e-4
    global_batch_size: int = 32


PRESETS = {
    "tiny": BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        seq_length=16,
        max_predictions=3,
        learning_rate=1e-3,
        global_batch_size=8,
    ),
    "base": BertConfig(),
    "large": BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    # The DAPPLE paper's BERT-48 (profiles bert-48-pbs-2: 528-token activations; we use 512).
    "bert-48": BertConfig(
        hidden_size=1024,
        num_layers=48,
        num_heads=16,
        intermediate_size=4096,
        seq_length=512,
        head="pretraining",
        max_predictions=76,
        global_batch_size=64,
    ),
}


def layer_names(cfg: BertConfig) -> tuple[str, ...]:
    return ("embedding",) + tuple(f"layer_{i}" for i in range(cfg.num_layers)) + ("pooler", "loss")


def feature_spec(cfg: BertConfig):
    t = cfg.seq_length
    spec = {
        "input_ids": ((t,), tf.int32),
        "input_mask": ((t,), tf.int32),
        "segment_ids": ((t,), tf.int32),
    }
    if cfg.head == "classification":
        spec["label"] = ((), tf.int32)
    else:
        p = cfg.max_predictions
        spec.update(
            {
                "masked_positions": ((p,), tf.int32),
                "masked_ids": ((p,), tf.int32),
                "masked_weights": ((p,), tf.float32),
                "next_sentence_label": ((), tf.int32),
            }
        )
    return spec


def _self_attention(x, bias, cfg: BertConfig):
    t, h, n = cfg.seq_length, cfg.hidden_size, cfg.num_heads
    d = h // n

    def heads(y):  # [B, T, H] -> [B, N, T, D]
        return tf.transpose(tf.reshape(y, [-1, t, n, d]), [0, 2, 1, 3])

    q = heads(L.dense(x, h, "query"))
    k = heads(L.dense(x, h, "key"))
    v = heads(L.dense(x, h, "value"))
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / np.sqrt(d)) + bias
    probs = L.dropout(tf.nn.softmax(scores), cfg.dropout)
    context = tf.reshape(tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3]), [-1, t, h])
    return L.dense(context, h, "output")


def build(cfg: BertConfig, features):
    with L.layer_scope("embedding"):
        word_embeddings = L.variable("word_embeddings", [cfg.vocab_size, cfg.hidden_size])
        x = tf.gather(word_embeddings, features["input_ids"])
        x += L.variable("position_embeddings", [cfg.seq_length, cfg.hidden_size])
        x += tf.gather(
            L.variable("token_type_embeddings", [cfg.type_vocab_size, cfg.hidden_size]),
            features["segment_ids"],
        )
        x = L.dropout(L.layer_norm(x), cfg.dropout)

    for i in range(cfg.num_layers):
        with L.layer_scope(f"layer_{i}"):
            bias = L.attention_bias(features["input_mask"])[:, None, None, :]
            with tf.compat.v1.variable_scope("attention"):
                a = L.dropout(_self_attention(x, bias, cfg), cfg.dropout)
                x = L.layer_norm(x + a)
            with tf.compat.v1.variable_scope("ffn"):
                f = L.dense(x, cfg.intermediate_size, "intermediate", activation=L.gelu)
                f = L.dropout(L.dense(f, cfg.hidden_size, "output"), cfg.dropout)
                x = L.layer_norm(x + f)

    with L.layer_scope("pooler"):
        pooled = L.dense(x[:, 0], cfg.hidden_size, "dense", activation=tf.tanh)

    with L.layer_scope("loss"):
        if cfg.head == "classification":
            logits = L.dense(L.dropout(pooled, cfg.dropout), cfg.num_labels, "classifier")
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=features["label"], logits=logits
            )
        elif cfg.head == "pretraining":
            with tf.compat.v1.variable_scope("mlm"):
                picked = tf.gather(x, features["masked_positions"], batch_dims=1)  # [B, P, H]
                picked = L.layer_norm(
                    L.dense(picked, cfg.hidden_size, "transform", activation=L.gelu)
                )
                logits = tf.tensordot(picked, word_embeddings, axes=[[2], [1]])
                logits += L.variable("output_bias", [cfg.vocab_size], initializer="constant")
                mlm = L.masked_token_xent(
                    logits, features["masked_ids"], features["masked_weights"]
                )
            with tf.compat.v1.variable_scope("nsp"):
                nsp_logits = L.dense(pooled, 2, "classifier")
                nsp = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=features["next_sentence_label"], logits=nsp_logits
                )
            per_example = mlm + nsp
        else:
            raise ValueError(
                f"BERT head must be 'classification' or 'pretraining', got '{cfg.head}'"
            )
        return tf.reduce_mean(per_example, name="mean_loss")


def synthetic_batch(cfg: BertConfig, batch_size: int, rng: np.random.Generator):
    t = cfg.seq_length
    lengths = rng.integers(max(t // 2, 3), t + 1, size=batch_size)
    positions = np.arange(t)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, cfg.vocab_size, size=(batch_size, t)).astype(np.int32) * mask
    first_len = lengths // 2
    segments = ((positions >= first_len[:, None]) & (mask > 0)).astype(np.int32)
    batch = {"input_ids": ids, "input_mask": mask, "segment_ids": segments}
    if cfg.head == "classification":
        batch["label"] = rng.integers(0, cfg.num_labels, size=batch_size).astype(np.int32)
    else:
        p = cfg.max_predictions
        masked_positions = np.zeros((batch_size, p), np.int32)
        weights = np.zeros((batch_size, p), np.float32)
        for r in range(batch_size):
            n = min(p, max(1, lengths[r] // 6))
            chosen = rng.choice(np.arange(1, lengths[r]), n, replace=False)
            masked_positions[r, :n] = np.sort(chosen)
            weights[r, :n] = 1.0
        batch["masked_ids"] = np.take_along_axis(ids, masked_positions, 1) * (weights > 0)
        batch["masked_positions"] = masked_positions
        batch["masked_weights"] = weights
        batch["next_sentence_label"] = rng.integers(0, 2, size=batch_size).astype(np.int32)
    return batch


# ---- GLUE sentence-pair classification reader ---------------------------------------------------

GLUE_COLUMNS = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")


def read_glue_pairs(
    tsv_path: str, tokenizer: WordPieceTokenizer, seq_length: int, max_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Encode a GLUE MRPC-style TSV (header `Quality  #1 ID  #2 ID  #1 String  #2 String`) as
    `[CLS] a [SEP] b [SEP]`, truncating the longer sentence first to fit `seq_length`."""
    lines = read_lines(tsv_path, "GLUE TSV", encoding="utf-8-sig")
    header = lines[0].split("\t")
    if tuple(h.strip() for h in header) != GLUE_COLUMNS:
        expected = "\t".join(GLUE_COLUMNS)
        raise DataError(f"{tsv_path}:1: expected the header {expected!r}, found {lines[0]!r}")
    if seq_length < 3:
        raise ValueError(
            f"seq_length must be at least 3 for [CLS] a [SEP] b [SEP], got {seq_length}"
        )
    cls_id, sep_id = tokenizer.id_of("[CLS]"), tokenizer.id_of("[SEP]")
    rows = {"input_ids": [], "input_mask": [], "segment_ids": [], "label": []}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(GLUE_COLUMNS):
            raise DataError(
                f"{tsv_path}:{lineno}: expected {len(GLUE_COLUMNS)} tab-separated "
                f"fields ({', '.join(GLUE_COLUMNS)}), found {len(fields)}"
            )
        if fields[0] not in ("0", "1"):
            raise DataError(f"{tsv_path}:{lineno}: Quality must be 0 or 1, found {fields[0]!r}")
        a, b = tokenizer.tokenize(fields[3]), tokenizer.tokenize(fields[4])
        while len(a) + len(b) > seq_length - 3:
            (a if len(a) > len(b) else b).pop()
        ids = [cls_id] + tokenizer.ids(a) + [sep_id] + tokenizer.ids(b) + [sep_id]
        pad = seq_length - len(ids)
        rows["input_ids"].append(ids + [0] * pad)
        rows["input_mask"].append([1] * len(ids) + [0] * pad)
        rows["segment_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * pad)
        rows["label"].append(int(fields[0]))
        if max_rows is not None and len(rows["label"]) >= max_rows:
            break
    if not rows["label"]:
        raise DataError(f"{tsv_path} has a header but no examples")
    return {k: np.asarray(v, np.int32) for k, v in rows.items()}


def vocab_file_of(data_dir: str) -> str:
    """The WordPiece vocabulary of a GLUE folder: `vocab-uncased.txt`, else `vocab.txt`."""
    vocab_file = os.path.join(data_dir, "vocab-uncased.txt")
    return vocab_file if os.path.exists(vocab_file) else os.path.join(data_dir, "vocab.txt")


def data_config(data_dir: str, split: str = "train") -> dict[str, int]:
    """Config fields the files of a GLUE folder decide: `vocab_size` (the vocabulary's tokens)
    and `seq_length` (the longest `[CLS] a [SEP] b [SEP]` of `<split>.tsv`, so nothing is
    truncated)."""
    tokenizer = WordPieceTokenizer(vocab_file_of(data_dir))
    tsv = os.path.join(data_dir, f"{split}.tsv")
    longest = 0
    for line in read_lines(tsv, "GLUE TSV", encoding="utf-8-sig")[1:]:
        fields = line.split("\t")
        if len(fields) == len(GLUE_COLUMNS):
            longest = max(
                longest, len(tokenizer.tokenize(fields[3])) + len(tokenizer.tokenize(fields[4])) + 3
            )
    if not longest:
        raise DataError(f"{tsv} has no sentence pairs")
    return {"vocab_size": len(tokenizer.vocab), "seq_length": longest}


def make_input_fn(cfg: BertConfig, model: str):
    def input_fn(
        data_dir: str,
        batch_size: int,
        split: str = "train",
        vocab_file: str | None = None,
        max_rows: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
    ):
        """Batches of a GLUE sentence-pair task: `<data_dir>/<split>.tsv`, tokenised with
        `vocab_file` (default: `<data_dir>/vocab-uncased.txt`, else `<data_dir>/vocab.txt`)."""
        if cfg.head != "classification":
            raise ValueError(
                f"{model}: the GLUE reader feeds the classification head; this "
                f"model has head='{cfg.head}'"
            )
        if vocab_file is None:
            vocab_file = vocab_file_of(data_dir)
        tokenizer = WordPieceTokenizer(vocab_file)
        check_vocab_fits(tokenizer.vocab, vocab_file, cfg.vocab_size, model)
        tsv = os.path.join(data_dir, f"{split}.tsv")
        arrays = read_glue_pairs(tsv, tokenizer, cfg.seq_length, max_rows)
        if int(arrays["label"].max()) >= cfg.num_labels:
            raise DataError(
                f"{tsv} has label {int(arrays['label'].max())} but {model} has "
                f"num_labels={cfg.num_labels}"
            )
        return iterate_batches(arrays, batch_size, shuffle, seed, epochs, tsv)

    return input_fn


def get(preset: str = "tiny", **overrides) -> ModelSpec:
    cfg = resolve_config("bert", PRESETS, preset, overrides)
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"bert: hidden_size {cfg.hidden_size} does not divide into {cfg.num_heads} heads"
        )
    return ModelSpec(
        name="bert",
        preset=preset,
        config=cfg,
        model_fn=lambda features: build(cfg, features),
        feature_spec=feature_spec(cfg),
        layer_names=layer_names(cfg),
        synthetic_batch=lambda batch_size, rng: synthetic_batch(cfg, batch_size, rng),
        input_fn=make_input_fn(cfg, f"bert/{preset}"),
        default_global_batch_size=cfg.global_batch_size,
        default_optimizer=adam(cfg.learning_rate),
    )
