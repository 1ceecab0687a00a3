"""Test session setup: 8 logical CPU devices stand in for GPUs (see DEVELOPERS' guide)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's CPU kernels, as users get them (`import dapple_tf` turns them on unless the variable
# is set); tests/test_eigen_equivalence.py runs the equivalence tests with TensorFlow's own
# (Eigen) kernels in processes of their own. The suite ran Eigen's kernels until 2026-12-05:
# oneDNN runs made equivalence tests fail at random (weights off by up to 2e-4), which was a
# race of the transposed-weights pass's graphs, not the kernels (graph_rewrite/rewrite.py,
# `_after_every_stage_call`; tests/test_variable_update_order.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import dapple_tf  # noqa: E402,F401  (before TensorFlow, as users import it)
import tensorflow as tf  # noqa: E402

NUM_TEST_DEVICES = 8


def _configure_logical_cpus(n):
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:
        # TF was initialised before this ran (e.g. a plugin imported it); keep what exists.
        pass


_configure_logical_cpus(NUM_TEST_DEVICES)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process tests (run in CI too)")
