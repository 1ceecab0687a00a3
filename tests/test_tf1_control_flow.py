"""TF1 control flow (v1 while_loop under tf.compat.v1.disable_control_flow_v2()): refused when
the trainer is built, with an error saying what to do; the same model code under control flow
v2 (TF 2's default) trains exactly (test_trainer_equivalence.py, model 'rnn')."""

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import TemplateError, build_template
from planner.plan_format import even_plan

v1 = tf.compat.v1
LAYERS = ("input_proj", "rnn_0", "rnn_1", "loss")


@pytest.fixture
def control_flow_v1():
    was_v2 = v1.control_flow_v2_enabled()
    v1.disable_control_flow_v2()
    try:
        yield
    finally:
        if was_v2:
            v1.enable_control_flow_v2()


def optimizer():
    return v1.train.GradientDescentOptimizer(0.1)


def test_a_v1_while_loop_model_is_refused_when_the_trainer_is_built(control_flow_v1):
    case = models.RNN
    plan = even_plan(LAYERS, [1, 1], 8, 2, "1f1b")
    with pytest.raises(
        TemplateError,
        match=r"TF1 control flow .*rnn_0/while/\w+ \((Enter|Merge|"
        r"Switch|Exit)\b.*layer 'rnn_0'.*control flow v2",
    ):
        Trainer(case.model_fn, case.feature_spec, optimizer, plan, 8, optimize_graph=False)


def test_the_template_analysis_refuses_v1_control_flow_before_differentiating(control_flow_v1):
    with pytest.raises(TemplateError, match="disable_control_flow_v2"):
        build_template(models.RNN.model_fn, models.RNN.feature_spec)


def test_the_single_device_reference_still_trains_a_v1_while_loop_model(control_flow_v1):
    case = models.RNN
    trainer = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer, 8, seed=1, optimize_graph=False
    )
    try:
        assert np.isfinite(trainer.train_step(case.make_batch(np.random.default_rng(0), 8)))
    finally:
        trainer.close()


def test_the_same_model_code_under_control_flow_v2_trains_exactly():
    case = models.RNN
    batch = case.make_batch(np.random.default_rng(0), 8)
    reference = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, optimizer, 8, seed=1, optimize_graph=False
    )
    expected = [reference.train_step(batch) for _ in range(2)]
    reference.close()
    plan = even_plan(build_template(case.model_fn, case.feature_spec).layers, [1, 1], 8, 2, "1f1b")
    trainer = Trainer(
        case.model_fn, case.feature_spec, optimizer, plan, 8, seed=1, optimize_graph=False
    )
    try:
        assert [trainer.train_step(batch) for _ in range(2)] == pytest.approx(expected, rel=1e-5)
    finally:
        trainer.close()
