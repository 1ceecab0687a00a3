"""Every model keeps the contract the pipeline runtime relies on (ARCHITECTURE.md, models/):
layers are the top-level name scopes in order, all variables belong to a layer, rows are
independent and the loss is their mean, the batch dimension is dynamic, initial weights do not
depend on the graph, and the tiny presets are cheap."""

import time

import numpy as np
import pytest
import tensorflow as tf

import models
from models.testing import session_config

tf1 = tf.compat.v1


class Built:
    """One tiny model built once, with an initialised session."""

    def __init__(self, name):
        self.spec = models.get_model(name, "tiny")
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.features = self.spec.placeholders()
            self.loss = self.spec.model_fn(self.features)
            self.forward_ops = list(self.graph.get_operations())
            self.variables = tf1.global_variables()
            self.grads = tf.gradients(self.loss, tf1.trainable_variables())
            self.train_op = tf1.train.GradientDescentOptimizer(1e-3).minimize(self.loss)
            init = tf1.global_variables_initializer()
        self.session = tf1.Session(graph=self.graph, config=session_config())
        self.session.run(init)

    def run_loss(self, batch):
        return self.session.run(self.loss, {self.features[k]: v for k, v in batch.items()})


@pytest.fixture(scope="module", params=models.MODEL_NAMES)
def built(request):
    b = Built(request.param)
    yield b
    b.session.close()


def test_layers_are_the_top_level_scopes_in_creation_order(built):
    scopes = []
    for op in built.forward_ops:
        scope = op.name.split("/")[0]
        if scope not in scopes and scope not in built.spec.feature_spec:
            scopes.append(scope)
    assert scopes == list(built.spec.layer_names)


def test_only_feature_placeholders_live_outside_the_layers(built):
    layers = set(built.spec.layer_names)
    outside = [op.name for op in built.forward_ops if op.name.split("/")[0] not in layers]
    assert sorted(outside) == sorted(built.spec.feature_spec)
    assert all(built.graph.get_operation_by_name(n).type == "Placeholder" for n in outside)


def test_every_variable_is_a_resource_variable_named_under_its_layer(built):
    layers = set(built.spec.layer_names)
    assert built.variables
    for v in built.variables:
        if v.op.name in ("global_step",):
            continue
        assert v.op.name.split("/")[0] in layers, v.op.name
        assert v.op.type == "VarHandleOp", (v.op.name, v.op.type)


def test_loss_is_a_scalar_and_every_variable_gets_a_gradient(built):
    assert built.loss.shape.rank == 0
    trainable = built.graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)
    assert [v.op.name for v, g in zip(trainable, built.grads) if g is None] == []


def test_placeholders_have_a_dynamic_batch_and_the_per_example_shapes_of_the_spec(built):
    for name, (shape, dtype) in built.spec.feature_spec.items():
        ph = built.features[name]
        assert ph.shape.as_list() == [None] + list(shape)
        assert ph.dtype == dtype


def test_synthetic_batch_matches_the_feature_spec(built):
    batch = built.spec.synthetic_batch(5, np.random.default_rng(1))
    assert built.spec.check_batch(batch) == 5
    for name, (_, dtype) in built.spec.feature_spec.items():
        assert batch[name].dtype == dtype.as_numpy_dtype, name


def test_full_batch_loss_is_the_row_weighted_mean_of_its_parts(built):
    """What micro-batching relies on: rows are independent and the loss is their mean."""
    batch = built.spec.synthetic_batch(8, np.random.default_rng(2))
    full = built.run_loss(batch)
    first = built.run_loss({k: v[:2] for k, v in batch.items()})
    rest = built.run_loss({k: v[2:] for k, v in batch.items()})
    np.testing.assert_allclose(full, (2 * first + 6 * rest) / 8, rtol=2e-5, atol=1e-6)
    one_row = [built.run_loss({k: v[i : i + 1] for k, v in batch.items()}) for i in range(8)]
    np.testing.assert_allclose(full, np.mean(one_row), rtol=2e-5, atol=1e-6)


def test_initial_weights_do_not_depend_on_what_else_the_graph_holds(built):
    other = tf.Graph()
    with other.as_default():
        tf1.set_random_seed(1234)
        tf1.get_variable("unrelated", [7, 3], use_resource=True)  # shifts op ids and seeds
        built.spec.model_fn(built.spec.placeholders())
        variables = tf1.global_variables()
        init = tf1.global_variables_initializer()
        with tf1.Session(config=session_config()) as s:
            s.run(init)
            theirs = {v.op.name: s.run(v) for v in variables if v.op.name != "unrelated"}
    ours = {v.op.name: built.session.run(v) for v in built.variables}
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_tiny_forward_backward_on_16_rows_takes_well_under_a_second(built):
    batch = built.spec.synthetic_batch(16, np.random.default_rng(3))
    feed = {built.features[k]: v for k, v in batch.items()}
    built.session.run(built.train_op, feed)  # warm-up (graph optimisation)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        built.session.run(built.train_op, feed)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, times


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_unknown_preset_and_unknown_config_field_are_rejected_by_name(name):
    with pytest.raises(ValueError, match="no preset 'huge'"):
        models.get_model(name, "huge")
    with pytest.raises(ValueError, match="no field.*'num_wheels'"):
        models.get_model(name, "tiny", num_wheels=3)


def test_unknown_model_is_rejected_with_the_list_of_models():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*vgg19, amoebanet"):
        models.get_model("resnet")


def test_check_batch_names_a_feature_with_the_wrong_shape():
    spec = models.get_model("bert", "tiny")
    batch = spec.synthetic_batch(4, np.random.default_rng(0))
    batch["input_ids"] = batch["input_ids"][:, :5]
    with pytest.raises(
        ValueError, match=r"'input_ids' has per-example shape \(5,\).*expects \(16,\)"
    ):
        spec.check_batch(batch)
