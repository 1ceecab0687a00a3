"""Test session setup: 8 logical CPU devices stand in for GPUs (see DEVELOPERS' guide)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dapple_tf  # noqa: E402,F401  (before TensorFlow: its oneDNN default, as users get it)
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
