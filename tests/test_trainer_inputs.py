"""How a trainer takes its input rows: whole global batches, only the rows it reads
(`local_rows`), or its own tf.data dataset (`input_fn`), all training like single-device."""

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer, Trainer, take_rows
from graph_rewrite.partition import partition
from graph_rewrite.place import Slot
from graph_rewrite.rewrite import local_feature_rows
from graph_rewrite.template import build_template
from planner.plan_format import even_plan

GLOBAL_BATCH, STEPS, SEED = 16, 3, 5


def _optimizer():
    return tf.compat.v1.train.AdamOptimizer(0.01)


def _plan(replicas, micro_batches):
    layers = build_template(models.MLP.model_fn, models.MLP.feature_spec).layers
    return even_plan(layers, replicas, GLOBAL_BATCH, micro_batches, "1f1b")


def _batches(seed=3):
    rng = np.random.default_rng(seed)
    return [models.MLP.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


def test_a_slot_reads_its_replica_rows_of_every_micro_batch_of_its_stage_features():
    plan = _plan([2, 2], 2)  # micro-batch 8 rows, 4 per replica
    specs = partition(build_template(models.MLP.model_fn, models.MLP.feature_spec), plan)
    assert local_feature_rows(plan, specs, [Slot(0, 1)]) == {"x": ((4, 8), (12, 16))}
    assert local_feature_rows(plan, specs, [Slot(1, 0)]) == {"y": ((0, 4), (8, 12))}
    # both replicas of a stage in one process: their rows merge into the whole batch
    assert local_feature_rows(plan, specs, [Slot(0, 0), Slot(0, 1)]) == {"x": ((0, 16),)}


def test_take_rows_copies_the_ranges_in_order():
    value = np.arange(10)
    np.testing.assert_array_equal(take_rows(value, ((1, 3), (6, 8))), [1, 2, 6, 7])
    np.testing.assert_array_equal(take_rows(value, ((2, 5),)), [2, 3, 4])


@pytest.fixture(scope="module")
def reference():
    trainer = SingleDeviceTrainer(
        models.MLP.model_fn,
        models.MLP.feature_spec,
        _optimizer,
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    try:
        losses = [trainer.train_step(b) for b in _batches()]
        return losses, trainer.get_weights()
    finally:
        trainer.close()


def _check(losses, weights, reference):
    expected_losses, expected = reference
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for name, value in expected.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_trainer_reading_its_input_fn_dataset_trains_like_one_device(reference):
    data = _batches()

    def input_fn(local_rows):
        assert local_rows == {"x": ((0, GLOBAL_BATCH),), "y": ((0, GLOBAL_BATCH),)}
        return tf.data.Dataset.from_tensor_slices(
            {f: np.stack([take_rows(b[f], rows) for b in data]) for f, rows in local_rows.items()}
        )

    trainer = Trainer(
        models.MLP.model_fn,
        models.MLP.feature_spec,
        _optimizer,
        _plan([2, 2], 2),
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
        input_fn=input_fn,
    )
    try:
        losses = [trainer.train_step() for _ in range(STEPS)]
        _check(losses, trainer.get_weights(), reference)
    finally:
        trainer.close()


def test_input_fn_with_wrong_rows_is_refused_naming_the_feature():
    def input_fn(local_rows):
        return tf.data.Dataset.from_tensor_slices(
            {"x": np.zeros((2, 5, 8), np.float32), "y": np.zeros((2, 5), np.int32)}
        )

    with pytest.raises(ValueError, match="feature 'x'.*expected float32"):
        Trainer(
            models.MLP.model_fn,
            models.MLP.feature_spec,
            _optimizer,
            _plan([1, 1], 2),
            GLOBAL_BATCH,
            seed=SEED,
            optimize_graph=False,
            input_fn=input_fn,
        )


def test_a_batch_of_the_wrong_size_is_refused_naming_the_sizes_accepted():
    trainer = Trainer(
        models.MLP.model_fn,
        models.MLP.feature_spec,
        _optimizer,
        _plan([1], 1),
        GLOBAL_BATCH,
        seed=SEED,
        optimize_graph=False,
    )
    try:
        batch = _batches()[0]
        with pytest.raises(
            ValueError, match="feature 'x' has 5 rows, expected the global batch size 16"
        ):
            trainer.train_step({"x": batch["x"][:5], "y": batch["y"]})
        with pytest.raises(ValueError, match="needs a batch"):
            trainer.train_step()
        trainer.train_step(batch)
        assert trainer.fed_bytes == batch["x"].nbytes + batch["y"].nbytes
    finally:
        trainer.close()
