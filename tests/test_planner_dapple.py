"""The "dapple-tf" cost model: schedules as data, the event simulation, the memory model."""

import pytest

import planner
from planner import schedules
from planner.cluster import GB, Cluster
from planner.dapple_cost import DappleModel
from planner.plan_format import PlanError
from planner.profile import LayerCost, Profile
from planner.runtime_cost import RuntimeModel
from planner.simulate import simulate


# ---- schedules (their orders: tests/test_schedules.py) ------------------------------------------
def test_simulate_refuses_schedules_it_cannot_play(monkeypatch):
    lists = schedules.interleaved_one_f_one_b(4, 4, 2)  # stages 0, 2 on group 0; 1, 3 on 1
    swapped = [lists[1], lists[0]]  # stage 1 on group 0: not s mod P
    monkeypatch.setattr(schedules, "action_lists", lambda name, s, m, chunks: swapped)
    with pytest.raises(ValueError, match="stage s on device group s mod P; 'swapped' is not"):
        simulate("swapped", [1.0] * 4, [1.0] * 4, [0.0] * 3, [0.0] * 4, 4, chunks=2)


@pytest.mark.parametrize(
    "groups,chunks,num_micro_batches", [(2, 2, 4), (2, 2, 8), (4, 2, 8), (2, 4, 8), (3, 2, 6)]
)
def test_interleaved_1f1b_plays_its_groups_with_megatrons_bubble(groups, chunks, num_micro_batches):
    """S = P v stages, stage s on group s mod P, each chunk F = 1 and B = 2, free transfers: the
    step is 3 (v M + P - 1) and the bubble (P - 1) / (v M + P - 1) (Narayanan et al., SC'21),
    which is also the library's unit-time timeline."""
    P, v, M = groups, chunks, num_micro_batches
    S = P * v
    result = simulate("interleaved-1f1b", [1.0] * S, [2.0] * S, [0.0] * (S - 1), [0.0] * S, M, v)
    assert result.step_time_s == pytest.approx(3 * (v * M + P - 1))
    assert len(result.busy_s) == P and len(result.compute_end_s) == S
    assert result.bubble_fraction == pytest.approx((P - 1) / (v * M + P - 1))
    lists = schedules.action_lists("interleaved-1f1b", S, M, v)
    assert result.bubble_fraction == pytest.approx(schedules.unit_bubble(lists, S))


def test_interleaved_boundaries_between_the_same_two_groups_share_the_link():
    """4 stages on 2 groups: boundaries 0 and 2 both go from group 0 to group 1, so that
    direction carries 2 M transfers; with a slow link they, not compute, set the step."""
    M, transfer = 4, 5.0
    result = simulate("interleaved-1f1b", [0.1] * 4, [0.1] * 4, [transfer] * 3, [0.0] * 4, M, 2)
    assert result.step_time_s >= 2 * M * transfer
    one_per_boundary = simulate("1f1b", [0.1] * 4, [0.1] * 4, [transfer] * 3, [0.0] * 4, M)
    assert result.step_time_s > one_per_boundary.step_time_s


@pytest.mark.parametrize("cost_model", [DappleModel, RuntimeModel])
def test_cost_models_evaluate_an_interleaved_plan_with_any_multiple_of_p_micro_batches(cost_model):
    layers = [LayerCost(f"l{i}", 10.0, 20.0, 1e6, 1e8) for i in range(8)]
    profile = Profile.chain(layers, 8)
    cluster = Cluster.from_seps([2])
    model = cost_model(profile, cluster, 48)
    ends = [1, 3, 5, 7]  # 4 stages of 2 layers
    devices = [[0], [1], [0], [1]]
    for micro_batch_size in (8, 12):  # M = 6 and 4: multiples of the 2 groups, not of 4 stages
        result = model.evaluate(ends, devices, micro_batch_size, "interleaved-1f1b")
        assert result.step_time_s > 0 and result.fits


@pytest.mark.parametrize("num_stages,num_micro_batches", [(2, 4), (4, 8), (4, 4), (3, 7)])
def test_zb_h1_plays_i_and_w_as_halves_of_the_backward(num_stages, num_micro_batches):
    """F = 1, B = 2 (I = W = 1 by INPUT_GRADIENT_SHARE), free transfers: the step the library's
    unit-time timeline (planner.schedules.start_times) draws, shorter than 1F1B's by two
    thirds of its bubble; 1F1B plays as before."""
    S, M = num_stages, num_micro_batches
    zb = simulate("zb-h1", [1.0] * S, [2.0] * S, [0.0] * (S - 1), [0.0] * S, M)
    lists = schedules.action_lists("zb-h1", S, M)
    starts = schedules.start_times(lists, S)
    span = max(
        t + schedules.UNIT_DURATIONS[a.kind] for g, l in zip(starts, lists) for t, a in zip(g, l)
    )
    assert zb.step_time_s == pytest.approx(span)
    one_f_one_b = simulate("1f1b", [1.0] * S, [2.0] * S, [0.0] * (S - 1), [0.0] * S, M)
    assert one_f_one_b.step_time_s == pytest.approx((M + S - 1) * 3)
    if M >= S:
        assert zb.step_time_s == pytest.approx(3 * M + S - 1)


def test_the_planner_chooses_the_schedule_it_predicts_fastest_and_says_why():
    layers = [LayerCost(f"l{i}", 10.0, 20.0, 1e6, 1e8) for i in range(8)]
    profile = Profile.chain(layers, 8)
    zb = planner.plan(profile, [4], 64, micro_batch_size=4, schedule="zb-h1")
    one_f_one_b = planner.plan(profile, [4], 64, micro_batch_size=4, schedule="1f1b")
    assert zb.schedule == "zb-h1"
    assert zb.notation == one_f_one_b.notation == "2:2"  # 2 stages x 2 replicas, M = 16
    assert zb.predicted["step_time_s"] < one_f_one_b.predicted["step_time_s"]
    assert zb.predicted["bubble_fraction"] < one_f_one_b.predicted["bubble_fraction"] / 2
    assert zb.predicted["schedule_choice"]["why"] == "zb-h1 was asked for"
    chosen = planner.plan(profile, [4], 64, micro_batch_size=4)
    choice = chosen.predicted["schedule_choice"]
    compared = choice["predicted_step_s"]
    assert set(compared) >= {"1f1b", "gpipe", "zb-h1", "interleaved-1f1b v=2"}
    assert compared["1f1b"] > compared["zb-h1"]
    fastest = min(compared, key=compared.get)
    assert choice["chosen"] == fastest
    assert chosen.predicted["step_time_s"] == pytest.approx(compared[fastest])
    assert choice["why"].startswith(f"{fastest} has the shortest predicted step")
    # interleaving 4 chunks on 2 groups of 2: the bubble (P-1)/(vM+P-1) beats zb-h1's here
    assert fastest == "interleaved-1f1b v=4" and chosen.chunks == 4


def test_1f1b_is_kept_unless_another_schedule_is_a_margin_faster():
    """With one stage every schedule plays the same; 1f1b is kept and the reason says so."""
    layers = [LayerCost(f"l{i}", 10.0, 20.0, 1e6, 1e8) for i in range(2)]
    plan = planner.plan(Profile.chain(layers, 8), [1], 16, micro_batch_size=8)
    assert plan.schedule == "1f1b"
    times = plan.predicted["schedule_choice"]["predicted_step_s"]
    assert times["zb-h1"] == pytest.approx(times["1f1b"])
    assert "must be 1% faster" in plan.predicted["schedule_choice"]["why"]


# ---- simulation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_uniform_pipeline_without_communication_takes_M_plus_S_minus_1_slots(schedule):
    S, M, F, B = 4, 8, 1.0, 2.0
    result = simulate(schedule, [F] * S, [B] * S, [0.0] * (S - 1), [0.0] * S, M)
    assert result.step_time_s == pytest.approx((M + S - 1) * (F + B))
    assert result.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))


def test_allreduce_starts_after_the_stages_last_backward_and_overlaps_the_drain():
    # stage 0 finishes last, so stage 1's allreduce hides behind stage 0's drain
    base = simulate("1f1b", [1, 1], [1, 1], [0.0], [0.0, 0.0], 4).step_time_s
    assert simulate("1f1b", [1, 1], [1, 1], [0.0], [0.0, 1.0], 4).step_time_s == pytest.approx(base)
    assert simulate("1f1b", [1, 1], [1, 1], [0.0], [0.5, 0.0], 4).step_time_s == pytest.approx(
        base + 0.5
    )


def test_a_slow_link_becomes_the_bottleneck():
    # 2 stages, transfer 3 s per micro-batch each way: the link carries M transfers serially
    result = simulate("gpipe", [1, 1], [1, 1], [3.0], [0, 0], 4)
    assert result.step_time_s >= 4 * 3.0 * 2 - 1e-9


# ---- memory --------------------------------------------------------------------------------------
def _two_layer_profile():
    layers = [LayerCost("a", 10.0, 20.0, 1e8, 1e9), LayerCost("b", 10.0, 20.0, 4e7, 5e8)]
    return Profile.chain(layers, batch_size=4)


def test_memory_of_a_stage_by_hand():
    model = DappleModel(_two_layer_profile(), Cluster.from_seps([2]), 16, optimizer_slots=2)
    # 2 stages, 1 replica each, micro-batch 8 rows (M = 2), 1f1b: stage 0 holds min(2, 2) = 2
    ev = model.evaluate([0, 1], [(0,), (1,)], 8, "1f1b", device_memory=1e12)
    rows = 8 / 4
    stage0 = (
        1e9 * (1 + 1 + 2) + 2 * 1e8 * rows + 2 * 1e8 * rows
    )  # boundary out = 1e8 bytes/row-batch
    stage1 = 5e8 * 4 + 1 * 4e7 * rows + 2 * 1e8 * rows
    assert ev.peak_memory_bytes == pytest.approx((stage0, stage1))
    # gpipe holds all M = 2 micro-batches everywhere
    ev = model.evaluate([0, 1], [(0,), (1,)], 8, "gpipe", device_memory=1e12)
    assert ev.peak_memory_bytes[1] == pytest.approx(5e8 * 4 + 2 * 4e7 * rows + 2 * 1e8 * rows)


def test_replicas_split_the_activation_memory_not_the_parameters():
    model = DappleModel(_two_layer_profile(), Cluster.from_seps([4]), 16)
    one = model.evaluate([1], [(0,)], 8, "1f1b", 1e12).peak_memory_bytes[0]
    two = model.evaluate([1], [(0, 1)], 8, "1f1b", 1e12).peak_memory_bytes[0]
    params = 1.5e9 * 4
    assert two - params == pytest.approx((one - params) / 2)


def test_plans_over_the_device_memory_are_rejected_for_a_pipeline_that_fits():
    # 8 GB of parameters x 4 (weights, gradients, Adam's 2 slots) = 32 GB: no single device holds
    # it; with compute this heavy, data parallelism would otherwise win
    layers = [LayerCost(f"l{i}", 500.0, 1000.0, 1e6, 1e9) for i in range(8)]
    plan = planner.plan(Profile.chain(layers, 8), [4], 32, device_memory_gb=16)
    assert plan.num_stages >= 2
    assert max(plan.predicted["peak_memory_bytes"]) <= 16 * GB
    unlimited = planner.plan(Profile.chain(layers, 8), [4], 32, device_memory_gb=1000)
    assert max(unlimited.predicted["peak_memory_bytes"]) > 16 * GB
    assert unlimited.predicted["step_time_s"] < plan.predicted["step_time_s"]
    dp = planner.plan(Profile.chain(layers, 8), [4], 32, device_memory_gb=1000, schedule="1f1b")
    assert dp.num_stages == 1  # among 1f1b plans, data parallelism (32 GB per device)


def test_when_nothing_fits_the_error_names_the_smallest_memory_that_would():
    layers = [LayerCost(f"l{i}", 5.0, 10.0, 1e6, 1e9) for i in range(2)]
    with pytest.raises(PlanError, match=r"smallest plan needs 4\.0\d* GB") as err:
        planner.plan(Profile.chain(layers, 8), [2], 16, device_memory_gb=1)
    assert "--device-memory-gb" in str(err.value)
    need = float(str(err.value).split("needs ")[1].split(" GB")[0])
    assert (
        planner.plan(Profile.chain(layers, 8), [2], 16, device_memory_gb=need + 1e-3).num_stages
        == 2
    )


def test_optimizer_slots_are_configurable():
    layers = [LayerCost("a", 1, 1, 0, 1e9)]
    model = DappleModel(Profile.chain(layers, 1), Cluster.from_seps([1]), 1, optimizer_slots=0)
    assert model.evaluate([0], [(0,)], 1, "1f1b", 1e12).peak_memory_bytes[0] == pytest.approx(2e9)


def test_long_pipelines_are_extrapolated_close_to_the_full_simulation():
    import random
    from planner import simulate as sim

    rng = random.Random(0)
    cases = [(schedule, 1) for schedule in ("1f1b", "gpipe", "zb-h1")] + [("interleaved-1f1b", 2)]
    for _ in range(10):
        for schedule, chunks in cases:
            S = rng.randint(1, 3) * chunks
            fwd = [rng.uniform(0.1, 2) for _ in range(S)]
            bwd = [rng.uniform(0.1, 4) for _ in range(S)]
            tr = [rng.uniform(0, 3) for _ in range(S - 1)]
            ar = [rng.uniform(0, 5) for _ in range(S)]
            M = 600 - 600 % (S // chunks)
            direct = sim._simulate(schedule, fwd, bwd, tr, ar, M, chunks).step_time_s
            tolerance = 1e-3 if schedule in ("1f1b", "gpipe") else 5e-3
            assert sim.simulate(schedule, fwd, bwd, tr, ar, M, chunks).step_time_s == pytest.approx(
                direct, rel=tolerance
            )


# ---- interleaved-1f1b in the search ---------------------------------------------------------------
def _uniform_model(num_layers=8, devices=2, gbs=16, activation_bytes=1e6):
    layers = [LayerCost(f"l{i}", 10.0, 20.0, activation_bytes, 1e6) for i in range(num_layers)]
    cluster = Cluster.from_seps([devices], intra_host_bandwidth=1e15)
    return DappleModel(Profile.chain(layers, 4), cluster, gbs)


def test_interleaved_layouts_cut_the_layers_into_v_even_stages_round_robin():
    from planner.dapple_search import DappleSearch

    search = DappleSearch(_uniform_model())
    base_ends, base_devices = (3, 7), ((0,), (1,))
    layouts = search.schedule_layouts(base_ends, base_devices, 4, "interleaved-1f1b")  # M = 4
    assert layouts[0] == ((1, 3, 5, 7), ((0,), (1,), (0,), (1,)))
    assert layouts[-1] == (tuple(range(8)), ((0,), (1,)) * 4)
    assert search.schedule_layouts(base_ends, base_devices, 4, "1f1b") == [
        (base_ends, base_devices)
    ]
    # M = 16 / 16 = 1 is not a multiple of the 2 groups; unequal replica counts; one stage
    assert search.schedule_layouts(base_ends, base_devices, 16, "interleaved-1f1b") == []
    assert search.schedule_layouts(base_ends, ((0,), (1, 2)), 4, "interleaved-1f1b") == []
    assert search.schedule_layouts((7,), ((0,),), 4, "interleaved-1f1b") == []


def test_an_interleaved_group_holds_all_its_stages_parameters_and_its_in_flight_chunks():
    """4 stages of 2 layers on 2 groups, M = 4, one row per replica and layer of 1e6 bytes of
    parameters and 1e6 of activations: each stage holds 4e6 x 2 (weights, gradients, 2 optimizer
    slots) and 2e6 of boundary buffers; a group holds both its stages' and, per micro-batch
    chunk in flight (`in_flight_peaks`), one stage's 2e6 of activations."""
    model = _uniform_model()
    ends, devices = (1, 3, 5, 7), ((0,), (1,), (0,), (1,))
    ev = model.evaluate(ends, devices, 4, "interleaved-1f1b")
    in_flight = schedules.in_flight_peaks("interleaved-1f1b", 4, 4, 2)
    assert in_flight[0] > schedules.in_flight_peaks("1f1b", 2, 4)[0]  # 1F1B on 2 groups: 2
    for s in range(4):
        assert ev.peak_memory_bytes[s] == pytest.approx(2 * (8e6 + 2e6) + in_flight[s % 2] * 2e6)


def test_the_search_interleaves_when_asked_and_beats_1f1b_on_the_same_groups():
    from planner.dapple_search import DappleSearch

    model = _uniform_model()
    best = DappleSearch(model, micro_batch_size=4, schedule="interleaved-1f1b").run()
    assert best.schedule == "interleaved-1f1b"
    groups = len(set(best.devices))
    assert groups == 2 and len(best.ends) % groups == 0 and len(best.ends) > groups
    assert all(d == best.devices[s % groups] for s, d in enumerate(best.devices))
    plain = model.evaluate(best.base[0], best.base[1], 4, "1f1b")
    assert best.eval.step_time_s < plain.step_time_s
    assert best.eval.bubble_fraction < plain.bubble_fraction
