"""A small process per rank that speaks for the rank when the rank itself can no longer speak.

When a rank dies (SIGKILL, a crash), Gloo sees the closed connection and Horovod aborts every
other rank at once (SIGABRT from its background thread), and the launcher stops what is left:
no Python code of the survivors runs again, so no watchdog thread can explain anything. So
each rank starts this script (rank_failures.Watchdog.start) as a child process, with only the
standard library (it starts in milliseconds and imports neither TensorFlow nor dapple_tf),
reading a pipe from the rank:

  * first line: JSON {"rank", "size", "directory", "pid", "started", "shared": {peer: "names,
    ..."}} (the heartbeat folder of rank_failures.Watchdog, when the rank started its watchdog,
    and the collectives this rank shares with each peer);
  * then at most one line: "done" (the rank ends normally or through the watchdog's own
    report): exit silently.

End of the pipe without "done" means the rank's process ended abruptly. The monitor then
  1. records `<directory>/rank<r>.ended.json` with the time it saw the end;
  2. waits SETTLE_S for the monitors of the other ranks to record theirs;
  3. prints, on the rank's stderr (the launcher tags it with the rank), which rank ended first
     (the cause: a killed rank ends before the ranks Horovod aborts because of it), that
     rank's last heartbeat (step, phase, pid), this rank's step, and the collectives this rank
     shares with it, i.e. what it was waiting for.
A SIGTERM (the launcher stopping this rank while its process is still alive) reports the same
way at once. Lines start with "dapple: rank <r>:".

Usage (rank_failures.Watchdog does this): python -I exit_monitor.py  < pipe from the rank
"""

import json
import os
import signal
import sys
import time

SETTLE_S = 1.5
ABRUPT, WATCHDOG = "abrupt", "watchdog"


def ended_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.ended.json")


def record_end(directory: str, rank: int, pid: int, how: str, when: float) -> None:
    """Write this rank's end marker (atomically; errors ignored: a report must not fail)."""
    path = ended_path(directory, rank)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"rank": rank, "pid": pid, "how": how, "time": when}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report(setup: dict, now: float, why: str) -> str:
    """The message for rank setup["rank"], from the end markers and heartbeats in the folder."""
    rank, directory = setup["rank"], setup["directory"]
    ends = {}
    for k in range(setup["size"]):
        marker = _read_json(ended_path(directory, k))
        if marker is not None and marker["time"] >= setup.get("started", 0.0):
            ends[k] = marker  # older ones are left over from an earlier job
    mine = _read_json(os.path.join(directory, f"rank{rank}.json")) or {}
    step = mine.get("step", "?")
    head = f"dapple: rank {rank}:"
    lines = [f"{head} {why} during step {step} ({mine.get('phase', '?')})"]
    watchdog_times = [m["time"] for m in ends.values() if m["how"] == WATCHDOG]
    first_report = min(watchdog_times) if watchdog_times else float("inf")
    abrupt = sorted(
        (m["time"], k) for k, m in ends.items() if m["how"] == ABRUPT and m["time"] < first_report
    )
    if watchdog_times and (not abrupt or first_report < abrupt[0][0]):
        reporters = sorted(k for k, m in ends.items() if m["how"] == WATCHDOG)
        lines.append(
            f"{head} the job was stopped after the watchdog of rank(s) {reporters} "
            f"reported missing ranks (see their messages)"
        )
    elif not abrupt:
        lines.append(f"{head} no rank is recorded as ended abruptly in {directory}")
    else:
        first_time, first = abrupt[0]
        if first == rank:
            lines.append(
                f"{head} this rank (process {setup['pid']}) ended abruptly first "
                f"(killed by a signal, or crashed)"
            )
        else:
            beat = _read_json(os.path.join(directory, f"rank{first}.json")) or {}
            lines.append(
                f"{head} rank {first} died first: its process {beat.get('pid', '?')} on "
                f"{beat.get('host', '?')} ended {now - first_time:.1f} s ago (last at "
                f"step {beat.get('step', '?')}, {beat.get('phase', '?')})"
            )
            shared = setup["shared"].get(str(first), "(none)")
            lines.append(
                f"{head} rank {rank} was waiting on rank {first} in step {step}: the "
                f"collectives it shares with rank {first}: {shared}"
            )
        later = [k for _, k in abrupt[1:] if k != rank]
        if later:
            lines.append(
                f"{head} also ended after it: ranks {later} (aborted by Horovod or "
                f"stopped by the launcher)"
            )
    lines.append(f"{head} re-run with the same model directory to resume from the last checkpoint")
    return "\n".join(lines)


def _another_rank_ended(setup: dict, now: float) -> bool:
    """Whether another rank of this job already recorded an abrupt end before `now`: the first
    death is then known, and the report goes out at once (a launcher that stops this rank
    also stops reading its output within a second)."""
    for k in range(setup["size"]):
        if k == setup["rank"]:
            continue
        marker = _read_json(ended_path(setup["directory"], k))
        if (
            marker is not None
            and marker["how"] == ABRUPT
            and setup.get("started", 0.0) <= marker["time"] <= now
        ):
            return True
    return False


class _Stopped(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stopped()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the rank exits normally and says so
    signal.signal(signal.SIGTERM, _on_sigterm)
    stdin = sys.stdin.buffer
    try:
        first = stdin.readline()
        if not first:
            return 0
        setup = json.loads(first)
        rest = stdin.readline()
        if rest.strip() == b"done":
            return 0
        why = "this rank's process ended abruptly"
    except _Stopped:
        if "setup" not in locals():
            return 0
        why = "the launcher is stopping this rank"
    now = time.time()
    record_end(setup["directory"], setup["rank"], setup["pid"], ABRUPT, now)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the report
    if not _another_rank_ended(setup, now):
        time.sleep(SETTLE_S)  # give the monitors of the other ranks time to record their end
    print(report(setup, time.time(), why), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
