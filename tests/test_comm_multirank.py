"""dapple_tf's multi-rank communication (comm, process_sets, boundary_exchange,
gradient_reduction, rank_failures): row bookkeeping and process-set order (pure), the watchdog,
and the collectives really run on 4 local ranks.

The multi-rank tests launch `horovodrun --gloo -np 4 -H localhost:4` on
tests/multirank/comm_checks.py; one launch checks all exchange facts, one launch per failure.
"""

import numpy as np
import pytest

from dapple_tf import rank_failures
from dapple_tf.boundary_exchange import boundary_transfers
from dapple_tf.process_sets import gradient_groups, pair_groups
from multirank import runner
from planner.plan_format import Plan, Stage

ROWS, MICRO_BATCHES = 6, 2  # as in tests/multirank/comm_checks.py


def plan_of(replicas, rows=ROWS, micro_batches=MICRO_BATCHES):
    stages, device = [], 0
    for i, r in enumerate(replicas):
        stages.append(Stage((f"layer_{i}",), tuple(range(device, device + r))))
        device += r
    return Plan(rows * micro_batches, micro_batches, "gpipe", tuple(stages))


# ---- pure bookkeeping --------------------------------------------------------------------------
def test_three_to_one_boundary_is_three_transfers_that_tile_the_receiver():
    t = boundary_transfers(plan_of([3, 1]), 0, 1)
    assert [(x.sender, x.receiver, x.begin, x.end, x.src_begin, x.dst_begin) for x in t] == [
        (0, 3, 0, 2, 0, 0),
        (1, 3, 2, 4, 0, 2),
        (2, 3, 4, 6, 0, 4),
    ]


def test_one_to_three_boundary_sends_each_receiver_its_slice_of_the_sender():
    t = boundary_transfers(plan_of([1, 3]), 0, 1)
    assert [(x.sender, x.receiver, x.begin, x.end, x.src_begin, x.dst_begin) for x in t] == [
        (0, 1, 0, 2, 0, 0),
        (0, 2, 2, 4, 2, 0),
        (0, 3, 4, 6, 4, 0),
    ]


def test_two_to_three_boundary_splits_rows_at_every_overlap():
    t = boundary_transfers(plan_of([2, 3]), 0, 1)
    assert [(x.sender, x.receiver, x.begin, x.end) for x in t] == [
        (0, 2, 0, 2),
        (0, 3, 2, 3),
        (1, 3, 3, 4),
        (1, 4, 4, 6),
    ]
    covered = np.zeros(ROWS, int)
    for x in t:
        covered[x.begin : x.end] += 1
    assert covered.tolist() == [1] * ROWS


def test_process_set_order_is_gradient_groups_then_boundary_pairs_without_duplicates():
    plan = plan_of([2, 2])
    assert gradient_groups(plan, tied_stages=[(0, 1)]) == [(0, 1), (2, 3), (0, 1, 2, 3)]
    assert pair_groups(plan) == [(0, 2), (1, 3)]
    assert gradient_groups(plan_of([1, 1, 1, 1]), tied_stages=[(0, 3)]) == [(0, 3)]
    assert pair_groups(plan_of([1, 1, 1, 1])) == [(0, 1), (1, 2), (2, 3)]


def test_boundary_pairs_include_non_adjacent_stages_that_exchange_tensors():
    plan = plan_of([1, 1, 1, 1])
    # a skip from stage 0 to stage 2 (and consecutive boundaries), in the order given
    assert pair_groups(plan, [(0, 1), (0, 2), (1, 2), (2, 3)]) == [
        (0, 1),
        (0, 2),
        (1, 2),
        (2, 3),
    ]
    assert pair_groups(plan_of([2, 1, 2]), [(0, 2)]) == [(0, 3), (1, 4)]


LAUNCHER_VARIABLES = (
    "HOROVOD_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "HOROVOD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
)


def test_session_config_of_a_launched_rank_shows_only_its_local_gpu(monkeypatch):
    import tensorflow as tf
    from dapple_tf import devices

    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    given = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    pinned = devices.pinned_config(given)
    assert pinned.gpu_options.visible_device_list == "2" and pinned.allow_soft_placement
    assert given.gpu_options.visible_device_list == ""  # the caller's config is not changed
    assert devices.pinned_config(None).gpu_options.visible_device_list == "2"


def test_session_config_of_a_single_process_is_left_as_given(monkeypatch):
    import tensorflow as tf
    from dapple_tf import devices

    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    given = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    assert devices.pinned_config(given) is given
    assert devices.pinned_config(None) is None


def test_watchdog_names_a_rank_whose_heartbeat_went_stale(tmp_path):
    log = rank_failures.CollectiveLog()
    log.add("dapple/mb0/s0_to_s1/act/rank0_to_rank1_rows0_3", (0, 1))
    log.add("dapple/step_end", (0, 1, 2))
    exits = []
    me = rank_failures.Watchdog(
        0, 3, str(tmp_path), log, peer_timeout_s=5, step_timeout_s=100, exit_fn=exits.append
    )
    peer = rank_failures.Watchdog(
        1, 3, str(tmp_path), rank_failures.CollectiveLog(), peer_timeout_s=5
    )
    other = rank_failures.Watchdog(
        2, 3, str(tmp_path), rank_failures.CollectiveLog(), peer_timeout_s=5
    )
    for w in (me, peer, other):
        w.step_begin(7)
    assert me.check(now=_time() + 1) is None
    other._beat()
    import json

    path = tmp_path / "rank1.json"
    state = json.loads(path.read_text())
    state["time"] -= 30  # rank 1 stopped beating 30 s ago
    path.write_text(json.dumps(state))
    report = me.check(now=_time())
    assert "missing rank 1: no heartbeat for" in report
    assert (
        "dapple/mb0/s0_to_s1/act/rank0_to_rank1_rows0_3" in report
        and "missing rank 2" not in report
    )


def test_a_failed_collective_is_reported_with_its_name_and_the_rank_whose_process_is_gone(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = rank_failures.Watchdog(0, 3, str(tmp_path), rank_failures.CollectiveLog(), interval_s=0.2)
    alive = rank_failures.Watchdog(
        1, 3, str(tmp_path), rank_failures.CollectiveLog(), interval_s=0.2
    ).start()
    gone = rank_failures.Watchdog(
        2, 3, str(tmp_path), rank_failures.CollectiveLog(), interval_s=0.2
    )
    gone._beat()
    import json

    state = json.loads((tmp_path / "rank2.json").read_text())
    state["pid"] = dead.pid
    (tmp_path / "rank2.json").write_text(json.dumps(state))

    class FakeOp:
        name = "dapple/mb1/s0_to_s1/k0_j0/rank0_to_rank2/p0"

    class FakeError(Exception):
        op = FakeOp()

    try:
        text = rank_failures.explain_collective_failure(
            me, FakeError("Horovod has been shut down."), 4
        )
    finally:
        alive.stop()
    assert "step 4: collective 'dapple/mb1/s0_to_s1/k0_j0/rank0_to_rank2/p0' failed" in text
    assert f"rank 2: process {dead.pid} is gone" in text and "rank 1:" not in text


def _exit_monitor_setup(tmp_path, rank, size):
    from dapple_tf import exit_monitor

    for k in range(size):
        w = rank_failures.Watchdog(k, size, str(tmp_path), rank_failures.CollectiveLog())
        w.step_begin(5)
    return exit_monitor, {
        "rank": rank,
        "size": size,
        "directory": str(tmp_path),
        "pid": 1,
        "shared": {"1": "dapple/mb0/s0_to_s1/k0_j0/rank0_to_rank1/p0"},
    }


def test_exit_monitor_names_the_rank_that_ended_first_and_what_this_rank_waited_for(tmp_path):
    monitor, setup = _exit_monitor_setup(tmp_path, rank=0, size=3)
    monitor.record_end(str(tmp_path), 2, 300, monitor.ABRUPT, 100.4)  # aborted by Horovod
    monitor.record_end(str(tmp_path), 1, 200, monitor.ABRUPT, 100.0)  # killed
    monitor.record_end(str(tmp_path), 0, 100, monitor.ABRUPT, 100.3)
    text = monitor.report(setup, 101.0, "this rank's process ended abruptly")
    assert "dapple: rank 0: rank 1 died first:" in text and "ended 1.0 s ago" in text
    assert (
        "dapple: rank 0: rank 0 was waiting on rank 1 in step 5: the collectives it shares "
        "with rank 1: dapple/mb0/s0_to_s1/k0_j0/rank0_to_rank1/p0"
    ) in text
    assert "also ended after it: ranks [0, 2]" not in text and "ranks [2]" in text


def test_exit_monitor_blames_no_rank_when_a_watchdog_stopped_the_job_first(tmp_path):
    monitor, setup = _exit_monitor_setup(tmp_path, rank=0, size=3)
    monitor.record_end(str(tmp_path), 1, 200, monitor.WATCHDOG, 100.0)  # reported a hung rank 2
    monitor.record_end(str(tmp_path), 2, 300, monitor.ABRUPT, 100.5)  # then stopped by the launcher
    text = monitor.report(setup, 101.0, "the launcher is stopping this rank")
    assert "died first" not in text
    assert "the job was stopped after the watchdog of rank(s) [1] reported missing ranks" in text


def test_checkpoint_owner_of_a_variable_is_the_first_replica_of_the_first_stage_holding_it():
    from dapple_tf.checkpoint_sharded import owners

    by_rank = [
        ["global_step", "emb"],
        ["global_step", "emb"],
        ["global_step", "w", "emb"],
        ["global_step", "w"],
    ]
    # plan devices in stage order: stage 0 on [1, 0], stage 1 on [2, 3]
    assert owners(by_rank, [1, 0, 2, 3]) == {"global_step": 1, "emb": 1, "w": 2}


def _time():
    import time

    return time.time()


# ---- really launched ---------------------------------------------------------------------------
def _skip_without_horovod():
    reason = runner.horovod_missing_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def exchange():
    _skip_without_horovod()
    result = runner.run("comm_checks.py", 4, ["exchange"], timeout_s=240)
    assert result.returncode == 0, result.output[-5000:]
    return {
        (rec["plan"], rank): rec for rank, recs in result.records("COMM").items() for rec in recs
    }


def activation(mb, boundary):
    rows = np.arange(ROWS, dtype=np.float32)[:, None]
    return 1000 * boundary + 100 * mb + rows + np.array([0.0, 0.5], np.float32)


PLANS = [[3, 1], [1, 3], [2, 2], [1, 1, 1, 1]]


@pytest.mark.slow
@pytest.mark.parametrize("replicas", PLANS, ids=lambda r: ":".join(map(str, r)))
def test_each_receiver_gets_exactly_its_rows_of_the_previous_stage(exchange, replicas):
    plan = plan_of(replicas)
    for s in range(1, plan.num_stages):
        for j, rank in enumerate(plan.stages[s].devices):
            begin, end = plan.rows_of_replica(s, j)
            for mb in range(MICRO_BATCHES):
                got = exchange[(plan.notation, rank)][f"act_in/mb{mb}/s{s - 1}_to_s{s}"]
                np.testing.assert_array_equal(got, activation(mb, s - 1)[begin:end])


@pytest.mark.slow
@pytest.mark.parametrize("replicas", PLANS, ids=lambda r: ":".join(map(str, r)))
def test_activation_gradients_travel_back_to_the_replica_that_sent_the_rows(exchange, replicas):
    plan = plan_of(replicas)
    for s in range(plan.num_stages - 1):
        for k, rank in enumerate(plan.stages[s].devices):
            begin, end = plan.rows_of_replica(s, k)
            for mb in range(MICRO_BATCHES):
                got = exchange[(plan.notation, rank)][f"grad_in/mb{mb}/s{s + 1}_to_s{s}"]
                np.testing.assert_array_equal(got, -activation(mb, s)[begin:end])


@pytest.mark.slow
@pytest.mark.parametrize("replicas", PLANS, ids=lambda r: ":".join(map(str, r)))
def test_gradients_sum_over_the_stage_replicas_and_over_all_users_of_a_tied_variable(
    exchange, replicas
):
    plan = plan_of(replicas)
    tied_ranks = set(plan.stages[0].devices) | set(plan.stages[-1].devices)
    for s, stage in enumerate(plan.stages):
        for rank in stage.devices:
            rec = exchange[(plan.notation, rank)]
            assert rec["stage_grad_sum"] == [sum(r + 1.0 for r in stage.devices)] * 3
            if s in (0, plan.num_stages - 1):
                assert rec["tied_grad_sum"] == [sum(r + 1.0 for r in tied_ranks)] * 3
            assert rec["step_end"] == 1.0  # one loss share of 1, summed over all ranks


@pytest.mark.slow
def test_every_rank_registers_the_same_process_sets_in_the_same_order(exchange):
    for replicas in PLANS:
        notation = plan_of(replicas).notation
        orders = {tuple(map(tuple, exchange[(notation, r)]["set_order"])) for r in range(4)}
        assert len(orders) == 1, orders
    assert exchange[("3:1", 0)]["set_order"] == [[0, 1, 2], [0, 1, 2, 3], [0, 3], [1, 3], [2, 3]]


@pytest.mark.slow
def test_collectives_are_named_after_boundary_micro_batch_ranks_and_rows(exchange):
    names = exchange[("3:1", 3)]["collective_names"]
    assert "dapple/mb1/s0_to_s1/act/rank2_to_rank3_rows4_6" in names
    assert "dapple/mb0/s1_to_s0/grad/rank3_to_rank0_rows0_2" in names
    assert "dapple/step_end" in names
    assert exchange[("2:2", 0)]["collective_names"].count("dapple/allreduce/stage0/w_0") == 1


# ---- failures: every other rank exits non-zero, in bounded time, naming the missing rank --------
def _failure_run(how, victim):
    _skip_without_horovod()
    return runner.run(
        "comm_checks.py",
        4,
        ["fail", how, victim, 3],
        timeout_s=200,
        env={"DAPPLE_PEER_TIMEOUT_S": "10"},
    )


@pytest.mark.slow
def test_a_rank_that_hangs_makes_the_others_exit_naming_it_and_the_collectives():
    result = _failure_run("hang", 2)
    failed_at = result.first_time_of("FAIL victim rank 2 hang")
    assert failed_at is not None, result.output[-5000:]
    assert result.returncode != 0
    assert result.end_time - failed_at < 60, (result.end_time - failed_at, result.output[-5000:])
    for rank in (0, 1, 3):
        text = "\n".join(result.lines_of(rank))
        assert f"dapple: rank {rank}: missing rank 2: alive but has not entered step 3" in text, (
            text
        )
        assert f"exiting with status {rank_failures.EXIT_PEER_LOST}" in text
        # 75 from the watchdog, or the launcher's SIGTERM once the first rank exited
        assert f"Process {rank} exit with status code 0" not in result.output
    assert "dapple/mb0/s0_to_s1/act/rank0_to_rank2_rows0_3" in "\n".join(result.lines_of(0))


@pytest.mark.slow
def test_a_frozen_rank_makes_the_others_exit_naming_it():
    result = _failure_run("freeze", 1)
    failed_at = result.first_time_of("FAIL victim rank 1 freeze")
    assert failed_at is not None, result.output[-5000:]
    assert result.returncode != 0
    assert result.end_time - failed_at < 60, (result.end_time - failed_at, result.output[-5000:])
    for rank in (0, 2, 3):
        text = "\n".join(result.lines_of(rank))
        assert f"dapple: rank {rank}: missing rank 1: no heartbeat for" in text, text


# A killed rank (SIGKILL) is tested with the Trainer in test_trainer_multirank.py (killed mid-step on
# 2 and 4 ranks: every other rank names it; kill, then resume).
