"""Pipelined training equals single-device training with TensorFlow's own (Eigen) CPU kernels,
what users get with TF_ENABLE_ONEDNN_OPTS=0 (the transposed-weights pass then stays off): the
equivalence, transposed-weights, stacked-gradients and zb-h1 test files, each in a fresh process
with TF_ENABLE_ONEDNN_OPTS=0 (the rest of the suite runs oneDNN's kernels: see conftest.py)."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "test_file",
    [
        "tests/test_trainer_equivalence.py",
        "tests/test_transposed_weights.py",
        "tests/test_stacked_weight_gradients.py",
        "tests/test_zero_bubble.py",
    ],
)
def test_equivalence_holds_with_eigen_kernels(test_file):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dapple_tf.compat as c, tensorflow; print(c.onednn_enabled())",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
