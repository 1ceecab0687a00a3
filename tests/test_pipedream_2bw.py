"""Schedule pipedream-2bw (graph_rewrite/weight_versions.py, docs/async.md): the pipelined
trainer equals the update rule's plain reference simulation (tests/async_reference.py) in
losses and weights, both weight versions and Adam's state included; its first step equals
synchronous training, its later steps do not; it is refused unless the user opts in; a resumed
run equals an uninterrupted one; its checkpoints restore into a synchronous trainer."""

import functools

import numpy as np
import pytest
import tensorflow as tf

import batch_norm_model
import rewrite_models as models
from async_reference import TwoBWReference
from dapple_tf.trainer import SingleDeviceTrainer, Trainer
from graph_rewrite.template import build_template
from graph_rewrite.weight_versions import previous_weights_name
from planner.plan_format import even_plan
from planner.schedules import ScheduleError

v1 = tf.compat.v1
GLOBAL_BATCH = 24
STEPS = 4
SEED = 5
SCHEDULE = "pipedream-2bw"


def adam():
    return v1.train.AdamOptimizer(0.01)


def batches(case, steps=STEPS):
    rng = np.random.default_rng(29)
    return [case.make_batch(rng, GLOBAL_BATCH) for _ in range(steps)]


@functools.lru_cache(maxsize=None)
def reference_run(model):
    """(losses, final weights) of the 2BW reference simulation."""
    case = models.ALL[model]
    reference = TwoBWReference(case.model_fn, case.feature_spec, adam, SEED)
    try:
        losses = [reference.train_step(b) for b in batches(case)]
        return losses, reference.get_weights()
    finally:
        reference.close()


@functools.lru_cache(maxsize=None)
def synchronous_run(model):
    """(losses, weights after the first step, final weights) of single-device training."""
    case = models.ALL[model]
    trainer = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, adam, GLOBAL_BATCH, seed=SEED, optimize_graph=False
    )
    try:
        data = batches(case)
        losses = [trainer.train_step(data[0])]
        after_first = trainer.get_weights()
        losses += [trainer.train_step(b) for b in data[1:]]
        return losses, after_first, trainer.get_weights()
    finally:
        trainer.close()


def two_bw_trainer(model, replicas, num_micro_batches=4, **options):
    case = models.ALL[model]
    layers = build_template(case.model_fn, case.feature_spec).layers
    plan = even_plan(layers, replicas, GLOBAL_BATCH, num_micro_batches, SCHEDULE)
    options.setdefault("optimize_graph", False)
    options.setdefault("allow_async", True)
    options.setdefault("seed", SEED)
    return Trainer(case.model_fn, case.feature_spec, adam, plan, GLOBAL_BATCH, **options)


def assert_weights_close(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def assert_weights_differ(got, expected):
    differing = [n for n in expected if not np.allclose(got[n], expected[n], rtol=1e-4)]
    assert differing, "2BW training equals synchronous training: the test cannot tell them apart"


CASES = [
    ("transformer", [1, 1]),  # tied embedding: stages 0 and 1
    ("transformer", [2, 2]),  # tied embedding, replicas
    ("skip", [1, 1]),
    ("skip", [2, 2]),
    ("rnn", [1, 1]),  # while loops
    ("rnn", [2, 2]),
    ("sparse", [1, 1]),  # IndexedSlices embedding gradient
]


@pytest.mark.parametrize(
    "model,replicas", CASES, ids=[f"{m}-{':'.join(map(str, r))}" for m, r in CASES]
)
def test_2bw_trains_like_its_reference_simulation(model, replicas):
    expected_losses, expected = reference_run(model)
    sync_losses, sync_after_first, sync_final = synchronous_run(model)
    trainer = two_bw_trainer(model, replicas)
    try:
        data = batches(models.ALL[model])
        losses = [trainer.train_step(data[0])]
        after_first = trainer.get_weights()
        losses += [trainer.train_step(b) for b in data[1:]]
        final = trainer.get_weights()
    finally:
        trainer.close()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert_weights_close(final, expected)
    # step 0 computes its gradient at W(-1) = W(0): synchronous training's first step
    np.testing.assert_allclose(losses[0], sync_losses[0], rtol=1e-5, atol=1e-6)
    assert_weights_close(
        {n: v for n, v in after_first.items() if n in sync_after_first}, sync_after_first
    )
    # later steps use the one-step-stale weights: not synchronous training
    for step in range(1, STEPS):
        assert not np.isclose(losses[step], sync_losses[step], rtol=1e-5, atol=1e-6), step
    assert_weights_differ(final, sync_final)


@pytest.mark.parametrize(
    "options",
    [{"optimize_graph": True}, {"stack_weight_gradients": True}],
    ids=["grappler", "stacked-weight-gradients"],
)
def test_2bw_with_grappler_or_stacked_gradients_trains_like_its_reference_simulation(options):
    """Grappler (the default `optimize_graph=True`) keeps the copy between the reads of the
    previous weights and the update; stacked weight-gradient calls read the previous weights
    too."""
    expected_losses, expected = reference_run("transformer")
    trainer = two_bw_trainer("transformer", [2, 2], **options)
    try:
        losses = [trainer.train_step(b) for b in batches(models.TRANSFORMER)]
        final = trainer.get_weights()
    finally:
        trainer.close()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert_weights_close(final, expected)


def test_2bw_with_clip_norm_clips_the_stale_gradient():
    case = models.TRANSFORMER
    clip_norm = 0.05  # below the gradient norm of the first steps
    reference = TwoBWReference(case.model_fn, case.feature_spec, adam, SEED, clip_norm=clip_norm)
    try:
        expected_losses = [reference.train_step(b) for b in batches(case)]
        expected = reference.get_weights()
    finally:
        reference.close()
    unclipped = reference_run("transformer")[1]
    assert_weights_differ(expected, unclipped)
    trainer = two_bw_trainer("transformer", [2, 2], clip_norm=clip_norm)
    try:
        losses = [trainer.train_step(b) for b in batches(case)]
        final = trainer.get_weights()
    finally:
        trainer.close()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert_weights_close(final, expected)


def test_the_previous_weights_are_one_variable_per_weight_even_when_tied():
    trainer = two_bw_trainer("transformer", [1, 1])
    try:
        previous = trainer.rewritten.previous_weights
        trainable = {n for n, info in trainer.template.variables.items() if info.trainable}
        assert set(previous) == trainable
        for name, variable in previous.items():
            assert variable.op.name == previous_weights_name(name)
            assert variable.device == trainer.rewritten.variables[name].device
        tied = [
            v
            for v in trainable
            if all(v in stage.spec.variables for stage in trainer.rewritten.stage_graphs)
        ]
        assert tied, "the transformer's embedding should be read by both stages"
        handles = [
            op.name
            for op in trainer.graph.get_operations()
            if op.type == "VarHandleOp" and op.name.startswith(previous_weights_name(""))
        ]
        assert sorted(handles) == sorted(previous_weights_name(v) for v in trainable)
    finally:
        trainer.close()


def test_an_async_schedule_needs_allow_async():
    with pytest.raises(ScheduleError, match="allow_async=True"):
        two_bw_trainer("mlp", [1, 1], allow_async=False)


def test_2bw_refuses_moving_statistics():
    layers = batch_norm_model.LAYERS
    plan = even_plan(layers, [1, 1], GLOBAL_BATCH, 2, SCHEDULE)
    with pytest.raises(ValueError, match="moving statistics"):
        Trainer(
            batch_norm_model.model(),
            batch_norm_model.SPEC,
            adam,
            plan,
            GLOBAL_BATCH,
            allow_async=True,
            optimize_graph=False,
        )


def test_2bw_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """3 steps, save, a new trainer (other initial values: another seed) restores, 3 more
    steps: the losses and every variable (both weight versions, Adam's slots and powers,
    global_step) equal 6 uninterrupted steps."""
    case = models.TRANSFORMER
    data = batches(case, 6)
    trainer = two_bw_trainer("transformer", [2, 2])
    try:
        uninterrupted = [trainer.train_step(b) for b in data]
        expected = trainer.get_weights()
    finally:
        trainer.close()
    first = two_bw_trainer("transformer", [2, 2])
    try:
        losses = [first.train_step(b) for b in data[:3]]
        path = first.save(tmp_path / "ckpt")
    finally:
        first.close()
    resumed = two_bw_trainer("transformer", [2, 2], seed=SEED + 1)
    try:
        resumed.restore(path)
        losses += [resumed.train_step(b) for b in data[3:]]
        got = resumed.get_weights()
    finally:
        resumed.close()
    np.testing.assert_allclose(losses, uninterrupted, rtol=1e-6, atol=1e-7)
    assert_weights_close(got, expected)
    # the previous weights matter: they differ from the newest weights at the checkpoint
    assert_weights_differ(
        {n: got[previous_weights_name(n)] for n in case_trainable_names(got)},
        {n: got[n] for n in case_trainable_names(got)},
    )


def case_trainable_names(weights):
    prefix = previous_weights_name("")
    return [n[len(prefix) :] for n in weights if n.startswith(prefix)]


def test_a_2bw_checkpoint_restores_the_newest_weights_into_a_synchronous_trainer(tmp_path):
    case = models.TRANSFORMER
    trainer = two_bw_trainer("transformer", [1, 1])
    try:
        for b in batches(case, 2):
            trainer.train_step(b)
        saved = trainer.get_weights()
        path = trainer.save(tmp_path / "ckpt")
    finally:
        trainer.close()
    single = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, adam, GLOBAL_BATCH, seed=SEED + 1, optimize_graph=False
    )
    try:
        with pytest.warns(UserWarning, match="asynchronous schedule"):
            single.restore(path)
        restored = single.get_weights()
    finally:
        single.close()
    assert sorted(restored) == sorted(n for n in saved if not n.startswith("dapple/"))
    for name, value in restored.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_a_synchronous_checkpoint_starts_a_2bw_trainer_as_at_step_0(tmp_path):
    """A checkpoint without previous weights (a synchronous run's) restores into a 2BW
    trainer with a warning: the previous weights start as the restored weights, W(-1) = W(0),
    so the next step equals a synchronous step from the checkpoint."""
    case = models.TRANSFORMER
    data = batches(case, 2)
    single = SingleDeviceTrainer(
        case.model_fn, case.feature_spec, adam, GLOBAL_BATCH, seed=SEED, optimize_graph=False
    )
    try:
        single.train_step(data[0])
        path = single.save(tmp_path / "ckpt")
        saved = single.get_weights()
        expected_loss = single.train_step(data[1])
        expected = single.get_weights()
    finally:
        single.close()
    trainer = two_bw_trainer("transformer", [1, 1], seed=SEED + 1)
    try:
        with pytest.warns(UserWarning, match="one version of the weights"):
            trainer.restore(path)
        restored = trainer.get_weights()
        for name in case_trainable_names(restored):
            np.testing.assert_array_equal(restored[previous_weights_name(name)], saved[name])
        loss = trainer.train_step(data[1])
        got = trainer.get_weights()
    finally:
        trainer.close()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_weights_close({n: v for n, v in got.items() if n in expected}, expected)


def test_train_py_runs_and_resumes_2bw_only_with_allow_async(tmp_path):
    """The training loop (train.py's runner): --schedule pipedream-2bw --allow_async trains,
    checkpoints both weight versions and resumes; its plan file without --allow_async is
    refused naming the flag."""
    from dapple_tf import runner

    def config(steps, **fields):
        fields.setdefault("dapple_plan", "1:1")
        return runner.TrainingConfig(
            model="gnmt",
            preset="tiny",
            steps=steps,
            model_dir=str(tmp_path),
            num_devices=2,
            save_every=2,
            **fields,
        )

    first = runner.run_training(config(2, schedule=SCHEDULE, allow_async=True))
    assert first["global_step"] == 2 and first["plan"].schedule == SCHEDULE
    saved = {name for name, _ in tf.train.list_variables(str(tmp_path / "ckpt-2"))}
    assert previous_weights_name("encoder_embedding/embedding") in saved, sorted(saved)[:10]
    resumed = runner.run_training(config(3, schedule=SCHEDULE, allow_async=True))
    assert resumed["steps_run"] == 1 and resumed["global_step"] == 3
    with pytest.raises(runner.ConfigError, match="pass --allow_async"):
        runner.run_training(config(4, dapple_plan=str(tmp_path / "plan.json")))


def test_set_weights_without_the_previous_weights_starts_the_pair_over():
    """Weights set without their previous version (e.g. from a synchronous run) start the
    pair as at step 0, W(-1) = W(0); given explicitly, the previous version is kept."""
    case = models.MLP
    trainer = two_bw_trainer("mlp", [1, 1])
    try:
        trainer.train_step(batches(case, 1)[0])
        before = trainer.get_weights()
        new = {"layer_0/dense/kernel": before["layer_0/dense/kernel"] + 1.0}
        trainer.set_weights(new)
        got = trainer.get_weights()
        np.testing.assert_array_equal(
            got[previous_weights_name("layer_0/dense/kernel")], new["layer_0/dense/kernel"]
        )
        explicit = before[previous_weights_name("layer_0/dense/kernel")] - 1.0
        trainer.set_weights(
            {
                "layer_0/dense/kernel": new["layer_0/dense/kernel"],
                previous_weights_name("layer_0/dense/kernel"): explicit,
            }
        )
        got = trainer.get_weights()
        np.testing.assert_array_equal(got[previous_weights_name("layer_0/dense/kernel")], explicit)
        np.testing.assert_array_equal(got["layer_1/dense/kernel"], before["layer_1/dense/kernel"])
    finally:
        trainer.close()
