"""The code passes ruff's lint and format check (rules and line length in ruff.toml), so the
README's test command, and with it CI, runs them."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")


def ruff(*args):
    if not os.path.exists(RUFF):
        pytest.fail(f"ruff is not installed next to {sys.executable}: run launch/install.sh")
    return subprocess.run([RUFF, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_ruff_lint_passes():
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_check_passes():
    result = ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, "run `.venv/bin/ruff format .`\n" + result.stdout + result.stderr
