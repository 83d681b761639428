"""Stopping on SIGTERM/SIGINT the way Kubernetes and a terminal send them, for the services' loops.

The first signal sets `requested` (the loop finishes what it holds, saves or commits, and returns);
a second one kills at once. Handlers are installed only in the main thread and restored on exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class StopOnSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, what_happens: str, announce: Callable[[str], None] = log.warning):
        self.what_happens = what_happens  # e.g. "stopping after the current step"
        self.announce = announce
        self.requested = threading.Event()
        self.signum = 0
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.requested.set()
        self.announce(f"{signal.Signals(signum).name}: {self.what_happens} (send it again to kill)")

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
