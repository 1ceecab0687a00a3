"""Issue 2: Horovod (Gloo) runs graph-mode collectives on the global set and on a process set."""

import pytest

from multirank import runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def smoke():
    """Launched through our wrapper launch/horovod.sh (horovodrun --gloo underneath)."""
    reason = runner.horovod_missing_reason()
    if reason:
        pytest.skip(reason)
    return runner.run("smoke.py", 3, timeout_s=240, launcher="launch/horovod.sh")


def test_horovodrun_gloo_three_ranks_all_finish(smoke):
    assert smoke.returncode == 0, smoke.output[-4000:]
    assert sorted(smoke.records("SMOKE")) == [0, 1, 2], smoke.output[-4000:]


def test_global_allreduce_sums_over_all_three_ranks(smoke):
    for rank, (rec,) in smoke.records("SMOKE").items():
        assert rec["size"] == 3
        assert rec["global_sum"] == [30.0, 33.0, 36.0]  # sum over r of [0,1,2] + 10 r


def test_allreduce_and_broadcast_on_two_rank_process_set(smoke):
    recs = {r: rec for r, (rec,) in smoke.records("SMOKE").items()}
    for rank in (0, 1):
        assert recs[rank]["pair_size"] == 2 and recs[rank]["in_pair"]
        assert recs[rank]["pair_sum"] == [10.0, 12.0, 14.0]  # ranks 0 and 1 only
        assert recs[rank]["pair_bcast_from_1"] == [10.0, 11.0, 12.0]
    assert not recs[2]["in_pair"] and "pair_sum" not in recs[2]


# mpirun (launch/mpirun.sh) is covered by test_trainer_multirank.py, which trains under it.
