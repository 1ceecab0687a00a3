"""The command lines with a layer rule: `python -m dapple_tf.profile --layers` on the TF1 BERT,
`train.py --layers` (runner) on the registry's BERT."""

import functools

import numpy as np
import tensorflow as tf

import tf1_bert
from dapple_tf import profile, runner
from models.spec import ModelSpec
from planner.profile import Profile

BERT_LAYERS = (
    "bert/embeddings",
    "bert/encoder/layer_0",
    "bert/encoder/layer_1",
    "bert/pooler",
    "cls",
)


def tf1_bert_spec(name, preset):
    return ModelSpec(
        name,
        preset,
        None,
        functools.partial(tf1_bert.bert_classifier, dropout_rate=0.1),
        tf1_bert.FEATURE_SPEC,
        BERT_LAYERS,
        lambda n, rng: tf1_bert.make_batch(rng, n),
        None,
        8,
        lambda: tf.compat.v1.train.AdamOptimizer(1e-3),
    )


def test_the_profile_command_names_the_layers_of_the_rule(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert (
        profile.main(
            [
                "--model",
                "tf1_bert",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "--warmup-steps",
                "0",
                "--measured-steps",
                "1",
                "--layers",
                tf1_bert.LAYERS,
            ],
            get_model=tf1_bert_spec,
        )
        == 0
    )
    assert Profile.load(str(out)).layer_names == BERT_LAYERS
    assert "bert/encoder/layer_1" in capsys.readouterr().out


def test_train_with_a_layer_rule_plans_and_trains_the_layers_it_names(tmp_path):
    # registry BERT scopes: embedding, layer_0, layer_1, pooler, loss; the rule leaves
    # `embedding` to join layer_0 and `pooler` to join `loss`
    result = runner.run_training(
        runner.TrainingConfig(
            model="bert",
            preset="tiny",
            dapple_plan="2:1",
            num_devices=3,
            steps=2,
            model_dir=str(tmp_path / "run"),
            layers=r"layer_\d+|loss",
            save_every=100,
        )
    )
    try:
        stages = [stage.layers for stage in result["plan"].stages]
        assert [layer for layers in stages for layer in layers] == ["layer_0", "layer_1", "loss"]
        assert np.isfinite(result["last_loss"])
    finally:
        result["trainer"].close()
