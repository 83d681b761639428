"""When to retry a failed call, and how long to wait first.

refscore answers UNAVAILABLE while a model loads, while it drains for a restart, and when a replica
is gone; it answers RESOURCE_EXHAUSTED for a team over its quota, with trailing metadata
`retry-after-ms` (how long until the quota admits the request), and also for requests that can never
succeed (over the size limits, more tokens than the quota holds), without a hint. So: UNAVAILABLE is
retried with exponential backoff (or the server's hint, if it sends one); RESOURCE_EXHAUSTED only
when the server sent a hint, after that hint. Nothing is retried past the call's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts the first call (1 = never retry). Backoff before retry n (n = 1, 2, ...):
    initial_backoff_s * multiplier**(n-1), capped at max_backoff_s, of which a random half is waited
    (so that many clients that failed together do not retry together). A server hint longer than
    `max_hint_s` is not waited for: the error is raised at once."""

    max_attempts: int = 6
    initial_backoff_s: float = 0.25
    multiplier: float = 2.0
    max_backoff_s: float = 15.0
    max_hint_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy: backoffs must be >= 0 and multiplier >= 1")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after_s(error: grpc.RpcError) -> Optional[float]:
    """The server's hint (trailing metadata `retry-after-ms`) in seconds, if it sent a valid one."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # noqa: BLE001 - an error without call metadata has no hint
        return None
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = float(value.decode("ascii") if isinstance(value, bytes) else value)
            except ValueError:
                return None
            return ms / 1000.0 if ms >= 0 else None
    return None


def delay_before_retry(
    policy: RetryPolicy, error: grpc.RpcError, attempt: int, remaining_s: Optional[float], rng: random.Random
) -> Optional[float]:
    """Seconds to wait before attempt `attempt + 1`, or None: raise `error` now.
    `remaining_s`: time left before the call's deadline (None: no deadline)."""
    if attempt >= policy.max_attempts:
        return None
    code = error.code() if callable(getattr(error, "code", None)) else None
    hint = retry_after_s(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        delay = hint if hint is not None else policy.backoff_s(attempt, rng)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None:
        delay = hint
    else:
        return None
    if hint is not None and hint > policy.max_hint_s:
        return None
    if remaining_s is not None and delay >= remaining_s:
        return None  # the retry could not finish before the deadline
    return delay
