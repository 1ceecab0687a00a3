"""Logical CPU devices: a run asking for fewer devices keeps a larger configuration."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import tensorflow as tf
from dapple_tf import devices
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 8)
devices.create_logical_cpus(3)   # e.g. train.py --num_devices=3 inside a test session of 8
print(len(tf.config.list_logical_devices("CPU")))
"""


def test_asking_for_fewer_logical_cpus_keeps_the_configured_ones():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.stdout.strip() == "8", result.stderr[-2000:]
