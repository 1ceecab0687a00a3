"""auto_plan: profile the template, then plan it; local_cluster: this machine as a Cluster."""

import pytest
import tensorflow as tf

from dapple_tf import auto_plan as ap
from planner.cluster import Cluster

v1 = tf.compat.v1
pytestmark = pytest.mark.timeout(120)

LAYERS = ("embed", "block_0", "block_1", "block_2", "head")


def chain_model(features):
    h = features["x"]
    for name, width in zip(LAYERS[:-1], (64, 64, 64, 64)):
        with v1.variable_scope(name):
            w = v1.get_variable("w", [h.shape[-1], width])
            h = tf.nn.relu(tf.matmul(h, w))
    with v1.variable_scope(LAYERS[-1]):
        w = v1.get_variable("w", [64, 1])
        return tf.reduce_mean(tf.square(tf.matmul(h, w) - features["y"]))


SPEC = {"x": ((32,), tf.float32), "y": ((1,), tf.float32)}


def test_auto_plan_returns_an_executable_plan_over_the_models_layers():
    plan = ap.auto_plan(chain_model, SPEC, global_batch_size=16, num_devices=2)
    plan.check_layers(LAYERS)
    assert plan.global_batch_size == 16
    assert set(plan.devices) <= {0, 1}
    assert plan.predicted["step_time_s"] > 0


def test_auto_plan_profiles_at_the_per_device_batch_by_default():
    assert ap.default_profile_batch_size(64, 4) == 16
    assert ap.default_profile_batch_size(3, 8) == 1


def test_a_cluster_of_another_size_than_the_run_is_refused():
    with pytest.raises(ValueError, match="cluster has 8 devices.*run has 4"):
        ap.as_cluster([8], 4)
    assert ap.as_cluster(None, 4) == Cluster.from_seps([4])
    assert ap.as_cluster([2, 4], 4).num_hosts == 2


def test_local_cluster_measures_a_positive_p2p_bandwidth():
    cluster = ap.local_cluster(2)
    assert cluster.num_devices == 2
    assert cluster.intra_host_bandwidth > 0
    assert cluster.intra_host_bandwidth != Cluster.from_seps([2]).intra_host_bandwidth


def test_predicted_step_of_a_given_plan_matches_the_planners_own_prediction():
    from dapple_tf import profiler
    from planner.plan_format import even_plan

    profile = profiler.profile_model(chain_model, SPEC, 8, warmup_steps=1, measured_steps=2)
    cluster = Cluster.from_seps([2])
    chosen = ap.plan_from_profile(profile, 16, 2, cluster=cluster)
    assert ap.predict_step_s(chosen, profile, cluster) == pytest.approx(
        chosen.predicted["step_time_s"]
    )
    pipeline = even_plan(LAYERS, [1, 1], 16, 4, "1f1b")
    # the planner chose its plan because no other scores better, this pipeline included
    assert ap.predict_step_s(pipeline, profile, cluster) >= chosen.predicted["step_time_s"] * (
        1 - 1e-9
    )
