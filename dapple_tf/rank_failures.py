"""What a rank of a multi-rank job does when another rank is lost. Every collective it creates
is recorded with the ranks it waits for (`CollectiveLog`); its `Watchdog` writes heartbeats
and turns a wait for a hung or frozen rank into an exit with status EXIT_PEER_LOST that names
the missing rank(s) and the collectives shared with them; `explain_collective_failure` words a
step's failed collective (raised as `PeerLostError`).

Horovod 0.28.1 + Gloo facts this module is built around (measured, see tests/multirank/): a rank
that dies makes Horovod abort (SIGABRT) on the others at once: its shutdown tries to negotiate
the removal of every process set with the dead rank and throws, so no Python code of theirs
runs again; each rank's exit monitor (exit_monitor.py) then names the rank that died first and
what its rank waited for (measured with 2 ranks, where the global set is the only one, Horovod
kept the survivor alive: its Watchdog names the dead rank); a rank that hangs or freezes makes
the others wait, which the Watchdog turns into an exit with status EXIT_PEER_LOST within
DAPPLE_PEER_TIMEOUT_S seconds, naming the rank and the collectives shared with it.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterable, Sequence

from . import comm, exit_monitor
from .process_sets import rank_group

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: re-running with the same model_dir resumes from the checkpoint
DEFAULT_PEER_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    ranks: tuple[int, ...]


class CollectiveLog:
    """Every collective this rank created, with the ranks it waits for (for stall reports)."""

    def __init__(self):
        self._items: list[Collective] = []
        self._lock = threading.Lock()

    def add(self, name: str, ranks: Iterable[int]) -> None:
        with self._lock:
            self._items.append(Collective(name, rank_group(ranks)))

    def shared_with(self, rank: int) -> list[str]:
        with self._lock:
            return [c.name for c in self._items if rank in c.ranks]


def shared_heartbeat_dir(preferred: str | None = None) -> tuple[str, bool]:
    """(directory, chosen here) : a directory every rank agrees on (rank 0 chooses it), and
    whether it is a temporary one of this job (to be removed at the end). Heartbeats of ranks
    on other hosts are only visible when it lies on a shared filesystem: set
    DAPPLE_HEARTBEAT_DIR (or pass `preferred`, e.g. a folder in the model directory) for
    multi-host jobs."""
    hvd = comm.horovod()
    choice = None
    if hvd.rank() == 0:
        given = preferred or os.environ.get("DAPPLE_HEARTBEAT_DIR")
        choice = (
            (given, False)
            if given
            else (
                os.path.join(tempfile.gettempdir(), f"dapple-heartbeat-{uuid.uuid4().hex[:12]}"),
                True,
            )
        )
    directory, temporary = comm.broadcast_object(choice, name="dapple.heartbeat_dir")
    os.makedirs(directory, exist_ok=True)
    return directory, temporary


GONE_CHECKS_PER_BEAT = 5


class Watchdog:
    """Heartbeats of one rank, and a bounded wait for the others.

    A thread writes `<directory>/rank<k>.json` every `interval_s` with this rank's step and
    phase ("run" inside a step, "idle" between steps). While this rank is inside step s it
    checks the others: a rank whose heartbeat is older than `peer_timeout_s`, or that has not
    entered step s although this rank has waited in it for `peer_timeout_s`, is missing; a step
    longer than `step_timeout_s` also ends the wait. Then it prints which ranks are missing, the
    collectives this rank shares with them, and exits with EXIT_PEER_LOST (after a short grace
    so that the other waiting ranks can report too).

    `start()` also starts this rank's exit monitor (exit_monitor.py), a child process that
    reports which rank died first and what this rank waited for when this rank's process ends
    abruptly (Horovod aborts the survivors of a killed rank before any of their Python code
    runs again); `stop()`, a normal interpreter exit and the watchdog's own exit dismiss it."""

    def __init__(
        self,
        rank: int,
        size: int,
        directory: str,
        log: CollectiveLog,
        peer_timeout_s: float | None = None,
        step_timeout_s: float | None = None,
        interval_s: float = 1.0,
        exit_fn: Callable[[int], None] = os._exit,
    ):
        self.rank, self.size, self.directory, self.log = rank, size, directory, log
        self.peer_timeout_s = float(
            peer_timeout_s
            if peer_timeout_s is not None
            else os.environ.get("DAPPLE_PEER_TIMEOUT_S", DEFAULT_PEER_TIMEOUT_S)
        )
        self.step_timeout_s = float(
            step_timeout_s if step_timeout_s is not None else comm.step_timeout_s()
        )
        self.interval_s = interval_s
        self._exit = exit_fn
        self._host = socket.gethostname()
        self._step, self._phase, self._since = -1, "idle", time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dapple-watchdog-{rank}", daemon=True
        )
        self._monitor: subprocess.Popen | None = None
        gloo = float(os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "30"))
        if gloo <= self.peer_timeout_s:
            print(
                f"dapple: warning: HOROVOD_GLOO_TIMEOUT_SECONDS={gloo:g} is not above "
                f"DAPPLE_PEER_TIMEOUT_S={self.peer_timeout_s:g}: Gloo may abort before the "
                f"watchdog can name a missing rank",
                file=sys.stderr,
                flush=True,
            )

    def start(self) -> "Watchdog":
        self._beat()
        self._start_exit_monitor()
        self._thread.start()
        return self

    def stop(self, remove_directory: bool = False) -> None:
        """Stop beating (last state "done"); `remove_directory`: delete the heartbeat folder
        (rank 0 of a job whose folder was temporary; late writes of others are ignored)."""
        with self._lock:
            self._phase, self._since = "done", time.time()
        self._stop.set()
        self._beat()
        self._dismiss_exit_monitor()
        if remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _start_exit_monitor(self) -> None:
        try:  # an end recorded by an earlier job in the same folder is not news
            os.remove(exit_monitor.ended_path(self.directory, self.rank))
        except OSError:
            pass
        setup = {
            "rank": self.rank,
            "size": self.size,
            "directory": self.directory,
            "pid": os.getpid(),
            "started": time.time(),
            "shared": {
                str(k): _abbreviate(self.log.shared_with(k))
                for k in range(self.size)
                if k != self.rank
            },
        }
        # -I keeps the script's folder off sys.path (dapple_tf/profile.py would shadow the
        # standard library's profile module).
        self._monitor = subprocess.Popen(
            [sys.executable, "-I", exit_monitor.__file__], stdin=subprocess.PIPE
        )
        self._monitor.stdin.write((json.dumps(setup) + "\n").encode())
        self._monitor.stdin.flush()
        atexit.register(self._dismiss_exit_monitor)

    def _dismiss_exit_monitor(self) -> None:
        """Tell the exit monitor this rank ends knowingly (it exits without a report)."""
        with self._lock:  # the watchdog thread and atexit may both get here
            monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.stdin.write(b"done\n")
            monitor.stdin.close()
            monitor.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def step_begin(self, step: int) -> None:
        with self._lock:
            self._step, self._phase, self._since = step, "run", time.time()
        self._beat()

    def step_end(self, step: int) -> None:
        with self._lock:
            self._step, self._phase, self._since = step, "idle", time.time()
        self._beat()

    # ---- internals ----
    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank{rank}.json")

    def _beat(self) -> None:
        with self._lock:
            state = {
                "rank": self.rank,
                "pid": os.getpid(),
                "host": self._host,
                "step": self._step,
                "phase": self._phase,
                "since": self._since,
                "time": time.time(),
            }
        tmp = self._path(self.rank) + f".tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self._path(self.rank))
        except OSError:
            pass  # a full or vanished disk must not kill training; peers will see us as stale

    def _read(self, rank: int) -> dict | None:
        try:
            with open(self._path(rank)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _run(self) -> None:
        # Checks run GONE_CHECKS_PER_BEAT times per heartbeat: a peer process gone from this
        # host is named within a fraction of a second, before a launcher that saw it die stops
        # this rank (horovodrun does within about half a second).
        ticks = 0
        while not self._stop.wait(self.interval_s / GONE_CHECKS_PER_BEAT):
            ticks += 1
            if ticks % GONE_CHECKS_PER_BEAT == 0:
                self._beat()
            problem = self.check(time.time())
            if problem:
                print(problem, file=sys.stderr, flush=True)
                exit_monitor.record_end(
                    self.directory, self.rank, os.getpid(), exit_monitor.WATCHDOG, time.time()
                )
                self._dismiss_exit_monitor()
                # Let the other waiting ranks report too: our exit makes Horovod abort them.
                time.sleep(max(2 * self.interval_s, 3.0))
                self._exit(EXIT_PEER_LOST)
                return

    def missing_ranks(self, now: float) -> dict[int, str]:
        """Ranks this rank is waiting for in its current step, with the reason."""
        with self._lock:
            step, phase, since = self._step, self._phase, self._since
        if phase != "run":
            return {}
        waited = now - since
        missing = {}
        for k in range(self.size):
            if k == self.rank:
                continue
            hb = self._read(k)
            if hb is None:
                if waited > self.peer_timeout_s:
                    missing[k] = f"no heartbeat in {self.directory} (not a shared folder?)"
                continue
            age = now - hb["time"]
            gone = hb["host"] == self._host and not _pid_alive(hb["pid"])
            if gone:
                missing[k] = (
                    f"process {hb['pid']} on {hb['host']} is gone (last at step {hb['step']})"
                )
            elif age > self.peer_timeout_s:
                missing[k] = (
                    f"no heartbeat for {age:.1f} s (frozen or unreachable; last at "
                    f"step {hb['step']}, {hb['phase']}) on {hb['host']} pid {hb['pid']}"
                )
            elif (
                waited > self.peer_timeout_s
                and (hb["step"] < step or hb["phase"] != "run")
                and not (hb["step"] > step)
            ):
                missing[k] = (
                    f"alive but has not entered step {step} for {now - hb['since']:.1f} s "
                    f"(at step {hb['step']}, {hb['phase']}) on {hb['host']} pid {hb['pid']}"
                )
        return missing

    def check(self, now: float) -> str | None:
        """The report to print if this rank should stop waiting now, else None."""
        with self._lock:
            step, phase, since = self._step, self._phase, self._since
        if phase != "run":
            return None
        missing = self.missing_ranks(now)
        waited = now - since
        if not missing and waited <= self.step_timeout_s:
            return None
        lines = [
            f"dapple: rank {self.rank}: step {step} has waited {waited:.1f} s for its collectives"
        ]
        if missing:
            for k, why in sorted(missing.items()):
                shared = self.log.shared_with(k)
                lines.append(f"dapple: rank {self.rank}: missing rank {k}: {why}")
                lines.append(
                    f"dapple: rank {self.rank}: collectives rank {self.rank} waits on with "
                    f"rank {k}: {_abbreviate(shared)}"
                )
        else:
            lines.append(
                f"dapple: rank {self.rank}: no rank looks missing, but the step exceeded "
                f"DAPPLE_STEP_TIMEOUT_S={self.step_timeout_s:g}"
            )
        lines.append(
            f"dapple: rank {self.rank}: exiting with status {EXIT_PEER_LOST}; re-run with "
            f"the same model directory to resume from the last checkpoint"
        )
        return "\n".join(lines)


class PeerLostError(RuntimeError):
    """A step's collective failed because another rank is gone (Horovod shut down)."""


def explain_collective_failure(watchdog: "Watchdog", error: Exception, step: int) -> str:
    """The message for a Horovod error inside a step: the collective this rank waited on (the
    failed node) and the ranks that look missing by their heartbeats."""
    op = getattr(getattr(error, "op", None), "name", None) or "(unknown collective)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # A peer process gone from this host is named at once (the launcher may stop this rank
    # within a second); otherwise let a dead or frozen peer's heartbeat go stale first (the
    # other survivors wait here too, so they still beat while we look).
    missing = _peers_missing(watchdog, time.time(), only_gone=True)
    if not missing:
        time.sleep(2.5 * watchdog.interval_s)
        missing = _peers_missing(watchdog, time.time())
    who = (
        "; ".join(f"rank {k}: {why}" for k, why in sorted(missing.items()))
        or "no rank looks missing by its heartbeat (another host, or an error on a peer)"
    )
    return (
        f"dapple: rank {watchdog.rank}: step {step}: collective '{op}' failed: {first_line}\n"
        f"dapple: rank {watchdog.rank}: missing: {who}\n"
        f"dapple: rank {watchdog.rank}: re-run with the same model directory to resume from "
        f"the last checkpoint"
    )


def _peers_missing(watchdog: "Watchdog", now: float, only_gone: bool = False) -> dict[int, str]:
    """Peers whose process is gone from this host, finished, or (unless `only_gone`) silent."""
    missing = {}
    for k in range(watchdog.size):
        if k == watchdog.rank:
            continue
        hb = watchdog._read(k)
        if hb is None:
            continue
        if hb["host"] == watchdog._host and not _pid_alive(hb["pid"]):
            missing[k] = f"process {hb['pid']} is gone (last at step {hb['step']}, {hb['phase']})"
        elif only_gone:
            continue
        elif hb["phase"] == "done":
            missing[k] = f"finished training at step {hb['step']}"
        elif now - hb["time"] > 2 * watchdog.interval_s:
            missing[k] = f"no heartbeat for {now - hb['time']:.1f} s (last at step {hb['step']})"
    return missing


def _abbreviate(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
