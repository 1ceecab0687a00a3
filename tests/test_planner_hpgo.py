"""The "hpgo" cost model: the published planner's formulas and worked examples, number for number."""

import os

import pytest

import planner
from planner.cluster import Cluster
from planner.graph_txt import load_profile
from planner.hpgo import HpgoModel, HpgoPlan, allreduce_time, transfer_time
from planner.profile import LayerCost, Profile
from planner.states import hpgo_states

DATA = os.path.join(os.path.dirname(__file__), "data", "profiles", "dapple")
C816 = Cluster.from_seps([8, 16])


def _profile(name, pbs):
    return load_profile(os.path.join(DATA, name), pbs)


# ---- formulas ---------------------------------------------------------------------------------
def test_allreduce_inside_a_host_uses_nvlink_divided_by_half_the_devices():
    assert allreduce_time(C816, [0], 1e9) == 0
    assert allreduce_time(C816, range(8), 1e9) == pytest.approx(1e9 * 2 * 7 / 8 / 25e9 / 4)
    assert allreduce_time(C816, range(3), 1e9) == pytest.approx(1e9 * 2 * 2 / 3 / 25e9 / 1)


def test_allreduce_across_hosts_uses_ethernet_allreduce_bandwidth():
    assert allreduce_time(C816, [7, 8], 3e9) == pytest.approx(3e9 * 2 * 1 / 2 / 3e9)
    assert allreduce_time(C816, range(16), 3e9) == pytest.approx(3e9 * 2 * 15 / 16 / 3e9)


def test_transfer_into_one_host_counts_the_senders_outside_it():
    assert transfer_time(C816, range(8), range(8, 16), 1e9) == pytest.approx(1.0)  # all outside
    assert transfer_time(C816, range(4, 12), [12], 1e9) == pytest.approx(0.5)  # 4 of 8 outside
    assert transfer_time(C816, range(0, 4), range(4, 8), 1e9) == pytest.approx(1 / 25)  # same host


def test_transfer_into_a_set_spanning_hosts_uses_the_allreduce_bandwidth():
    assert transfer_time(C816, [0], range(6, 10), 3e9) == pytest.approx(1.0)


# ---- worked examples --------------------------------------------------------------------------------
def test_xlnet36_published_best_plan_scores_as_published():
    states = hpgo_states(_profile("xlnet-36-pbs-1.txt", 1))
    model = HpgoModel(states, C816, 1, 128)
    assert model.T == pytest.approx(38.4909, abs=1e-3)
    score = model.score(HpgoPlan((21, 40), (tuple(range(8)), tuple(range(8, 16))), rp=8))
    assert score.stage_times_s == pytest.approx((2.3915, 2.4198), abs=1e-3)
    assert score.input_transfers_s[1] == pytest.approx(2.304, abs=1e-3)
    assert score.num_micro_batches == 16
    assert score.block_s == pytest.approx(0.15124, abs=1e-5)
    assert score.latency_s - sum(score.boundary_transfers_s) == pytest.approx(2.56931, abs=1e-4)
    assert score.boundary_transfers_s[0] == pytest.approx(0.009, abs=1e-6)
    assert score.delta_s == pytest.approx(0.01958, abs=1e-5)
    assert score.speedup == pytest.approx(14.8162, abs=1e-3)


def test_xlnet36_search_finds_the_published_8_8_plan():
    plan = planner.plan(_profile("xlnet-36-pbs-1.txt", 1), [8, 16], 128, cost_model="hpgo")
    assert plan.notation == "8:8"
    assert plan.predicted["speedup"] == pytest.approx(14.8162, abs=1e-3)
    assert plan.predicted["hpgo"]["rp"] == 8
    assert plan.predicted["hpgo"]["micro_batches_per_pipeline"] == 16
    assert plan.predicted["cuts_after"] == ["Layer_17"]
    # 16 micro-batches of 8 rows over 8 replicas per stage: the runtime can run it
    assert plan.num_micro_batches == 16 and plan.micro_batch_size == 8
    assert plan.executable and plan.predicted["executable"]


def test_vgg19_gbs2048_search_finds_the_published_15_1_plan():
    plan = planner.plan(_profile("vgg-19-pbs-32.txt", 32), [8, 16], 2048, cost_model="hpgo")
    assert plan.notation == "15:1"
    assert plan.predicted["cuts_after"] == ["Conv2d_5_2"]
    assert plan.predicted["speedup"] == pytest.approx(14.695, abs=1e-3)
    assert plan.predicted["dp_speedup"] == pytest.approx(10.039, abs=1e-3)
    # 1-row micro-batches over 15 replicas: kept for comparison, flagged as not executable
    assert not plan.executable
    assert "15 replicas" in plan.predicted["not_executable_because"]


def test_vgg19_gbs512_search_finds_the_published_14_2_plan():
    plan = planner.plan(_profile("vgg-19-pbs-32.txt", 32), [8, 16], 512, cost_model="hpgo")
    assert plan.notation == "14:2"
    assert plan.predicted["cuts_after"] == ["MaxPool2d_4"]
    assert plan.predicted["speedup"] == pytest.approx(12.527, abs=1e-3)
    assert plan.predicted["dp_speedup"] == pytest.approx(4.740, abs=1e-3)


def test_the_dp_baseline_formula():
    states = hpgo_states(_profile("vgg-19-pbs-32.txt", 32))
    model = HpgoModel(states, C816, 32, 2048)
    ar = allreduce_time(C816, range(16), model.params(0, model.L - 1))
    assert model.dp_speedup() == pytest.approx(model.T / (model.T / 16 + ar))


def test_one_stage_plan_scores_as_data_parallelism():
    states = hpgo_states(_profile("vgg-19-pbs-32.txt", 32))
    model = HpgoModel(states, C816, 32, 2048)
    score = model.score(HpgoPlan((model.L - 1,), (tuple(range(16)),), rp=16))
    assert score.speedup == pytest.approx(model.dp_speedup())


# ---- robustness -----------------------------------------------------------------------------------
def test_fewer_layers_than_devices_does_not_crash():
    layers = [LayerCost(f"l{i}", 1.0 + i, 2.0, 1e6, 1e6) for i in range(3)]
    plan = planner.plan(Profile.chain(layers, 4), [8, 16], 64, cost_model="hpgo")
    assert plan.num_devices <= 16
    assert plan.predicted["speedup"] > 1


def test_branchy_gnmt32_plans_under_hpgo():
    plan = planner.plan(_profile("gnmt-32-pbs-64.txt", 64), [8, 16], 512, cost_model="hpgo")
    assert plan.predicted["speedup"] > plan.predicted["dp_speedup"]
    assert plan.predicted["hpgo"]["states"] == "topological"
    assert len(plan.layers) == 192


def test_every_profile_layer_lands_in_exactly_one_stage():
    profile = _profile("gnmt-32-pbs-64-simplified.txt", 64)  # inputs, getitem sinks, branches
    plan = planner.plan(profile, [4, 8], 512, cost_model="hpgo")
    assert sorted(plan.layers) == sorted(profile.layer_names)
