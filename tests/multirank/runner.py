"""Launch a script under `horovodrun --gloo -np N -H localhost:N` with a hard time limit."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def horovodrun_path() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return candidate if os.path.exists(candidate) else shutil.which("horovodrun")


def horovod_missing_reason() -> str | None:
    """Why multi-rank tests cannot run here, or None when they can."""
    try:
        import horovod.tensorflow as hvd  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return (
            f"horovod.tensorflow does not import ({type(e).__name__}: {e}); run launch/install.sh"
        )
    if not hvd.gloo_built():
        return "Horovod was built without Gloo"
    if horovodrun_path() is None:
        return "horovodrun is not installed next to the Python interpreter"
    return None


@dataclasses.dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    line_times: list = dataclasses.field(default_factory=list)  # (seconds since start, line)
    end_time: float = 0.0  # seconds since start when the launcher exited

    def first_time_of(self, text: str) -> float | None:
        """When (seconds since start) a line containing `text` was first printed."""
        return next((t for t, line in self.line_times if text in line), None)

    def lines_of(self, rank: int) -> list[str]:
        """Output lines of one rank (horovodrun prefixes them with '[rank]<stdout>:')."""
        prefix = re.compile(rf"^\[(\d+,)?{rank}\]<std(out|err)>:")
        return [prefix.sub("", line) for line in self.output.splitlines() if prefix.match(line)]

    def records(self, tag: str) -> dict[int, list[dict]]:
        """JSON records printed by ranks as '<tag> {...}', by rank. horovodrun tags lines
        '[rank]<stdout>:', mpirun --tag-output '[job,rank]<stdout>:' and may glue several
        ranks' tags together; records are flat JSON objects, so they are found anywhere."""
        pattern = re.compile(rf"\[(?:\d+,)?(\d+)\]<stdout>:\s?{re.escape(tag)} (\{{[^{{}}]*\}})")
        out: dict[int, list[dict]] = {}
        for m in pattern.finditer(self.output):
            out.setdefault(int(m.group(1)), []).append(json.loads(m.group(2)))
        return out


def mpi_missing_reason() -> str | None:
    """Why `launch/mpirun.sh` cannot run here, or None when it can."""
    if shutil.which("mpirun") is None:
        return (
            "mpirun is not installed (Open MPI); `bash launch/install.sh --with-mpi` installs "
            "Debian's openmpi-bin/libopenmpi-dev and builds Horovod with MPI"
        )
    try:
        import horovod.tensorflow as hvd
    except Exception as e:  # noqa: BLE001
        return f"horovod.tensorflow does not import: {e}"
    if not hvd.mpi_built():
        return "Horovod was built without MPI; rebuild with `bash launch/install.sh --with-mpi`"
    return None


def run(
    script: str,
    num_ranks: int,
    args=(),
    timeout_s: float = 240,
    env: dict | None = None,
    launcher: str = "horovodrun",
) -> Result:
    """Run tests/multirank/<script> (or a path) on `num_ranks` local ranks with `launcher`:
    'horovodrun' (--gloo), or our wrappers 'launch/horovod.sh' / 'launch/mpirun.sh'. Never
    hangs longer than timeout_s: the whole process group is killed then."""
    path = script if os.path.isabs(script) else os.path.join(HERE, script)
    hosts = ["-np", str(num_ranks), "-H", f"localhost:{num_ranks}"]
    if launcher == "horovodrun":
        cmd = [horovodrun_path(), "--gloo", *hosts, sys.executable, path]
    else:
        cmd = ["bash", os.path.join(REPO_ROOT, launcher), *hosts, path]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.update(
        {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", ""),
        }
    )
    full_env.setdefault("PYTHON", sys.executable)
    full_env.update(env or {})
    start = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    line_times = []
    timer = threading.Timer(timeout_s, lambda: _kill_group(proc))
    timer.start()
    try:
        for line in proc.stdout:  # ends when every process of the group closed its output
            line_times.append((time.time() - start, line.rstrip("\n")))
        proc.wait()
    finally:
        timer.cancel()
    end = time.time() - start
    output = "\n".join(line for _, line in line_times)
    if end >= timeout_s:
        output += f"\n[runner] killed after {timeout_s} s\n"
    return Result(proc.returncode, output, end, line_times, end)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
