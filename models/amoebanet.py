"""AmoebaNet-A (Real et al. 2019) for ImageNet-style inputs, as pipelined by GPipe and DAPPLE.

Structure (NASNet search space): a 3×3 stride-2 convolution (`stem`), two reduction cells
(`cell_stem_0`, `cell_stem_1`), then three stacks of `cells_per_stack` normal cells separated
by reduction cells, then global average pooling and the classifier. Layer names follow the
DAPPLE profile `amoeba-36-pbs-1.txt`: `stem`, `cell_stem_0`, `cell_stem_1`, `cell_0` …,
`reduction_cell_0`, … `reduction_cell_1`, … , then `head` (the profile's `final_layer`) and
`loss` (`softmax_loss`). Each cell reads the outputs of the two cells before it.

Each cell has five blocks; block k combines two operations, each applied to one earlier hidden
state (state 0: this cell's input, state 1: the input of the previous cell, state 2+k: block
k's output), and adds the results. The cell output concatenates the states no block consumed.

Deviation from the paper, on purpose: no batch normalisation. Batch norm mixes rows, so a
micro-batch would not compute what the full batch computes. In its place every convolution
branch ends with one per-example normalisation over (height, width, channels) without learned
scale and shift (layer norm over the feature map; GroupNorm with one group).
The factorized reduction of a skipped-over input is a 2×2 average pooling with stride 2
followed by a 1×1 convolution.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from models import layers as L
from models.images import image_data
from models.spec import ModelSpec, momentum, resolve_config

# AmoebaNet-A genotype: (operation, input state) for the two inputs of each of the five blocks.
NORMAL_CELL = (
    (("avg_pool_3x3", 0), ("max_pool_3x3", 0)),
    (("separable_3x3_2", 1), ("none", 1)),
    (("none", 0), ("avg_pool_3x3", 1)),
    (("separable_3x3_2", 0), ("separable_5x5_2", 1)),
    (("avg_pool_3x3", 3), ("separable_3x3_2", 0)),
)
REDUCTION_CELL = (
    (("separable_3x3_2", 1), ("avg_pool_3x3", 0)),
    (("max_pool_3x3", 0), ("separable_7x7_2", 2)),
    (("max_pool_3x3", 1), ("max_pool_3x3", 0)),
    (("separable_3x3_2", 4), ("1x7_7x1", 0)),
    (("avg_pool_3x3", 1), ("separable_7x7_2", 0)),
)


@dataclasses.dataclass(frozen=True)
class AmoebaNetConfig:
    image_size: int = 224
    cells_per_stack: int = 12  # normal cells per stack; AmoebaNet-36 has 3 × 12
    filters: int = 256  # filters of the first stack (doubled at each reduction)
    stem_filters: int = 32
    num_classes: int = 1000
    dropout: float = 0.0
    learning_rate: float = 0.05
    global_batch_size: int = 128


PRESETS = {
    "tiny": AmoebaNetConfig(
        image_size=32,
        cells_per_stack=1,
        filters=4,
        stem_filters=4,
        num_classes=10,
        learning_rate=0.02,
        global_batch_size=8,
    ),
    "amoebanet-18": AmoebaNetConfig(cells_per_stack=6),
    "amoebanet-36": AmoebaNetConfig(),  # the DAPPLE paper's AmoebaNet-36
}


def cell_plan(cfg: AmoebaNetConfig) -> list[tuple[str, bool, int]]:
    """(layer name, is reduction, filters) of every cell, in order."""
    f = cfg.filters
    cells = [("cell_stem_0", True, max(f // 4, 1)), ("cell_stem_1", True, max(f // 2, 1))]
    normal = 0
    for stack in range(3):
        if stack > 0:
            f *= 2
            cells.append((f"reduction_cell_{stack - 1}", True, f))
        for _ in range(cfg.cells_per_stack):
            cells.append((f"cell_{normal}", False, f))
            normal += 1
    return cells


def layer_names(cfg: AmoebaNetConfig) -> tuple[str, ...]:
    return ("stem",) + tuple(name for name, _, _ in cell_plan(cfg)) + ("head", "loss")


def feature_spec(cfg: AmoebaNetConfig):
    return {"image": ((cfg.image_size, cfg.image_size, 3), tf.float32), "label": ((), tf.int32)}


def _norm(x, name):
    # Per-example, no learned scale/shift: the next cell's 1×1 convolutions rescale anyway, and
    # it halves the variable count of a cell.
    return L.layer_norm(x, name, axes=(1, 2, 3), epsilon=1e-5, affine=False)


def _relu_conv_norm(x, filters, kernel, name, stride=1):
    with tf.compat.v1.variable_scope(name):
        return _norm(
            L.conv2d(tf.nn.relu(x), filters, kernel, "conv", stride=stride, use_bias=False), "norm"
        )


def _factorized_reduction(x, filters, name):
    with tf.compat.v1.variable_scope(name):
        x = tf.nn.avg_pool2d(tf.nn.relu(x), ksize=2, strides=2, padding="SAME")
        return _norm(L.conv2d(x, filters, 1, "conv", use_bias=False), "norm")


def _operation(op, x, filters, stride, name):
    with tf.compat.v1.variable_scope(name):
        if op.startswith("separable_"):
            kernel = int(op.split("_")[1].split("x")[0])
            for i, s in enumerate((stride, 1)):  # "_2": two stacked separable convolutions
                x = L.separable_conv2d(tf.nn.relu(x), filters, kernel, f"sep_{i}", stride=s)
            return _norm(x, "norm")
        if op == "1x7_7x1":
            x = L.conv2d(tf.nn.relu(x), filters, (1, 7), "conv_1x7", stride=stride, use_bias=False)
            x = L.conv2d(x, filters, (7, 1), "conv_7x1", use_bias=False)
            return _norm(x, "norm")
        if op in ("avg_pool_3x3", "max_pool_3x3"):
            pool = tf.nn.avg_pool2d if op.startswith("avg") else tf.nn.max_pool2d
            x = pool(x, ksize=3, strides=stride, padding="SAME")
            if int(x.shape[-1]) != filters:
                x = _relu_conv_norm(x, filters, 1, "project")
            return x
        if op == "none":
            return x if stride == 1 else _factorized_reduction(x, filters, "reduce")
        raise ValueError(f"unknown AmoebaNet operation '{op}'")


def _cell(x, prev, filters, reduction):
    """One cell: `x` is the previous cell's output, `prev` the one before it."""
    if int(prev.shape[1]) != int(x.shape[1]):
        prev = _factorized_reduction(prev, filters, "adjust_prev")
    elif int(prev.shape[-1]) != filters:
        prev = _relu_conv_norm(prev, filters, 1, "adjust_prev")
    states = [_relu_conv_norm(x, filters, 1, "base"), prev]
    genotype = REDUCTION_CELL if reduction else NORMAL_CELL
    consumed = set()
    for b, pair in enumerate(genotype):
        outputs = []
        for side, (op, index) in enumerate(pair):
            stride = 2 if reduction and index < 2 else 1
            outputs.append(_operation(op, states[index], filters, stride, f"block_{b}/op_{side}"))
            consumed.add(index)
        states.append(tf.add_n(outputs))
    if reduction:
        # States 0 and 1 are at the input resolution; only reduced states can be concatenated.
        consumed |= {0, 1}
    return tf.concat([s for i, s in enumerate(states) if i not in consumed], axis=-1)


def build(cfg: AmoebaNetConfig, features):
    with L.layer_scope("stem"):
        x = L.conv2d(features["image"], cfg.stem_filters, 3, "conv", stride=2, use_bias=False)
        x = _norm(x, "norm")
    prev = x
    for name, reduction, filters in cell_plan(cfg):
        with L.layer_scope(name):
            x, prev = _cell(x, prev, filters, reduction), x
    with L.layer_scope("head"):
        x = tf.reduce_mean(tf.nn.relu(x), axis=[1, 2])
        logits = L.dense(L.dropout(x, cfg.dropout), cfg.num_classes, "logits", initializer="glorot")
    with L.layer_scope("loss"):
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=features["label"], logits=logits
        )
        return tf.reduce_mean(per_example, name="mean_loss")


def get(preset: str = "tiny", **overrides) -> ModelSpec:
    cfg = resolve_config("amoebanet", PRESETS, preset, overrides)
    return ModelSpec(
        name="amoebanet",
        preset=preset,
        config=cfg,
        model_fn=lambda features: build(cfg, features),
        feature_spec=feature_spec(cfg),
        layer_names=layer_names(cfg),
        **image_data(cfg.image_size, cfg.num_classes),
        default_global_batch_size=cfg.global_batch_size,
        default_optimizer=momentum(cfg.learning_rate),
    )
