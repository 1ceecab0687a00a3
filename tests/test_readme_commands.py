"""Every command in README.md and launch/README.md runs as written (in a scratch folder that
links the repository's train.py and tests/, with `.venv/bin/python` meaning this Python).

Not run: `bash launch/install.sh ...` (CI's fresh-clone run, .ci/run, runs it; and
tests/test_install_script.py) and `.venv/bin/python -m pytest` (this suite). The multi-host
lines (`-H host1:8,host2:8`) cannot run on one machine: their train.py flags are parsed and
checked here, and the single-host 4-rank line of launch/README.md runs.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl.testing import flagsaver

import models
import train

REPO = Path(__file__).resolve().parents[1]
READMES = ("README.md", "launch/README.md")


def bash_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped, and
    `a && b` split into a and b."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def kind(command: str) -> str:
    if "launch/install.sh" in command:
        return "install"
    if "-m pytest" in command:
        return "test suite"
    if "host1:" in command:
        return "multi-host"
    return "run"


COMMANDS = [
    (readme, command)
    for readme in READMES
    for command in bash_commands((REPO / readme).read_text())
]


def test_the_readmes_have_the_commands_this_test_expects():
    kinds = [kind(c) for _, c in COMMANDS]
    assert kinds.count("run") >= 10 and kinds.count("multi-host") >= 5, COMMANDS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "tests"):
        (path / name).symlink_to(REPO / name)
    return path


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
        argv.pop(0)
    return [
        sys.executable
        if a in (".venv/bin/python", "python")
        else str(REPO / a)
        if a.startswith("launch/")
        else a
        for a in argv
    ]


@pytest.mark.slow
@pytest.mark.parametrize("readme, command", [c for c in COMMANDS if kind(c[1]) == "run"])
def test_readme_command_runs_as_written(readme, command, workdir):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable)
    if "horovod.sh" in command:
        from tests.multirank.runner import horovod_missing_reason

        if horovod_missing_reason():
            pytest.skip(horovod_missing_reason())
    result = subprocess.run(
        _argv(command),
        cwd=workdir,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{readme}: {command}\n{result.stderr[-4000:]}"
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    if "train.py" in command:
        assert re.search(r"step \d+  loss", output), output[-2000:]
        # quiet by default: none of TensorFlow's C++ or profiler log lines
        for noise in ("cpu_feature_guard", "profiler_session", "Profiler session"):
            assert noise not in output, output[:2000]


@pytest.mark.parametrize("readme, command", [c for c in COMMANDS if kind(c[1]) == "multi-host"])
def test_multi_host_command_passes_train_py_flag_checks(readme, command, tmp_path):
    argv = shlex.split(command)
    args = [
        a
        for a in argv[argv.index(next(a for a in argv if a.endswith("train.py"))) + 1 :]
        if a != "..."
    ]
    for i, arg in enumerate(args):  # cluster paths: point them into tmp_path
        if "=/shared/" in arg:
            name, value = arg.split("=", 1)
            local = tmp_path / value.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            if value.endswith(".json"):
                local.write_text("{}")
            args[i] = f"{name}={local}"
    with flagsaver.flagsaver():
        train.FLAGS.unparse_flags()
        train.FLAGS(["train.py", *args])
        assert train.FLAGS.preset in models.presets(train.FLAGS.model)
        train.FLAGS.unparse_flags()


def test_readme_links_point_into_the_repository_and_exist():
    text = (REPO / "README.md").read_text()
    assert "../shared" not in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/architecture.md" in links
    for link in links:
        if not link.startswith("http"):
            assert (REPO / link).exists(), link
