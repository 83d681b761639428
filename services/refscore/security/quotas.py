"""Per-team quotas: concurrent requests, and prompt+answer tokens per minute (a token bucket whose
capacity is one minute's tokens)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.refscore import metrics
from services.refscore.errors import QuotaExceeded
from services.refscore.security.auth import Team

CONCURRENCY_RETRY_S = 0.5


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # team -> (level, at)

    def acquire(self, team: Team) -> None:
        with self._lock:
            n = self._in_flight.get(team.name, 0)
            if team.max_concurrent and n >= team.max_concurrent:
                raise QuotaExceeded(
                    f"team {team.name!r} already has {n} requests in flight, its limit is "
                    f"{team.max_concurrent}; retry after {CONCURRENCY_RETRY_S:.1f} s or send fewer at once",
                    CONCURRENCY_RETRY_S,
                )
            self._in_flight[team.name] = n + 1
        metrics.CALLER_IN_FLIGHT.labels(team.name).set(n + 1)

    def release(self, team: Team) -> None:
        with self._lock:
            n = max(0, self._in_flight.get(team.name, 0) - 1)
            self._in_flight[team.name] = n
        metrics.CALLER_IN_FLIGHT.labels(team.name).set(n)

    def charge(self, team: Team, tokens: int) -> None:
        """Take `tokens` from the team's bucket, or raise QuotaExceeded with when to retry."""
        rate = team.tokens_per_minute
        if not rate:
            return
        if tokens > rate:
            raise QuotaExceeded(
                f"the request has {tokens} tokens, more than team {team.name!r}'s quota of {rate} "
                f"tokens per minute: split it"
            )
        with self._lock:
            now = self._clock()
            level, at = self._buckets.get(team.name, (float(rate), now))
            level = min(float(rate), level + (now - at) * rate / 60.0)
            if level < tokens:
                self._buckets[team.name] = (level, now)
                wait = (tokens - level) * 60.0 / rate
                raise QuotaExceeded(
                    f"team {team.name!r} is over its quota of {rate} tokens per minute "
                    f"(this request: {tokens}); retry after {wait:.1f} s",
                    wait,
                )
            self._buckets[team.name] = (level - tokens, now)
