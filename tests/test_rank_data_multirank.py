"""Per-rank feeding and variables (4 real ranks, plan 2x2, MLP): a rank holds only the variables
of its own stage, is fed only the rows its slot reads of the features its stage reads, whether
it is handed whole global batches, only its own rows, or reads them from its own tf.data
dataset (`input_fn`), and its checkpoints interchange with single-device training both ways.
Training stays equal to single-device training."""

import os

import numpy as np
import pytest

import rewrite_models as models
from dapple_tf.trainer import SingleDeviceTrainer
from multirank import rank_data_checks as checks
from multirank import runner

pytestmark = pytest.mark.slow

FEATURE_ROW_BYTES = {"x": 8 * 4, "y": 4}  # float32[8] and int32 per row
STAGE_FEATURES = {0: "x", 1: "y"}  # the MLP's first stage reads x, its last y


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    reason = runner.horovod_missing_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("rank_data")
    reference = SingleDeviceTrainer(
        models.MLP.model_fn,
        models.MLP.feature_spec,
        checks.optimizer,
        checks.GLOBAL_BATCH,
        seed=checks.SEED + 1,
        optimize_graph=False,
    )
    try:
        reference.train_step(checks.batches(1, seed=99)[0])  # weights and Adam slots not initial
        start = reference.get_weights()
        path = reference.save(str(out / "single"))
        losses = [
            reference.train_step(b)
            for b in checks.batches(checks.STEPS)
            + checks.batches(checks.STEPS, seed=654)
            + checks.batches(checks.STEPS, seed=777)
        ]
        final = reference.get_weights()
        variables = sorted(final)
    finally:
        reference.close()
    # TF collective all-reduces for the replicas' gradient sums here (the default, Horovod's, is
    # what tests/test_trainer_multirank.py runs), so both kinds of sum are tested across ranks
    result = runner.run(
        "rank_data_checks.py", 4, [out, path], timeout_s=300, env={"DAPPLE_GRADIENT_SUMS": "tf"}
    )
    assert result.returncode == 0, result.output[-6000:]
    records = {rank: recs[0] for rank, recs in result.records("RANKDATA").items()}
    assert sorted(records) == [0, 1, 2, 3], result.output[-4000:]
    return out, records, start, losses, final, variables


def _stage_of_rank(rank):
    return rank // 2  # plan 2x2: ranks 0, 1 hold stage 0; ranks 2, 3 stage 1


def test_each_rank_holds_only_the_variables_of_its_own_stage(run):
    _, records, _, _, _, variables = run
    stage_layers = {
        0: ("layer_0", "layer_1", "layer_2"),
        1: ("layer_3", "layer_4", "layer_5", "loss"),
    }
    for rank, record in records.items():
        own = stage_layers[_stage_of_rank(rank)]
        other = stage_layers[1 - _stage_of_rank(rank)]
        held = record["variables"]
        assert any(v.startswith(own) for v in held), (rank, held)
        assert not [v for v in held if v.startswith(other)], (rank, held)
    # together they hold the whole model (and optimizer), no more
    assert sorted({v for r in records.values() for v in r["variables"]}) == variables


def test_each_rank_is_fed_only_its_rows_of_the_features_its_stage_reads(run):
    _, records, _, _, _, _ = run
    b = checks.GLOBAL_BATCH // checks.MICRO_BATCHES
    for rank, record in records.items():
        replica = rank % 2
        feature = STAGE_FEATURES[_stage_of_rank(rank)]
        expected_rows = [
            [feature, i * b + replica * b // 2, i * b + (replica + 1) * b // 2]
            for i in range(checks.MICRO_BATCHES)
        ]
        assert record["local_rows"] == expected_rows, rank
        expected_bytes = checks.GLOBAL_BATCH // 2 * FEATURE_ROW_BYTES[feature]
        assert record["global_bytes"] == [expected_bytes] * checks.STEPS, rank
        assert record["local_bytes"] == [expected_bytes] * checks.STEPS, rank


def test_single_device_checkpoint_restores_into_the_ranks_and_training_stays_exact(run):
    out, records, start, losses, final, _ = run
    got = np.load(os.path.join(out, "weights.npz"))
    for name, value in start.items():
        np.testing.assert_array_equal(got["restored/" + name], value, err_msg=name)
    for rank, record in records.items():
        np.testing.assert_allclose(
            record["losses"], losses, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}"
        )
    for name, value in final.items():
        np.testing.assert_allclose(got["final/" + name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_ranks_checkpoint_restores_into_a_single_device_trainer(run):
    out, _, _, _, final, _ = run
    trainer = SingleDeviceTrainer(
        models.MLP.model_fn,
        models.MLP.feature_spec,
        checks.optimizer,
        checks.GLOBAL_BATCH,
        seed=checks.SEED + 2,
        optimize_graph=False,
    )
    try:
        trainer.restore(str(out / "ckpt"))
        restored = trainer.get_weights()
    finally:
        trainer.close()
    for name, value in final.items():
        np.testing.assert_allclose(restored[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
