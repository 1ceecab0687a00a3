"""Cost model "runtime" (issue #14): fixed + per-row costs, the shared-cores rule, fewer devices,
bad profiles refused, and the published planner's model left as it was."""

import math
import os

import numpy as np
import pytest

import planner
from planner.cluster import Cluster
from planner.graph_txt import format_graph_txt, load_profile, parse_graph_txt
from planner.plan_format import even_plan
from planner.profile import MEASURED_FIELDS, LayerCost, Profile, ProfileError
from planner.runtime_cost import RuntimeModel

DATA = os.path.join(os.path.dirname(__file__), "data", "profiles", "dapple")


def fitted_layer(name, fixed_ms=1.0, per_row_ms=0.05, **extra):
    """A layer whose forward costs fixed + per_row x rows ms and whose backward costs twice that."""
    fields = dict(
        forward_fixed_ms=fixed_ms,
        forward_per_row_ms=per_row_ms,
        backward_fixed_ms=2 * fixed_ms,
        backward_per_row_ms=2 * per_row_ms,
        saved_bytes=4e4,
        optimizer_slot_bytes=2e5,
        apply_ms=0.01,
    )
    fields.update(extra)
    return LayerCost(
        name, fixed_ms + 16 * per_row_ms, 2 * (fixed_ms + 16 * per_row_ms), 1e4, 1e5, **fields
    )


def chain(n=6, **kw):
    return Profile.chain([fitted_layer(f"l{i}", **kw) for i in range(n)], batch_size=16)


def one_device_s(profile, gbs):
    """One device, one micro-batch of all rows, by hand: compute + the optimizer's update."""
    return (
        sum(
            l.forward_fixed_ms
            + l.forward_per_row_ms * gbs
            + l.backward_fixed_ms
            + l.backward_per_row_ms * gbs
            + (l.apply_ms or 0.0)
            for l in profile.layers
        )
        / 1e3
    )


# ---- the fit ---------------------------------------------------------------------------------
def test_fit_recovers_the_fixed_and_per_row_cost_of_a_synthetic_layer():
    from dapple_tf.profiler import fit_fixed_and_per_row

    rows = [1, 2, 4, 8, 16]
    fixed, per_row = fit_fixed_and_per_row(rows, [0.75 + 0.125 * r for r in rows])
    assert fixed == pytest.approx(0.75)
    assert per_row == pytest.approx(0.125)


def test_fit_never_returns_a_negative_cost():
    from dapple_tf.profiler import fit_fixed_and_per_row

    fixed, per_row = fit_fixed_and_per_row([2, 16], [0.1, 3.3])  # intercept would be < 0
    assert fixed == 0.0 and per_row == pytest.approx((2 * 0.1 + 16 * 3.3) / (4 + 256))
    fixed, per_row = fit_fixed_and_per_row([2, 16], [1.0, 0.9])  # slope would be < 0
    assert (fixed, per_row) == (pytest.approx(0.95), 0.0)
    with pytest.raises(ProfileError, match="two or more distinct batch sizes"):
        fit_fixed_and_per_row([8, 8], [1.0, 1.1])


def test_small_micro_batches_pay_the_fixed_cost_once_each():
    profile = chain(n=2, fixed_ms=1.0, per_row_ms=0.0)
    model = RuntimeModel(profile, Cluster.from_seps([1], accumulate_bandwidth=1e30), 16)
    one = model.evaluate([1], [(0,)], 16, "1f1b").step_time_s
    four = model.evaluate([1], [(0,)], 4, "1f1b").step_time_s
    # 2 layers x (1 + 2) ms fixed per micro-batch, plus the update once per step
    assert one == pytest.approx(2 * 3e-3 + 2 * 1e-5)
    assert four == pytest.approx(4 * 2 * 3e-3 + 2 * 1e-5)


def test_the_one_device_step_is_the_fit_at_the_whole_batch_plus_the_update():
    profile = chain()
    assert RuntimeModel(profile, Cluster.from_seps([4]), 32).single_device_s == pytest.approx(
        one_device_s(profile, 32)
    )


# ---- the shared-cores rule -------------------------------------------------------------------
def test_logical_devices_on_one_cpu_are_not_independent():
    profile = chain(fixed_ms=0.1, per_row_ms=0.5)
    independent = RuntimeModel(profile, Cluster.from_seps([4]), 16)
    shared = RuntimeModel(profile, Cluster.from_seps([4], devices_per_processor=4), 16)
    layout = [(0,), (1,)]
    # two stages in parallel on two processors beat one device ...
    assert independent.evaluate([2, 5], layout, 4, "1f1b").step_time_s < independent.single_device_s
    # ... but on one processor the step is at least both devices' work one after the other
    ev = shared.evaluate([2, 5], layout, 4, "1f1b")
    work = 4 * sum(ev.forward_s) + 4 * sum(ev.backward_s) + sum(ev.allreduce_s)
    assert ev.step_time_s >= work * (1 - 1e-12)
    assert ev.step_time_s > shared.single_device_s


def test_on_one_shared_processor_the_planner_uses_one_device_and_one_micro_batch():
    profile = chain(fixed_ms=0.2, per_row_ms=0.2)
    plan = planner.plan(
        profile, Cluster.from_seps([4], devices_per_processor=4), 16, cost_model="runtime"
    )
    assert (plan.notation, plan.num_micro_batches) == ("DP1", 1)
    assert plan.predicted["step_time_s"] == pytest.approx(one_device_s(profile, 16))


def test_with_independent_devices_the_planner_still_uses_them():
    profile = chain(fixed_ms=0.01, per_row_ms=1.0)
    plan = planner.plan(profile, Cluster.from_seps([4]), 16, cost_model="runtime")
    assert plan.num_devices == 4
    assert plan.predicted["step_time_s"] < one_device_s(profile, 16) / 2


def test_large_fixed_costs_make_the_planner_choose_one_micro_batch():
    profile = chain(fixed_ms=5.0, per_row_ms=0.01)
    plan = planner.plan(profile, Cluster.from_seps([4]), 16, cost_model="runtime")
    assert plan.num_micro_batches == 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("devices, shared", [(4, True), (4, False), (16, False), (16, True)])
def test_auto_never_picks_a_plan_predicted_slower_than_one_device(seed, devices, shared):
    rng = np.random.default_rng(seed)
    layers = [
        fitted_layer(
            f"l{i}",
            fixed_ms=float(rng.uniform(0, 3)),
            per_row_ms=float(rng.uniform(0, 0.3)),
            saved_bytes=float(rng.uniform(0, 1e6)),
        )
        for i in range(int(rng.integers(3, 40)))
    ]
    profile = Profile.chain(layers, batch_size=16)
    cluster = Cluster.from_seps(
        [devices],
        devices_per_processor=devices if shared else 1,
        transfer_latency_s=float(rng.uniform(0, 1e-3)),
        intra_host_bandwidth=float(rng.uniform(1e6, 1e10)),
    )
    plan = planner.plan(profile, cluster, 32, cost_model="runtime")
    one = RuntimeModel(profile, cluster, 32).single_device_s
    assert plan.predicted["step_time_s"] <= one * (1 + 1e-9)


def test_memory_counts_every_tensor_kept_for_the_backward_not_only_the_output():
    profile = chain(n=2, saved_bytes=5e5)
    model = RuntimeModel(profile, Cluster.from_seps([2]), 16)
    ev = model.evaluate([1], [(0,)], 16, "1f1b")
    # weights + gradient sum + slots + saved bytes of one 16-row micro-batch (boundary: none)
    assert ev.peak_memory_bytes[0] == pytest.approx(2 * (2 * 1e5 + 2e5 + 5e5))


# ---- bad profiles ----------------------------------------------------------------------------
@pytest.mark.parametrize("field", MEASURED_FIELDS)
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_bad_value_is_refused_naming_the_layer_and_the_field(field, value):
    good = chain(n=3).to_dict()
    good["layers"][1][field] = value
    with pytest.raises(ProfileError, match=rf"layer 'l1' field {field} must be a finite number"):
        Profile.from_dict(good, "bad.json")
    layers = list(chain(n=3).layers)
    layers[1] = LayerCost(**{**layers[1].__dict__, field: value})
    with pytest.raises(ProfileError, match=rf"layer 'l1' field {field}"):
        planner.plan(Profile.chain(layers, 16), [4], 16, cost_model="runtime")


def test_a_negative_time_in_graph_txt_is_refused_naming_the_layer():
    text = (
        "1 -- Input -- forward_compute_time=0.0, backward_compute_time=0.0, "
        "activation_size=4.0, parameter_size=0.0\n"
        "2 -- Linear -- forward_compute_time=-1.5, backward_compute_time=2.0, "
        "activation_size=4.0, parameter_size=8.0\n\t1 -- 2\n"
    )
    with pytest.raises(ProfileError, match="layer '2' field forward_ms"):
        parse_graph_txt(text, 8, source="g.txt")


@pytest.mark.parametrize("cost_model", ["runtime", "dapple-tf", "hpgo"])
def test_a_profile_without_any_compute_is_refused_not_divided_by(cost_model):
    zero = Profile.chain([LayerCost(f"l{i}", 0.0, 0.0, 10.0, 10.0) for i in range(3)], 8)
    with pytest.raises(ProfileError, match="every layer has forward_ms = backward_ms = 0"):
        planner.plan(zero, [4], 16, cost_model=cost_model)


def test_a_profile_whose_layers_do_not_match_the_model_is_refused():
    from dapple_tf.auto_plan import plan_from_profile

    with pytest.raises(ProfileError, match=r"lacks the model's layers \['l9'\]"):
        plan_from_profile(chain(n=3), 16, 2, model_layers=["l0", "l1", "l2", "l9"])
    with pytest.raises(ProfileError, match=r"has layers the model lacks \['l2'\]"):
        plan_from_profile(chain(n=3), 16, 2, model_layers=["l0", "l1"])
    with pytest.raises(ProfileError, match="another order"):
        plan_from_profile(chain(n=3), 16, 2, model_layers=["l1", "l0", "l2"])


# ---- formats -----------------------------------------------------------------------------------
def test_measured_fields_survive_json_and_graph_txt():
    profile = chain(n=3)
    assert Profile.from_json(profile.to_json()).layers == profile.layers
    back = parse_graph_txt(format_graph_txt(profile), profile.batch_size)
    for a, b in zip(back.layers, profile.layers):
        for field in MEASURED_FIELDS:
            assert getattr(a, field) == pytest.approx(getattr(b, field)), field


def test_a_published_profile_loads_without_the_measured_fields():
    profile = load_profile(os.path.join(DATA, "vgg-19-pbs-32.txt"), 32)
    assert all(layer.saved_bytes is None and not layer.has_fit for layer in profile.layers)
    assert "saved_bytes" not in profile.to_dict()["layers"][0]


# ---- the published planner's model is unchanged ------------------------------------------------
# Recorded at d8bee67 (before the runtime model existed): (profile, PBS, GBS, cost model,
# notation, M, step s, speedup) on the cluster [8, 16]. The "dapple-tf" rows of amoeba, bert and
# xlnet were recorded again when the search began to try zb-h1 and interleaved-1f1b (zb-h1 for
# amoeba and xlnet, interleaved-1f1b with v = 3 for bert).
PINNED = [
    ("amoeba-18-pbs-8.txt", 8, 1024, "hpgo", "11:5", 1024, 6.442608212060607, 14.261255220828206),
    (
        "amoeba-18-pbs-8.txt",
        8,
        1024,
        "dapple-tf",
        "8:8",
        128,
        6.4503711888400295,
        14.244091899542715,
    ),
    ("bert-48-pbs-2.txt", 2, 128, "hpgo", "8:8", 16, 1.48945635584, 14.770790640315566),
    (
        "bert-48-pbs-2.txt",
        2,
        128,
        "dapple-tf",
        ":".join(["4"] * 12),  # interleaved-1f1b: 12 stages on 4 groups of 4 devices
        32,
        1.4786478107199947,
        14.878761420062137,
    ),
    (
        "gnmt-32-pbs-64-simplified.txt",
        64,
        1024,
        "hpgo",
        "8:8",
        1024,
        0.47424885657125,
        15.03382855057836,
    ),
    ("vgg-19-pbs-32.txt", 32, 2048, "hpgo", "15:1", 2048, 0.6280469788055555, 14.6954611859656),
    (
        "vgg-19-pbs-32.txt",
        32,
        2048,
        "dapple-tf",
        "8:8",
        256,
        0.8741941339400022,
        10.557654920884472,
    ),
    ("xlnet-36-pbs-1.txt", 1, 128, "hpgo", "8:8", 16, 2.5978925, 14.81619428055626),
    ("xlnet-36-pbs-1.txt", 1, 128, "dapple-tf", "8:8", 16, 2.5886499999999963, 14.869093929268166),
]


@pytest.mark.parametrize(
    "name, pbs, gbs, cost_model, notation, M, step, speedup",
    PINNED,
    ids=[f"{r[0]}-{r[3]}" for r in PINNED],
)
def test_published_profiles_plan_as_before(name, pbs, gbs, cost_model, notation, M, step, speedup):
    plan = planner.plan(
        load_profile(os.path.join(DATA, name), pbs), [8, 16], gbs, cost_model=cost_model
    )
    assert (plan.notation, plan.num_micro_batches) == (notation, M)
    assert plan.predicted["step_time_s"] == pytest.approx(step, rel=1e-12)
    assert plan.predicted["speedup"] == pytest.approx(speedup, rel=1e-12)


# ---- calibration -------------------------------------------------------------------------------
def test_calibration_scales_each_stages_layers_by_its_measured_factor():
    from dapple_tf.calibration import calibrated_profile, stage_factors

    profile = chain(n=4)
    plan = even_plan(profile.layer_names, [1, 1], 16, 2)
    # predicted 1 s and 3 s; the trace shows equal work; the whole step took twice the prediction
    factors = stage_factors([1.0, 3.0], [5.0, 5.0], predicted_step_s=4.0, measured_step_s=8.0)
    assert factors == pytest.approx([4.0, 4.0 / 3.0])
    scaled = calibrated_profile(profile, plan, factors)
    assert scaled.layers[0].forward_fixed_ms == pytest.approx(
        4 * profile.layers[0].forward_fixed_ms
    )
    assert scaled.layers[3].backward_per_row_ms == pytest.approx(
        profile.layers[3].backward_per_row_ms * 4 / 3
    )
    assert scaled.layers[2].saved_bytes == profile.layers[2].saved_bytes


def test_stage_busy_time_is_read_from_the_clone_ops_of_a_trace():
    from tensorflow.core.protobuf import config_pb2
    from dapple_tf.calibration import stage_busy_s

    metadata = config_pb2.RunMetadata()
    dev = metadata.step_stats.dev_stats.add(device="/job:localhost/replica:0/task:0/device:CPU:0")
    for name, micros in [
        ("dapple/mb0/s0r0/fwd/MatMul", 100),
        ("dapple/mb1/s0r1/bwd/x", 50),
        ("dapple/mb0/s1r0/fwd/y", 30),
        ("GradientDescent/update", 999),
    ]:
        dev.node_stats.add(node_name=name, all_end_rel_micros=micros)
    assert stage_busy_s(metadata, 2) == pytest.approx([150e-6, 30e-6])


def test_memory_adds_the_largest_workspace_of_the_stage_once():
    layers = [fitted_layer("l0", workspace_bytes=3e5), fitted_layer("l1", workspace_bytes=1e6)]
    model = RuntimeModel(Profile.chain(layers, 16), Cluster.from_seps([2]), 16)
    plain = RuntimeModel(chain(n=2), Cluster.from_seps([2]), 16)
    # 8-row micro-batches: half of the 16-row workspace
    assert model.evaluate([1], [(0,)], 8, "1f1b").peak_memory_bytes[0] == pytest.approx(
        plain.evaluate([1], [(0,)], 8, "1f1b").peak_memory_bytes[0] + 1e6 / 2
    )


def test_multi_rank_plans_use_every_device_even_when_fewer_would_be_faster():
    profile = chain(fixed_ms=0.2, per_row_ms=0.2)
    cluster = Cluster.from_seps([4], devices_per_processor=4)
    plan = planner.plan(profile, cluster, 16, cost_model="runtime", use_all_devices=True)
    assert sorted(plan.devices) == [0, 1, 2, 3]
