"""launch/install.sh stops at a broken step with a message naming that step (no deep traceback)."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _copy_script(tmp_path):
    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch" / "install.sh", tmp_path / "launch" / "install.sh")
    return tmp_path / "launch" / "install.sh"


def _run(script, *args):
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": "python3.11"},
    )


def test_missing_python_names_the_step(tmp_path):
    result = _run(_copy_script(tmp_path), "--python", "python3.99-does-not-exist")
    assert result.returncode != 0
    assert "FAILED at step: check Python (python3.99-does-not-exist)" in result.stderr
    assert "Traceback" not in result.stderr


def test_failing_pip_step_names_the_step_and_shows_its_log(tmp_path):
    script = _copy_script(tmp_path)
    fake_python = tmp_path / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\necho 'ERROR: simulated registry outage' >&2\nexit 1\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    result = _run(script)
    assert result.returncode == 1
    assert "FAILED at step: install tensorflow" in result.stderr
    assert "simulated registry outage" in result.stderr
    assert "pip-base.log" in result.stderr


def test_unknown_argument_is_rejected(tmp_path):
    result = _run(_copy_script(tmp_path), "--bogus")
    assert result.returncode == 2
    assert "unknown argument '--bogus'" in result.stderr
