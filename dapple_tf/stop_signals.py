"""Stop training cleanly on SIGINT / SIGTERM: the signal is noted, and the training loop stops
at the next step boundary with a checkpoint (dapple_tf.runner). A second signal while the
first is pending gets the default action (Ctrl-C twice: KeyboardInterrupt at once)."""
from __future__ import annotations

import signal
import threading
from typing import Self

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set `received` (the signal number)
    instead of ending the process. Outside the main thread it installs nothing (Python only
    delivers signals there)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:
        self.received = signum
        for s, handler in self._previous.items():  # the next signal acts as it did before
            signal.signal(s, handler)
