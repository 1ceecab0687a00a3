"""Models for dapple-tf: VGG19, AmoebaNet, BERT, GNMT, XLNet, written with tf.compat.v1 ops.

    spec = models.get_model("gnmt", "tiny")    # or get_model("bert", "tiny", vocab_size=30522)
    loss = spec.model_fn(spec.placeholders())
    batch = spec.synthetic_batch(16, np.random.default_rng(0))

Each model creates its layers as top-level name scopes, listed in `spec.layer_names`. See
models/README.md for presets, layer names, data formats and the measured training runs.
"""

from __future__ import annotations

import importlib

from models.data import DataError
from models.spec import ModelSpec

MODEL_NAMES = ("vgg19", "amoebanet", "bert", "gnmt", "xlnet")


def get_model(name: str, preset: str = "tiny", **overrides) -> ModelSpec:
    """The ModelSpec of model `name` at size `preset`, with config fields in `overrides`
    replaced (e.g. `vocab_size=30522`, `seq_length=64`)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; models: {', '.join(MODEL_NAMES)}")
    module = importlib.import_module(f"models.{name}")
    return module.get(preset, **overrides)


def presets(name: str) -> tuple[str, ...]:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; models: {', '.join(MODEL_NAMES)}")
    return tuple(importlib.import_module(f"models.{name}").PRESETS)


__all__ = ["DataError", "MODEL_NAMES", "ModelSpec", "get_model", "presets"]
