"""Per-team quotas: concurrent requests, and tokens per minute (a token bucket whose capacity is one
minute's tokens), held in each process and split over the service's replicas.

Across replicas: with `replicas` = N (the autoscaler's maximum, e.g. OFFDPO_REFSCORE_REPLICAS), each
process enforces 1/N of every team's quota: a bucket of tokens_per_minute/N filling at
tokens_per_minute/N per minute, and max(1, floor(max_concurrent/N)) concurrent requests. However many
replicas are live (at most N) and however a load balancer spreads a team's calls, the team is
admitted at most tokens_per_minute tokens in any minute plus tokens_per_minute per minute after
it, all replicas together (exactly a single bucket's bound), and at most max(max_concurrent, N)
requests in flight. The price: with fewer than N replicas live a team gets only live/N of its quota.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import grpc

from offdpo.errors import OffdpoError
from offdpo.grpc_auth.auth import Team

CONCURRENCY_RETRY_S = 0.5


class QuotaExceeded(OffdpoError):
    """A team is over its concurrency or tokens-per-minute quota. `retry_after_s` (when waiting can
    help) goes to the caller as trailing metadata `retry-after-ms`."""

    error_type = "quota_exceeded"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000)))),)


class Quotas:
    """`replicas`: how many processes share every team's quota (each enforces 1/replicas of it).
    `on_in_flight(team, n)`: told a team's requests in flight after each change (a metrics gauge)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        replicas: int = 1,
        on_in_flight: Callable[[str, int], None] | None = None,
    ):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self._clock = clock
        self._on_in_flight = on_in_flight
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # team -> (level, at)

    # -- this process's share ------------------------------------------------------------------
    def concurrency_share(self, team: Team) -> int:
        """Requests in flight this process admits for `team` (0 = unlimited)."""
        return max(1, team.max_concurrent // self.replicas) if team.max_concurrent else 0

    def rate_share(self, team: Team) -> float:
        """Tokens per minute this process admits for `team` (0 = unlimited)."""
        return team.tokens_per_minute / self.replicas

    def _of_replicas(self) -> str:
        return f" (this replica's share of {self.replicas})" if self.replicas > 1 else ""

    # -- concurrency ---------------------------------------------------------------------------
    def acquire(self, team: Team) -> None:
        limit = self.concurrency_share(team)
        with self._lock:
            n = self._in_flight.get(team.name, 0)
            if limit and n >= limit:
                raise QuotaExceeded(
                    f"team {team.name!r} already has {n} requests in flight, its limit is "
                    f"{limit}{self._of_replicas()}; retry after {CONCURRENCY_RETRY_S:.1f} s or send fewer at once",
                    CONCURRENCY_RETRY_S,
                )
            self._in_flight[team.name] = n + 1
        if self._on_in_flight:
            self._on_in_flight(team.name, n + 1)

    def release(self, team: Team) -> None:
        with self._lock:
            n = max(0, self._in_flight.get(team.name, 0) - 1)
            self._in_flight[team.name] = n
        if self._on_in_flight:
            self._on_in_flight(team.name, n)

    # -- tokens per minute ---------------------------------------------------------------------
    def _level(self, team: Team, rate: float, now: float) -> float:
        level, at = self._buckets.get(team.name, (rate, now))
        return min(rate, level + (now - at) * rate / 60.0)

    def check(self, team: Team) -> None:
        """Refuse at once a team whose bucket is empty: no work is done for a request that cannot
        be admitted (the exact charge follows once the request's size is known)."""
        rate = self.rate_share(team)
        if not rate:
            return
        with self._lock:
            level = self._level(team, rate, self._clock())
        if level < 1.0:
            wait = (1.0 - level) * 60.0 / rate
            raise QuotaExceeded(
                f"team {team.name!r} is over its quota of {team.tokens_per_minute} tokens per minute"
                f"{self._of_replicas()}; retry after {wait:.1f} s",
                wait,
            )

    def charge(self, team: Team, tokens: int) -> None:
        """Take `tokens` from the team's bucket, or raise QuotaExceeded with when to retry."""
        rate = self.rate_share(team)
        if not rate:
            return
        if tokens > rate:
            raise QuotaExceeded(
                f"the request has {tokens} tokens, more than team {team.name!r}'s quota of "
                f"{team.tokens_per_minute} tokens per minute{self._of_replicas()}: split it"
            )
        with self._lock:
            now = self._clock()
            level = self._level(team, rate, now)
            if level < tokens:
                self._buckets[team.name] = (level, now)
                wait = (tokens - level) * 60.0 / rate
                raise QuotaExceeded(
                    f"team {team.name!r} is over its quota of {team.tokens_per_minute} tokens per minute"
                    f"{self._of_replicas()} (this request: {tokens}); retry after {wait:.1f} s",
                    wait,
                )
            self._buckets[team.name] = (level - tokens, now)
