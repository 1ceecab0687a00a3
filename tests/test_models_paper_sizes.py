"""The paper-size presets: their layers line up with the DAPPLE profiles the planner reads, and
their graphs build (without initialising the variables) with the published parameter counts.
BERT-48, XLNet-36 and AmoebaNet-36 build at full width with fewer layers (a full build takes
tens of seconds); the layer lists of the full presets are checked against the profiles."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import models
from planner.profile import Profile

PROFILES = os.path.join(os.path.dirname(__file__), "data", "profiles", "dapple")


def _profile_layers(name, batch):
    """The node descriptions of a DAPPLE graph.txt, in file order (names are node ids)."""
    profile = Profile.load(os.path.join(PROFILES, name), batch_size=batch)
    return [layer.description for layer in profile.layers]


def _build(spec):
    graph = tf.Graph()
    with graph.as_default():
        loss = spec.model_fn(spec.placeholders())
        params = {v.op.name: int(np.prod(v.shape)) for v in tf.compat.v1.trainable_variables()}
    assert loss.shape.rank == 0
    return graph, params


def test_amoebanet_36_has_the_cells_of_the_dapple_profile_in_order():
    profile = _profile_layers("amoeba-36-pbs-1.txt", 1)
    ours = models.get_model("amoebanet", "amoebanet-36").layer_names
    assert list(ours[:-2]) == [
        n for n in profile if n not in ("Input", "final_layer", "softmax_loss")
    ]
    assert ours[-2:] == ("head", "loss")


def test_amoebanet_18_has_the_cells_of_the_dapple_profile_in_order():
    profile = _profile_layers("amoeba-18-pbs-8.txt", 8)
    ours = models.get_model("amoebanet", "amoebanet-18").layer_names
    assert list(ours[:-2]) == [
        n for n in profile if n not in ("Input", "final_layer", "softmax_loss")
    ]


def test_vgg19_layers_map_one_to_one_onto_the_dapple_profile():
    profile = _profile_layers("vgg-19-pbs-32.txt", 32)[1:]  # without Input
    ours = models.get_model("vgg19", "vgg19").layer_names
    renamed = [
        re.sub(r"^Conv2d_(\d)_(\d)$", r"conv\1_\2", re.sub(r"^MaxPool2d_(\d)$", r"pool\1", n))
        for n in profile
    ]
    renamed = [
        {"FC1": "fc6", "FC2": "fc7", "Prediction": "fc8", "Loss": "loss"}.get(n, n) for n in renamed
    ]
    assert list(ours) == renamed


@pytest.mark.parametrize(
    "preset,profile,batch,pattern",
    [
        ("bert-48", "bert-48-pbs-2.txt", 2, r"layer_\d+"),
        ("xlnet-36", "xlnet-36-pbs-1.txt", 1, r"Layer_\d+"),
    ],
)
def test_transformer_presets_have_as_many_layers_as_the_dapple_profile(
    preset, profile, batch, pattern
):
    model = preset.split("-")[0]
    ours = models.get_model(model, preset).layer_names
    theirs = [n for n in _profile_layers(profile, batch) if re.fullmatch(pattern, n)]
    assert [n for n in ours if n.startswith("layer_")] == [n.lower() for n in theirs]


def test_vgg19_at_224_builds_with_143_7_million_parameters():
    _, params = _build(models.get_model("vgg19", "vgg19"))
    assert sum(params.values()) == 143_667_240


def test_gnmt_16_builds_with_eight_encoder_and_eight_decoder_layers():
    spec = models.get_model("gnmt", "gnmt-16")
    graph, params = _build(spec)
    assert sum(1 for n in spec.layer_names if n.startswith("encoder_")) == 9  # + embedding
    assert sum(1 for n in spec.layer_names if n.startswith("decoder_")) == 9
    # The profile's first decoder LSTM after attention reads [output; context]: LSTM(2048, 1024).
    assert params["decoder_1/lstm/kernel"] == (2048 + 1024) * 4096
    assert params["encoder_embedding/embedding"] == 36560 * 1024


def test_bert_48_width_builds_with_the_bert_large_layer_size():
    spec = models.get_model("bert", "bert-48", num_layers=2)
    _, params = _build(spec)
    per_layer = sum(v for k, v in params.items() if k.startswith("layer_0/"))
    assert per_layer == 12_596_224  # 50,384,896 bytes in bert-48-pbs-2.txt
    assert len(models.get_model("bert", "bert-48").layer_names) == 48 + 3


def test_xlnet_36_width_builds_with_the_xlnet_large_layer_size():
    spec = models.get_model("xlnet", "xlnet-36", num_layers=1)
    _, params = _build(spec)
    per_layer = sum(v for k, v in params.items() if k.startswith("layer_0/"))
    # q, k, v, o, r projections (5 × 1024²) + FFN (2 × 1024 × 4096) + biases and norms: XLNet-
    # large's 13.6M per layer (xlnet-36-pbs-1.txt rounds it to 52,000,000 bytes).
    assert per_layer == 13_645_824
    assert params["embedding/word_embedding"] == 32000 * 1024


def test_amoebanet_36_width_builds_at_224_with_one_cell_per_stack():
    spec = models.get_model("amoebanet", "amoebanet-36", cells_per_stack=1)
    graph, params = _build(spec)
    assert spec.layer_names[:4] == ("stem", "cell_stem_0", "cell_stem_1", "cell_0")
    image = graph.get_tensor_by_name("image:0")
    assert image.shape.as_list() == [None, 224, 224, 3]
