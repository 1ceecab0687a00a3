"""XLNet (Yang et al. 2019) pre-training: permutation language modelling with two-stream
relative-position self-attention.

Every layer updates two streams with the same weights: the content stream `h` (query position i
attends to the positions its permutation lets it see, and to itself) and the query stream `g`
(the same, except itself; it starts from a learned mask embedding, so it knows position i but
not token i). Attention scores are the sum of the content term (q + r_w_bias)·k, the relative
position term (q + r_r_bias)·W_r·R(i−j) with sinusoidal R over distances T … −T+1 (XLNet's
"bi" attention) and the segment term (q + r_s_bias)·s[seg_i ≠ seg_j]. Position biases are per
layer (XLNet's `untie_r`). The loss predicts the target tokens from the query stream through
the tied word embedding.

Simplifications of the original, on purpose (one training segment, no recurrence):
- no Transformer-XL memory (`mems`) and no segment recurrence;
- the query stream runs over all T positions instead of gathering the predicted positions with
  `target_mapping` (identical values at the predicted positions; the loss weights the others 0);
- the permutation, the partial-prediction targets and `perm_mask` are inputs (`perm_mask[i, j]
  = 1`: position i may not see position j); `synthetic_batch` samples them as XLNet does (a
  random factorisation order over the real tokens, the last ~1/6 of it predicted).

Layers: `embedding`, `layer_0` … `layer_{L-1}`, `loss` (the DAPPLE profiles' `Embed-Token` …
`ATTN_MASK`, `Layer_i`, `XLNET_LOSS`). Per-example loss: the mean cross entropy over the
example's predicted tokens; the model loss is the mean over rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from models import layers as L
from models.spec import ModelSpec, adam, resolve_config


@dataclasses.dataclass(frozen=True)
class XlnetConfig:
    vocab_size: int = 32000
    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    d_head: int = 64
    d_inner: int = 4096
    seq_length: int = 512
    predict_fraction: float = 1 / 6  # of the real tokens, in synthetic batches
    dropout: float = 0.0
    learning_rate: float = 1e-4
    global_batch_size: int = 32


PRESETS = {
    "tiny": XlnetConfig(
        vocab_size=128,
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_head=16,
        d_inner=64,
        seq_length=16,
        learning_rate=1e-3,
        global_batch_size=8,
    ),
    "base": XlnetConfig(d_model=768, num_layers=12, num_heads=12, d_inner=3072),
    "large": XlnetConfig(),
    "xlnet-36": XlnetConfig(num_layers=36),  # the DAPPLE paper's XLNet-36
}


def layer_names(cfg: XlnetConfig) -> tuple[str, ...]:
    return ("embedding",) + tuple(f"layer_{i}" for i in range(cfg.num_layers)) + ("loss",)


def feature_spec(cfg: XlnetConfig):
    t = cfg.seq_length
    return {
        "input_ids": ((t,), tf.int32),
        "segment_ids": ((t,), tf.int32),
        "input_mask": ((t,), tf.int32),
        "perm_mask": ((t, t), tf.float32),
        "target_ids": ((t,), tf.int32),
        "target_weights": ((t,), tf.float32),
    }


def relative_positions(seq_length: int, d_model: int) -> np.ndarray:
    """Sinusoidal encodings [2T, d_model] of the distances T, T−1, …, −T+1."""
    distances = np.arange(seq_length, -seq_length, -1, dtype=np.float64)
    inv_freq = 1.0 / (10000 ** (np.arange(0, d_model, 2.0) / d_model))
    angles = distances[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def rel_shift(x: tf.Tensor, seq_length: int) -> tf.Tensor:
    """[B, N, T, 2T] scores against distances T … −T+1 -> [B, N, T, T] with
    out[..., i, j] = x[..., i, T − i + j], the score for distance i − j."""
    t = seq_length
    n = int(x.shape[1])
    x = tf.reshape(x, [-1, n, 2 * t, t])[:, :, 1:, :]
    return tf.reshape(x, [-1, n, t, 2 * t - 1])[:, :, :, :t]


def _two_stream_layer(h, g, features, cfg: XlnetConfig):
    t, d, n, dh = cfg.seq_length, cfg.d_model, cfg.num_heads, cfg.d_head

    def proj(name):
        return L.variable(name, [d, n, dh], stddev=0.02)

    q_w, k_w, v_w, r_w, o_w = (proj(x) for x in ("q", "k", "v", "r", "o"))
    r_w_bias = L.variable("r_w_bias", [n, dh], stddev=0.02)
    r_r_bias = L.variable("r_r_bias", [n, dh], stddev=0.02)
    r_s_bias = L.variable("r_s_bias", [n, dh], stddev=0.02)
    seg_embed = L.variable("seg_embed", [2, n, dh], stddev=0.02)

    # Who may see whom: 1 = masked. Padding keys are masked for everyone.
    pad = 1.0 - tf.cast(features["input_mask"], tf.float32)  # [B, T]
    query_mask = tf.minimum(features["perm_mask"] + pad[:, None, :], 1.0)  # [B, T, T]
    content_mask = query_mask * (1.0 - tf.eye(t))  # may see itself
    seg = features["segment_ids"]
    seg_mat = tf.one_hot(tf.cast(tf.not_equal(seg[:, :, None], seg[:, None, :]), tf.int32), 2)

    pos = tf.constant(relative_positions(t, d))
    k_r = tf.einsum("jd,dnh->jnh", pos, r_w)  # [2T, N, Dh]
    k_h = tf.einsum("bjd,dnh->bjnh", h, k_w)
    v_h = tf.einsum("bjd,dnh->bjnh", h, v_w)

    def attend(stream, mask):
        q = tf.einsum("bid,dnh->binh", stream, q_w)
        ac = tf.einsum("binh,bjnh->bnij", q + r_w_bias, k_h)
        bd = rel_shift(tf.einsum("binh,jnh->bnij", q + r_r_bias, k_r), t)
        ef = tf.einsum("binh,snh->bnis", q + r_s_bias, seg_embed)
        ef = tf.einsum("bijs,bnis->bnij", seg_mat, ef)
        scores = (ac + bd + ef) * (1.0 / np.sqrt(dh)) - 1e30 * mask[:, None, :, :]
        probs = L.dropout(tf.nn.softmax(scores), cfg.dropout)
        out = tf.einsum("bnij,bjnh->binh", probs, v_h)
        out = L.dropout(tf.einsum("binh,dnh->bid", out, o_w), cfg.dropout)
        return out

    # The post-attention norm and the feed-forward network are per position and shared by the
    # streams: run them once over both streams side by side along the time axis.
    both = tf.concat([h, g], axis=1)
    both = L.layer_norm(
        both + tf.concat([attend(h, content_mask), attend(g, query_mask)], 1), "attention_norm"
    )
    with tf.compat.v1.variable_scope("ffn"):
        ffn = L.dense(both, cfg.d_inner, "layer_1", activation=L.gelu)
        ffn = L.dropout(L.dense(ffn, d, "layer_2"), cfg.dropout)
    both = L.layer_norm(both + ffn, "ffn_norm")
    return both[:, :t], both[:, t:]


def build(cfg: XlnetConfig, features):
    with L.layer_scope("embedding"):
        word_embedding = L.variable("word_embedding", [cfg.vocab_size, cfg.d_model])
        h = L.dropout(tf.gather(word_embedding, features["input_ids"]), cfg.dropout)
        mask_emb = L.variable("mask_emb", [cfg.d_model])
        g = tf.zeros_like(h) + mask_emb
    for i in range(cfg.num_layers):
        with L.layer_scope(f"layer_{i}"):
            h, g = _two_stream_layer(h, g, features, cfg)
    with L.layer_scope("loss"):
        logits = tf.tensordot(L.dropout(g, cfg.dropout), word_embedding, axes=[[2], [1]])
        logits += L.variable("softmax_bias", [cfg.vocab_size], initializer="constant")
        per_example = L.masked_token_xent(
            logits, features["target_ids"], features["target_weights"]
        )
        return tf.reduce_mean(per_example, name="mean_loss")


def synthetic_batch(cfg: XlnetConfig, batch_size: int, rng: np.random.Generator):
    t = cfg.seq_length
    ids = rng.integers(5, cfg.vocab_size, size=(batch_size, t)).astype(np.int32)
    lengths = rng.integers(max(t * 3 // 4, 2), t + 1, size=batch_size)
    input_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    ids *= input_mask
    segment_ids = (np.arange(t)[None, :] >= (lengths // 2)[:, None]).astype(np.int32)
    perm_mask = np.zeros((batch_size, t, t), np.float32)
    weights = np.zeros((batch_size, t), np.float32)
    for r in range(batch_size):
        n = int(lengths[r])
        order = rng.permutation(n)  # factorisation order of real tokens
        num_targets = max(1, int(round(n * cfg.predict_fraction)))
        rank = np.full(t, -1)  # -1: not predicted, seen by all
        rank[order[n - num_targets :]] = np.arange(num_targets)
        is_target = rank >= 0
        # i may not see target j unless j comes strictly earlier in the order.
        perm_mask[r] = (is_target[None, :] & (rank[None, :] >= rank[:, None])).astype(np.float32)
        weights[r] = is_target
    return {
        "input_ids": ids,
        "segment_ids": segment_ids,
        "input_mask": input_mask,
        "perm_mask": perm_mask,
        "target_ids": ids.copy(),
        "target_weights": weights,
    }


def get(preset: str = "tiny", **overrides) -> ModelSpec:
    cfg = resolve_config("xlnet", PRESETS, preset, overrides)
    if cfg.d_model % 2:
        raise ValueError(f"xlnet d_model must be even (sinusoidal encodings), got {cfg.d_model}")
    return ModelSpec(
        name="xlnet",
        preset=preset,
        config=cfg,
        model_fn=lambda features: build(cfg, features),
        feature_spec=feature_spec(cfg),
        layer_names=layer_names(cfg),
        synthetic_batch=lambda batch_size, rng: synthetic_batch(cfg, batch_size, rng),
        input_fn=None,
        default_global_batch_size=cfg.global_batch_size,
        default_optimizer=adam(cfg.learning_rate),
    )
