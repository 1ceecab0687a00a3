"""The searches: exact against brute force on small cases, executable plans, edge sizes."""

import itertools
import random

import pytest

import planner
from planner.cluster import Cluster
from planner.dapple_cost import DappleModel
from planner.dapple_search import OTHER_SCHEDULE_MARGIN, DappleSearch
from planner.hpgo import HpgoModel, HpgoPlan
from planner.hpgo_search import _scattered
from planner.plan_format import PlanError
from planner.profile import LayerCost, Profile
from planner.states import hpgo_states


def _random_chain(rng, num_layers):
    layers = [
        LayerCost(
            f"layer_{i}",
            rng.uniform(1, 20),
            rng.uniform(1, 40),
            rng.choice([1e5, 1e6, 1e7, 1e8]),
            rng.choice([0, 1e6, 1e8, 1e9]),
        )
        for i in range(num_layers)
    ]
    return Profile.chain(layers, batch_size=rng.choice([1, 4, 8]))


def _compositions(total, parts):
    """Tuples of `parts` positive ints summing to at most `total`."""
    for counts in itertools.product(range(1, total + 1), repeat=parts):
        if sum(counts) <= total:
            yield counts


def _packed(counts, unit=1, start=0):
    devices, d = [], start
    for n in counts:
        devices.append(tuple(range(d, d + n * unit)))
        d += n * unit
    return tuple(devices)


def brute_force_hpgo(model, num_devices):
    """Best speedup over every plan of the hpgo space: any cuts, any rp, any slot counts, device
    sets packed in stage order or scattered one per host in turn."""
    best = 0.0
    L = model.L
    for S in range(1, min(L, num_devices) + 1):
        for cuts in itertools.combinations(range(L - 1), S - 1):
            ends = cuts + (L - 1,)
            for rp in range(1, num_devices + 1):
                if model.gbs // rp < 1:
                    continue
                for counts in _compositions(num_devices // rp, S):
                    devices = _packed(counts, rp)
                    best = max(best, model.score(HpgoPlan(ends, devices, rp)).speedup)
                    if S > 1:
                        spread = _scattered(model.cluster, [len(d) for d in devices])
                        best = max(best, model.score(HpgoPlan(ends, spread, rp)).speedup)
                    if S == 2 and rp == 1 and sum(counts) == num_devices:
                        best = max(best, model.score(HpgoPlan(ends, devices, 1, 1, True)).speedup)
    return best


def brute_force_dapple(model, num_devices):
    """Least simulated step over every executable plan that fits (single host: placement is
    free), under every schedule the search tries on each layout (DappleSearch.schedule_layouts),
    with the search's preference for 1f1b (another schedule must be OTHER_SCHEDULE_MARGIN
    faster)."""
    search = DappleSearch(model)
    best_key, best = float("inf"), float("inf")
    L, gbs = model.L, model.gbs
    for b in (d for d in range(1, gbs + 1) if gbs % d == 0):
        reps = [r for r in range(1, min(b, num_devices) + 1) if b % r == 0]
        for S in range(1, min(L, num_devices) + 1):
            for cuts in itertools.combinations(range(L - 1), S - 1):
                ends = cuts + (L - 1,)
                for counts in itertools.product(reps, repeat=S):
                    if sum(counts) > num_devices:
                        continue
                    for schedule in search.schedules:
                        layouts = search.schedule_layouts(ends, _packed(counts), b, schedule)
                        for layout_ends, layout in layouts:
                            ev = model.evaluate(layout_ends, layout, b, schedule)
                            margin = 1.0 if schedule == "1f1b" else 1.0 + OTHER_SCHEDULE_MARGIN
                            if ev.fits and ev.step_time_s * margin < best_key:
                                best_key, best = ev.step_time_s * margin, ev.step_time_s
    return best


@pytest.mark.parametrize("seed", range(12))
def test_hpgo_search_is_exact_on_small_cases(seed):
    rng = random.Random(seed)
    profile = _random_chain(rng, rng.randint(2, 6))
    cluster = Cluster.from_seps(rng.choice([[4], [2, 4], [3, 6]]))
    gbs = rng.choice([4, 16, 64])
    model = HpgoModel(hpgo_states(profile), cluster, profile.batch_size, gbs)
    plan = planner.plan(profile, cluster, gbs, cost_model="hpgo")
    assert plan.predicted["speedup"] == pytest.approx(
        brute_force_hpgo(model, cluster.num_devices), rel=1e-9
    )


@pytest.mark.parametrize("seed", range(12))
def test_dapple_search_is_exact_on_small_cases(seed):
    rng = random.Random(100 + seed)
    profile = _random_chain(rng, rng.randint(2, 5))
    n = rng.choice([2, 3, 4])
    gbs = rng.choice([4, 8, 12])
    memory_gb = rng.choice([2, 16])
    cluster = Cluster.from_seps([n], device_memory_bytes=memory_gb * 1e9)
    model = DappleModel(profile, cluster, gbs)
    best = brute_force_dapple(model, n)
    if best == float("inf"):
        with pytest.raises(PlanError, match="no plan fits"):
            planner.plan(profile, cluster, gbs)
        return
    plan = planner.plan(profile, cluster, gbs)
    assert plan.predicted["step_time_s"] == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_dapple_dp_path_is_within_one_percent_of_brute_force(seed):
    rng = random.Random(200 + seed)
    profile = _random_chain(rng, rng.randint(4, 6))
    cluster = Cluster.from_seps([4])
    gbs = rng.choice([8, 16])
    model = DappleModel(profile, cluster, gbs)
    found = DappleSearch(model, exhaustive_limit=0).run()
    assert found.eval.step_time_s <= brute_force_dapple(model, 4) * 1.01


# ---- what the runtime relies on -----------------------------------------------------------------
@pytest.mark.parametrize(
    "num_layers, num_devices, gbs",
    [(4, 2, 8), (5, 4, 16), (8, 8, 64), (6, 3, 12), (8, 4, 8), (4, 8, 32), (1, 8, 16), (3, 6, 9)],
)
def test_tiny_profiles_get_executable_plans_over_their_layers(num_layers, num_devices, gbs):
    rng = random.Random(num_layers * 100 + num_devices)
    profile = _random_chain(rng, num_layers)
    plan = planner.plan(profile, None, gbs, num_devices=num_devices)
    plan.check_layers(profile.layer_names)
    plan.check_devices(num_devices)
    assert plan.rows_divide and plan.executable
    assert plan.global_batch_size == gbs
    assert plan.predicted["step_time_s"] > 0
    # the JSON round-trips into a plan the runtime accepts
    assert planner.Plan.from_json(plan.to_json()) == plan


def test_a_single_data_parallel_stage_is_returned_when_it_is_best():
    # tiny parameters, huge activations: splitting only adds transfers
    layers = [LayerCost(f"l{i}", 10.0, 20.0, 5e9, 1e3) for i in range(4)]
    plan = planner.plan(Profile.chain(layers, 8), [4], 32)
    assert plan.notation == "DP4"
    assert plan.predicted["speedup"] == pytest.approx(plan.predicted["dp_speedup"], rel=0.05)


def test_fixed_micro_batch_size_and_schedule_are_honoured():
    layers = [LayerCost(f"l{i}", 10.0, 20.0, 1e6, 1e8) for i in range(6)]
    plan = planner.plan(Profile.chain(layers, 8), [4], 64, micro_batch_size=4, schedule="gpipe")
    assert plan.micro_batch_size == 4 and plan.num_micro_batches == 16
    assert plan.schedule == "gpipe"
    assert all(4 % s.num_replicas == 0 for s in plan.stages)


def test_an_indivisible_micro_batch_size_is_refused():
    layers = [LayerCost("l0", 1, 1, 1, 1)]
    with pytest.raises(
        PlanError, match="micro_batch_size 5 does not divide the global batch size 16"
    ):
        planner.plan(Profile.chain(layers, 1), [2], 16, micro_batch_size=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cost_model="magic"), "cost_model must be one of"),
        (dict(schedule="zb"), "schedule must be one of"),
        (dict(global_batch_size=0), "global_batch_size must be a positive integer"),
        (dict(optimizer_slots=-1), "optimizer_slots must be >= 0"),
    ],
)
def test_bad_planner_arguments_say_what_was_expected(kwargs, message):
    args = dict(
        profile=Profile.chain([LayerCost("a", 1, 1, 1, 1)], 1), cluster=[2], global_batch_size=8
    )
    args.update(kwargs)
    with pytest.raises(PlanError, match=message):
        planner.plan(**args)


def test_a_cluster_that_disagrees_with_num_devices_is_refused():
    with pytest.raises(planner.ClusterError, match="num_devices=4 but the cluster"):
        planner.plan(Profile.chain([LayerCost("a", 1, 1, 1, 1)], 1), [8], 8, num_devices=4)


def test_bad_cluster_seps_are_refused():
    with pytest.raises(planner.ClusterError, match="increasing positive"):
        Cluster.from_seps([8, 4])
    with pytest.raises(planner.ClusterError, match="comma-separated"):
        Cluster.from_seps("8;16")


def test_cluster_json_sets_bandwidths_and_memory(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"seps": [4, 8], "inter_host_bandwidth": 2e9, "device_memory_bytes": 32e9}')
    cluster = Cluster.load(path)
    assert cluster.num_hosts == 2 and cluster.inter_host_bandwidth == 2e9
    assert cluster.device_memory_bytes == 32e9 and cluster.intra_host_bandwidth == 25e9
    path.write_text('{"seps": [4], "bandwidth": 1}')
    with pytest.raises(planner.ClusterError, match="unknown cluster keys"):
        Cluster.load(path)
