"""Runs the multi-rank communication of dapple_tf (comm, process_sets, boundary_exchange,
gradient_reduction, rank_failures) under horovodrun (4 ranks, graph mode).

comm_checks.py exchange
    For the plans 3:1, 1:3, 2:2 and 1:1:1:1 (micro-batch 6 rows x 2 features, 2 micro-batches):
    every boundary's activations forward and activation gradients backward through
    send_rows/recv_rows, each stage's gradient allreduce, a tied variable of stages 0 and the
    last one, and step_end; two steps each. Each rank prints 'COMM {json}' per plan.
comm_checks.py fail <hang|freeze|kill> <victim rank> <step>
    Plan 2:2 in a loop of steps; at <step> the victim sleeps (hang: alive, Horovod still
    running), stops itself with SIGSTOP (freeze) or SIGKILL (kill). The others must exit.
"""

import json
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf

from dapple_tf import comm, rank_failures
from dapple_tf.boundary_exchange import BoundaryExchange, boundary_transfers
from dapple_tf.gradient_reduction import GradientReduction
from dapple_tf.process_sets import ProcessSets
from planner.plan_format import Plan, Stage

ROWS, FEATURES, MICRO_BATCHES = 6, 2, 2


def make_plan(replicas):
    stages, device = [], 0
    for i, r in enumerate(replicas):
        stages.append(Stage((f"layer_{i}",), tuple(range(device, device + r))))
        device += r
    return Plan(ROWS * MICRO_BATCHES, MICRO_BATCHES, "gpipe", tuple(stages))


def activation(mb, boundary):
    """The full activation of micro-batch mb at boundary s<boundary>->s<boundary+1>."""
    rows = np.arange(ROWS, dtype=np.float32)[:, None]
    return 1000 * boundary + 100 * mb + rows + np.array([0.0, 0.5], np.float32)


def my_stage(plan, rank):
    for s, stage in enumerate(plan.stages):
        if rank in stage.devices:
            return s, stage.devices.index(rank)
    raise AssertionError(rank)


def build_exchange(plan, boundary, reduction, rank):
    """Ops of one step; returns fetches keyed by what they carry."""
    s, k = my_stage(plan, rank)
    fetch = {}
    deps = []
    for mb in range(MICRO_BATCHES):
        if s + 1 < plan.num_stages:  # send my rows forward, receive their gradients back
            transfers = boundary_transfers(plan, s, s + 1)
            begin, end = plan.rows_of_replica(s, k)
            deps += boundary.send_rows(
                tf.constant(activation(mb, s)[begin:end]), transfers, mb, s, s + 1
            )
            fetch[f"grad_in/mb{mb}/s{s + 1}_to_s{s}"] = boundary.recv_rows(
                [FEATURES], tf.float32, transfers, mb, s, s + 1, backward=True
            )
        if s > 0:  # receive rows from the previous stage, send back -rows as their gradient
            transfers = boundary_transfers(plan, s - 1, s)
            got = boundary.recv_rows([FEATURES], tf.float32, transfers, mb, s - 1, s)
            fetch[f"act_in/mb{mb}/s{s - 1}_to_s{s}"] = got
            deps += boundary.send_rows(-got, transfers, mb, s - 1, s, backward=True)
    grad = tf.constant(np.full([3], rank + 1.0, np.float32))
    fetch["stage_grad_sum"] = reduction.allreduce_gradient(
        grad, f"stage{s}/w:0", plan.stages[s].devices
    )
    if s in (0, plan.num_stages - 1):
        tied_ranks = plan.stages[0].devices + plan.stages[-1].devices
        fetch["tied_grad_sum"] = reduction.allreduce_gradient(grad, "tied/embedding:0", tied_ranks)
    loss_share = tf.constant(float(rank == plan.stages[-1].devices[0]))
    fetch["step_end"] = reduction.step_end(loss_share, deps + list(fetch.values()))
    return fetch


def exchange(info):
    for replicas in ([3, 1], [1, 3], [2, 2], [1, 1, 1, 1]):
        plan = make_plan(replicas)
        tied = [(0, plan.num_stages - 1)]
        with tf.Graph().as_default():
            sets = ProcessSets(plan, tied)
            log = rank_failures.CollectiveLog()
            fetch = build_exchange(
                plan,
                BoundaryExchange(sets, info.rank, log),
                GradientReduction(sets, log),
                info.rank,
            )
            names = sorted(
                n.name
                for n in tf.compat.v1.get_default_graph().get_operations()
                if n.type.startswith("Horovod")
            )
            with tf.compat.v1.Session(config=comm.session_config()) as session:
                for step in range(2):
                    got = session.run(fetch)
        record = {
            "plan": plan.notation,
            "rank": info.rank,
            "set_order": [list(g) for g in sets.order],
            "collective_names": names,
            **{key: np.asarray(v).tolist() for key, v in got.items()},
        }
        print("COMM " + json.dumps(record), flush=True)


def fail(info, how, victim, at_step):
    plan = make_plan([2, 2])
    sets = ProcessSets(plan, [(0, 1)])
    log = rank_failures.CollectiveLog()
    boundary, reduction = BoundaryExchange(sets, info.rank, log), GradientReduction(sets, log)
    watchdog = rank_failures.Watchdog(
        info.rank, info.size, rank_failures.shared_heartbeat_dir()[0], log, interval_s=0.5
    ).start()
    fetch = build_exchange(plan, boundary, reduction, info.rank)
    session = tf.compat.v1.Session(config=comm.session_config())
    for step in range(1000):
        if info.rank == victim and step == at_step:
            print(
                f"FAIL victim rank {info.rank} {how} at step {step} t={time.time():.2f}", flush=True
            )
            if how == "hang":
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGSTOP if how == "freeze" else signal.SIGKILL)
        watchdog.step_begin(step)
        session.run(fetch)
        watchdog.step_end(step)
        time.sleep(0.05)
    print("FAIL not reached", flush=True)


def main():
    tf.compat.v1.disable_eager_execution()
    info = comm.init()
    if sys.argv[1] == "exchange":
        exchange(info)
    else:
        fail(info, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
