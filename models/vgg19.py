"""VGG19 (Simonyan & Zisserman 2015): 16 3×3 convolutions in five blocks with max pooling,
then three fully connected layers.

Layers, one per node of the DAPPLE profile `vgg-19-pbs-32.txt` (Conv2d_1_1 … MaxPool2d_5, FC1,
FC2, Prediction, Loss): `conv1_1`, `conv1_2`, `pool1`, …, `conv5_4`, `pool5`, `fc6`, `fc7`,
`fc8`, `loss`. No batch norm (the original VGG has none), so rows are independent.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models import layers as L
from models.images import image_data
from models.spec import ModelSpec, momentum, resolve_config

CONVS_PER_BLOCK = (2, 2, 4, 4, 4)


@dataclasses.dataclass(frozen=True)
class Vgg19Config:
    image_size: int = 224
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    fc_units: int = 4096
    num_classes: int = 1000
    dropout: float = 0.0
    learning_rate: float = 0.01
    global_batch_size: int = 256


PRESETS = {
    "tiny": Vgg19Config(
        image_size=32,
        widths=(4, 8, 8, 16, 16),
        fc_units=32,
        num_classes=10,
        learning_rate=0.01,
        global_batch_size=8,
    ),
    "cifar": Vgg19Config(image_size=32, num_classes=10, fc_units=512),
    "vgg19": Vgg19Config(),  # the paper's VGG19 at 224×224, as profiled by DAPPLE
}


def layer_names(cfg: Vgg19Config) -> tuple[str, ...]:
    names = []
    for block, convs in enumerate(CONVS_PER_BLOCK, start=1):
        names += [f"conv{block}_{i}" for i in range(1, convs + 1)] + [f"pool{block}"]
    return tuple(names) + ("fc6", "fc7", "fc8", "loss")


def feature_spec(cfg: Vgg19Config):
    return {"image": ((cfg.image_size, cfg.image_size, 3), tf.float32), "label": ((), tf.int32)}


def build(cfg: Vgg19Config, features):
    x = features["image"]
    for block, (convs, width) in enumerate(zip(CONVS_PER_BLOCK, cfg.widths), start=1):
        for i in range(1, convs + 1):
            with L.layer_scope(f"conv{block}_{i}"):
                x = L.conv2d(x, width, 3, "conv", activation=tf.nn.relu)
        with L.layer_scope(f"pool{block}"):
            x = L.max_pool(x, 2, 2)
    with L.layer_scope("fc6"):
        x = tf.reshape(x, [-1, int(x.shape[1]) * int(x.shape[2]) * int(x.shape[3])])
        x = L.dropout(
            L.dense(x, cfg.fc_units, "dense", activation=tf.nn.relu, initializer="he"), cfg.dropout
        )
    with L.layer_scope("fc7"):
        x = L.dropout(
            L.dense(x, cfg.fc_units, "dense", activation=tf.nn.relu, initializer="he"), cfg.dropout
        )
    with L.layer_scope("fc8"):
        logits = L.dense(x, cfg.num_classes, "dense", initializer="glorot")
    with L.layer_scope("loss"):
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=features["label"], logits=logits
        )
        return tf.reduce_mean(per_example, name="mean_loss")


def get(preset: str = "tiny", **overrides) -> ModelSpec:
    cfg = resolve_config("vgg19", PRESETS, preset, overrides)
    if len(cfg.widths) != len(CONVS_PER_BLOCK):
        raise ValueError(f"vgg19 needs {len(CONVS_PER_BLOCK)} block widths, got {cfg.widths}")
    if cfg.image_size % 32:
        raise ValueError(
            f"vgg19 image_size must be a multiple of 32 (five 2×2 poolings), got {cfg.image_size}"
        )
    return ModelSpec(
        name="vgg19",
        preset=preset,
        config=cfg,
        model_fn=lambda features: build(cfg, features),
        feature_spec=feature_spec(cfg),
        layer_names=layer_names(cfg),
        **image_data(cfg.image_size, cfg.num_classes),
        default_global_batch_size=cfg.global_batch_size,
        default_optimizer=momentum(cfg.learning_rate),
    )
