"""Outage vs bad data: a shard that cannot be fetched because of the infrastructure (S3 unreachable,
any S3 error but NoSuchKey, errors.Unavailable, ...) is never dead-lettered: progress on that event
stops and the fetch is retried with backoff for as long as it takes (`offdpo.retry`), each step
logged and counted (`InfraStatus`, exported to Prometheus by metrics.py); a stop signal ends the
wait. Only data that is itself wrong becomes a dead letter: an undecodable event, a corrupt or
schema-invalid shard, a fingerprint mismatch, an object the event promised that does not exist, an
over-long record, poisoned values (token ids outside the vocabulary, non-finite log-probs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from offdpo import errors, retry

log = logging.getLogger(__name__)
T = TypeVar("T")


# -- infrastructure vs bad data ---------------------------------------------------------------------
_MISSING_CODES = ("NoSuchKey", "NoSuchObject", "NotFound")


def _is_missing(exc: BaseException) -> bool:
    """An object that is not there: S3's NoSuchKey, or a mapping's KeyError (the in-memory stores)."""
    return getattr(exc, "code", None) in _MISSING_CODES or isinstance(exc, KeyError)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether a failure to fetch a shard is the infrastructure's fault (retried, never dead-lettered).

    Everything that is not positively bad data counts: S3 unreachable, any S3 error code but a
    missing key (AccessDenied after a credential rotation, RequestTimeTooSkewed, 5xx), connection
    errors, errors.Unavailable, and errors nobody anticipated. Wrongly retrying bad data stalls a
    partition visibly (a log line per step, a metric); wrongly dead-lettering an outage loses the
    shard silently, since nothing replays dead letters on its own."""
    if isinstance(exc, errors.OffdpoError):
        return exc.retryable
    return not _is_missing(exc)


# How often an idle stream trainer asks the broker whether it is there, and how long it waits for it.
KAFKA_PROBE_EVERY_S = 10.0
KAFKA_PROBE_TIMEOUT_MS = 3000


@dataclass
class InfraStatus:
    """What the sources report about infrastructure trouble (read by metrics.py at scrape time)."""

    errors_total: int = 0  # failed attempts, counted over the run
    backoff_s: float = 0.0  # the backoff in progress (0: not waiting on the infrastructure)
    waiting_since: float | None = None  # monotonic time the current wait started
    what: str = ""  # what is being retried
    # The clock of waiting_since; the trainer's readiness (offdpo.health) reads it with the same clock,
    # and tests inject one they move.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def failed(self, what: str, exc: BaseException | None, delay: float) -> None:
        self.errors_total += 1
        self.backoff_s = delay
        self.what = what
        if self.waiting_since is None:
            self.waiting_since = self.clock()
        waited = self.clock() - self.waiting_since
        log.warning(
            "%s failed (%s: %s): infrastructure, not bad data; not moving past it, retry in %.1f s "
            "(waiting %.0f s so far)",
            what,
            type(exc).__name__,
            exc,
            delay,
            waited,
        )

    def recovered(self) -> None:
        if self.waiting_since is not None:
            log.info("%s succeeded after %.0f s of retries", self.what, self.clock() - self.waiting_since)
        self.backoff_s, self.waiting_since, self.what = 0.0, None, ""


class Interrupted(Exception):
    """A stop was requested while waiting for the infrastructure: the input in hand is not done."""


def until_done(
    what: str, fn: Callable[[], T], status: InfraStatus, stop: threading.Event | None, max_delay_s: float = 30.0
) -> T:
    """`fn()`, retried with backoff while it fails for infrastructure reasons, for as long as it
    takes. Bad data (BadInput) is raised at once. A set `stop` ends the wait with Interrupted."""
    attempts = retry.policy(
        what, retry_if=is_infrastructure, max_s=None, max_delay_s=max_delay_s, stop=stop, logger=log
    )

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        status.failed(what, exc, state.next_action.sleep if state.next_action else 0.0)

    try:
        out = attempts.copy(before_sleep=before_sleep)(fn)
    except Exception as exc:
        if stop is not None and stop.is_set() and is_infrastructure(exc):
            raise Interrupted(f"stopped while retrying {what}") from exc
        if not is_infrastructure(exc):
            status.recovered()  # the infrastructure answered (with bad data): the outage is over
        raise
    status.recovered()
    return out
