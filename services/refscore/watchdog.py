"""The watchdog: a refscore process whose engine thread or stream-worker thread is dead or stuck must
not stay up looking healthy.

Both threads are daemons doing their work in loops; neither failure is visible from outside: gRPC
health would still say SERVING, the stream would stop, and Kubernetes would keep the pod. The
watchdog looks at them about once a second:

- the engine thread is dead (it ends only on shutdown), or has been inside one engine call for
  longer than `stall_s` (a hung engine: nothing else ever times that call out);
- the stream worker thread is dead while no stop was asked for, or has not come round its loop
  (`Heartbeat.beat`) for longer than `stall_s`. The worker beats every poll, every retry of a batch
  and every second while it waits for the engine, so only a thread stuck somewhere goes quiet.

`problem()` says which, in words. The entry point (`__main__`) then sets health NOT_SERVING and
exits 1 so the pod is restarted; a restarted process redoes the uncommitted batch from Kafka's
committed offsets, so nothing is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from offdpo.health import NOT_SERVING, LoopHealth


class Heartbeat:
    """When a loop last came round. `beat` is one float store, safe to call from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.last = clock()
        # Since when every batch has failed because the engine fails (not the data), and why; None while
        # batches succeed. A loop that keeps beating while it retries a broken engine is not stuck, but
        # it is not working either: the watchdog restarts the process after stall_s of it.
        self.failing_since: float | None = None
        self.failing_reason = ""

    def beat(self) -> None:
        self.last = self._clock()

    def failing(self, reason: str) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock()
        self.failing_reason = reason

    def working(self) -> None:
        self.failing_since = None

    def failing_s(self, now: float | None = None) -> float:
        if self.failing_since is None:
            return 0.0
        return (self._clock() if now is None else now) - self.failing_since

    def age(self, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - self.last


class EngineState(Protocol):
    """What the watchdog reads of the scorer (services.refscore.scorer.Scorer has these)."""

    @property
    def stopping(self) -> bool: ...

    def engine_alive(self) -> bool: ...

    def engine_busy_s(self, now: float | None = None) -> float: ...


@dataclass(frozen=True)
class Problem:
    """A thread that is dead (`stalled` False) or alive but making no progress (`stalled` True). A
    dead thread lets the process stop in order; a stuck one can block any orderly stop."""

    what: str
    stalled: bool

    def __str__(self) -> str:
        return self.what


class Watchdog:
    def __init__(
        self,
        scorer: EngineState,
        stall_s: float,
        worker_thread: threading.Thread | None = None,
        worker_beat: Heartbeat | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.scorer = scorer
        self.stall_s = stall_s
        self.worker_thread = worker_thread
        self.worker_beat = worker_beat
        self._clock = clock
        self._stopping = False

    def stopping(self) -> None:
        """An orderly stop has begun: threads ending now are not failures."""
        self._stopping = True

    def problem(self) -> Problem | None:
        if self._stopping or self.scorer.stopping:
            return None
        now = self._clock()
        if not self.scorer.engine_alive():
            return Problem("the engine thread died (traceback above)", stalled=False)
        busy = self.scorer.engine_busy_s(now)
        if busy > self.stall_s:
            return Problem(
                f"the engine has been inside one call for {busy:.0f} s (OFFDPO_REFSCORE_STALL_S={self.stall_s:g})",
                stalled=True,
            )
        if self.worker_thread is not None and not self.worker_thread.is_alive():
            return Problem("the stream worker stopped unexpectedly (traceback above)", stalled=False)
        if self.worker_beat is not None and self.worker_beat.failing_s(now) > self.stall_s:
            return Problem(
                f"the stream worker's engine has failed every batch for {self.worker_beat.failing_s(now):.0f} s "
                f"(OFFDPO_REFSCORE_STALL_S={self.stall_s:g}): {self.worker_beat.failing_reason}",
                stalled=False,
            )
        if self.worker_beat is not None and self.worker_beat.age(now) > self.stall_s:
            return Problem(
                f"the stream worker has not come round its loop for {self.worker_beat.age(now):.0f} s "
                f"(OFFDPO_REFSCORE_STALL_S={self.stall_s:g})",
                stalled=True,
            )
        return None


class WorkerHealth(LoopHealth):
    """grpc.health.v1 for `worker` mode, which serves no API and so had no probe: NOT_SERVING while
    the engines load (`watchdog` unset), whenever the watchdog names a problem (the process is about
    to exit 1 and be restarted), and once a stop has begun; otherwise SERVING."""

    def __init__(self) -> None:
        super().__init__("offdpo.v1.RefScore", stale_after_s=0.0)
        self.watchdog: Watchdog | None = None

    def status(self) -> int:
        if self.watchdog is None or self.watchdog.problem() is not None:
            return NOT_SERVING
        return super().status()
