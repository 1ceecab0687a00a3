"""interleaved-1f1b end to end in one process: several stages per device (or replica group),
stage s on group s mod P, each device running its group's list of the schedule library
(planner/schedules.py `interleaved_one_f_one_b`), and training equals single-device training.
The plan contract: tests at the end of this file; the executed order:
tests/test_trainer_order.py; reads before updates: tests/test_variable_update_order.py; 4 ranks:
tests/test_trainer_multirank.py."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import rewrite_models as models
from equivalence import assert_same_training
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.place import Slot
from graph_rewrite.schedule import plan_schedule
from graph_rewrite.template import build_template
from planner.plan_format import Plan, PlanError, Stage, even_plan
from planner.schedules import interleaved_one_f_one_b

v1 = tf.compat.v1
GLOBAL_BATCH = 24
STEPS = 3
SEED = 5
INTERLEAVED = "interleaved-1f1b"


def adam():
    return v1.train.AdamOptimizer(0.01)


def batches(case):
    rng = np.random.default_rng(17)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def single_device_run(model):
    case = models.ALL[model]
    trainer = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, adam, GLOBAL_BATCH, seed=SEED, optimize_graph=False
    )
    try:
        losses = [trainer.train_step(b) for b in batches(case)]
        return losses, trainer.get_weights()
    finally:
        trainer.close()


def interleaved_plan(model, replicas, chunks, num_micro_batches):
    """`replicas`: replicas per device group (DAPPLE notation of the groups)."""
    case = models.ALL[model]
    layers = build_template(case.model_fn, case.feature_spec).layers
    return even_plan(layers, replicas, GLOBAL_BATCH, num_micro_batches, INTERLEAVED, chunks)


def interleaved_trainer(model, replicas, chunks, num_micro_batches, **options):
    case = models.ALL[model]
    options.setdefault("optimize_graph", False)
    return Trainer(
        case.model_fn,
        case.feature_spec,
        adam,
        interleaved_plan(model, replicas, chunks, num_micro_batches),
        GLOBAL_BATCH,
        seed=SEED,
        **options,
    )


def assert_trains_like_single_device(trainer, model):
    expected_losses, expected = single_device_run(model)
    losses = [trainer.train_step(b) for b in batches(models.ALL[model])]
    assert_same_training(losses, trainer.get_weights(), expected_losses, expected)


CASES = [
    # 4 stages on 2 devices: the tied embedding on stages 0 (device 0) and 3 (device 1)
    ("transformer", [1, 1], 2, 4),
    ("transformer", [1, 1], 2, 8),
    # 4 stages on 2 replica groups: stages 0, 2 on devices [0, 2], stages 1, 3 on [1, 3]
    ("transformer", [2, 2], 2, 4),
    # all 4 stages on one group of 2 devices: the tied embedding's stages on the same devices
    ("transformer", [2], 4, 4),
    ("skip", [1, 1], 2, 4),  # skip connection from stage 0 (device 0) to stage 3 (device 1)
    ("skip", [2, 2], 2, 4),
    ("rnn", [1, 1], 2, 4),  # while loops
    ("rnn", [2, 2], 2, 4),
]


@pytest.mark.parametrize(
    "model,replicas,chunks,num_micro_batches",
    CASES,
    ids=[f"{m}-{':'.join(map(str, r))}-v{v}-M{n}" for m, r, v, n in CASES],
)
def test_interleaved_1f1b_trains_like_single_device(model, replicas, chunks, num_micro_batches):
    trainer = interleaved_trainer(model, replicas, chunks, num_micro_batches)
    try:
        groups = trainer.plan.device_groups
        assert len(groups) == len(replicas) and trainer.plan.chunks == chunks
        assert_trains_like_single_device(trainer, model)
    finally:
        trainer.close()


def test_interleaved_1f1b_with_grappler_on_trains_like_single_device():
    trainer = interleaved_trainer("transformer", [2, 2], 2, 4, optimize_graph=True)
    try:
        assert_trains_like_single_device(trainer, "transformer")
    finally:
        trainer.close()


def test_interleaved_1f1b_with_stacked_weight_gradients_trains_like_single_device():
    """Each slot's stacked weight-gradient call waits for the slot's last backward only, not
    for its device's chain: interleaving changes nothing for it."""
    trainer = interleaved_trainer("transformer", [2, 2], 2, 4, stack_weight_gradients=True)
    try:
        assert any(s.weight_gradient_function for s in trainer.rewritten.stage_graphs)
        assert_trains_like_single_device(trainer, "transformer")
    finally:
        trainer.close()


def ancestors(op: tf.Operation) -> set:
    """Every op `op` waits for: its inputs' and control inputs' ops, transitively."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_each_device_chains_the_actions_of_its_groups_list():
    """Every start op of action k+1 of a group's list, on each device of the group, waits (a
    control edge, directly or through the ops it reads) for the end op of action k on that
    device, also where the two actions belong to different stages; and the slots of a device
    share its device string."""
    trainer = interleaved_trainer("transformer", [2, 2], 2, 4)
    try:
        rewritten, plan = trainer.rewritten, trainer.plan
        assert rewritten.schedule == interleaved_one_f_one_b(4, 4, 2)
        crossings = 0
        for g, actions in enumerate(rewritten.schedule):
            for replica, device_id in enumerate(plan.device_groups[g]):
                slots = [Slot(a.stage, replica) for a in actions]
                devices = {rewritten.device_of_slot[s] for s in slots}
                assert len(devices) == 1 and devices.pop().endswith(f"CPU:{device_id}")
                for (prev_slot, prev), (slot, action) in zip(
                    zip(slots, actions), zip(slots[1:], actions[1:])
                ):
                    end = rewritten.end_ops[(prev_slot, prev)]
                    starts = rewritten.start_ops[(slot, action)]
                    assert starts, (slot, action)
                    for op in starts:
                        assert end in ancestors(op), (device_id, prev, action, op.name)
                    crossings += prev.stage != action.stage
        assert crossings > 0
    finally:
        trainer.close()


def test_the_rewriter_builds_the_librarys_lists_per_device_group():
    plan = interleaved_plan("transformer", [2, 2], 2, 4)
    built = plan_schedule(plan)
    assert built.lists == interleaved_one_f_one_b(4, 4, 2)
    assert plan.device_groups == ((0, 1), (2, 3))
    assert [s.devices for s in plan.stages] == [(0, 1), (2, 3), (0, 1), (2, 3)]


# ---- the plan contract --------------------------------------------------------------------------
def plan_on(devices, num_micro_batches=4, schedule=INTERLEAVED):
    stages = tuple(Stage((f"layer_{s}",), tuple(d)) for s, d in enumerate(devices))
    return Plan(8 * num_micro_batches, num_micro_batches, schedule, stages)


def test_an_interleaved_plan_derives_its_groups_and_chunks():
    plan = plan_on([[0, 2], [1, 3], [0, 2], [1, 3]])
    assert plan.device_groups == ((0, 2), (1, 3))
    assert plan.chunks == 2
    assert plan.devices == (0, 2, 1, 3) and plan.num_devices == 4
    one_stage_per_group = plan_on([[0], [1]], schedule="1f1b")
    assert one_stage_per_group.chunks == 1


def test_an_interleaved_plan_round_trips_through_json():
    plan = plan_on([[0], [1], [0], [1]])
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_other_schedules_keep_one_stage_replica_per_device(schedule):
    with pytest.raises(PlanError, match="a device holds exactly one stage replica"):
        plan_on([[0], [1], [0], [1]], schedule=schedule)


def test_groups_holding_unequal_numbers_of_stages_are_refused():
    with pytest.raises(PlanError, match="3 stages do not divide over the 2 device groups"):
        plan_on([[0], [1], [0]])


def test_stage_s_must_be_on_group_s_mod_p():
    with pytest.raises(PlanError, match=r"stage 2 must be on \[0\], the plan puts it on \[1\]"):
        plan_on([[0], [1], [1], [0]])


def test_a_device_in_two_groups_is_refused():
    with pytest.raises(PlanError, match=r"device 0 is in device groups \[0, 1\] and \[2, 0\]"):
        plan_on([[0, 1], [2, 0], [0, 1], [2, 0]])


def test_the_micro_batch_count_must_be_a_multiple_of_the_group_count():
    with pytest.raises(PlanError, match="on 2 device groups needs a multiple of 2 micro-batches"):
        plan_on([[0], [1], [0], [1]], num_micro_batches=3)


def test_the_planner_plans_an_interleaved_plan_that_the_plan_contract_accepts():
    """Asked for interleaved-1f1b, the search re-cuts its layouts into v stages per group; the
    plan it writes passes the contract (stage s on group s mod P) and says v."""
    import planner
    from planner.profile import LayerCost, Profile

    profile = Profile.chain([LayerCost(f"l{i}", 10.0, 20.0, 1e6, 1e8) for i in range(8)], 8)
    plan = planner.plan(profile, [2], 64, micro_batch_size=8, schedule=INTERLEAVED)
    assert plan.schedule == INTERLEAVED and plan.chunks > 1
    assert plan.device_groups == ((0,), (1,))
    assert all(st.devices == plan.device_groups[s % 2] for s, st in enumerate(plan.stages))
    assert plan.predicted["schedule_choice"]["chosen"] == f"{INTERLEAVED} v={plan.chunks}"
    assert Plan.from_dict(plan.to_dict()) == plan


def test_the_timeline_reads_each_devices_interleaved_actions_in_its_groups_order():
    """dapple_tf.timeline on a traced step: each device's F and B tasks, of both its stages,
    started in its group's list order."""
    from dapple_tf import timeline

    trainer = interleaved_trainer("mlp", [1, 1], 2, 4)
    try:
        batch = models.MLP.make_batch(np.random.default_rng(0), GLOBAL_BATCH)
        trainer.train_step(batch)
        _, metadata = trainer.traced_step(batch)
        order = timeline.compute_order(timeline.tasks_from_step_stats(metadata.step_stats))
        lists = trainer.rewritten.schedule
        assert len(order) == 2
        for device, actions in order.items():
            group = int(device.rsplit(":", 1)[1])
            assert actions == lists[group], device
    finally:
        trainer.close()


def test_a_device_twice_in_one_group_is_refused():
    with pytest.raises(PlanError, match=r"device 0 appears twice in device group \[0, 0\]"):
        plan_on([[0, 0], [1, 2], [0, 0], [1, 2]])


@pytest.mark.parametrize("fused", [False, True], ids=["moments", "fused"])
def test_batch_norm_under_interleaved_1f1b_trains_like_its_single_device_reference(fused):
    """Each micro-batch clone normalises its own rows, the moving statistics come from the
    whole global batch (tests/test_batch_norm.py's reference), with the batch-norm layers'
    stages 0, 1, 2 on two replica groups."""
    import batch_norm_model as bn

    gbs = 32
    plan = even_plan(bn.LAYERS, [2, 2], gbs, 4, INTERLEAVED, chunks=2)
    rng = np.random.default_rng(3)
    data = [bn.make_batch(rng, gbs) for _ in range(STEPS)]

    def run(trainer):
        try:
            initial = trainer.get_weights()
            return initial, [trainer.train_step(b) for b in data], trainer.get_weights()
        finally:
            trainer.close()

    chunks = bn.ghost_chunks(plan)
    assert chunks == (8, 8, 8)
    expected = run(
        SingleDeviceTrainer(
            bn.model(chunks, fused), bn.SPEC, adam, gbs, seed=SEED, optimize_graph=False
        )
    )
    got = run(
        Trainer(bn.model(fused=fused), bn.SPEC, adam, plan, gbs, seed=SEED, optimize_graph=False)
    )
    for name, value in expected[0].items():
        np.testing.assert_array_equal(got[0][name], value, err_msg=f"initial {name}")
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)
    assert sorted(got[2]) == sorted(expected[2])
    assert any("moving_mean" in name for name in expected[2])
    for name, value in expected[2].items():
        np.testing.assert_allclose(got[2][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
