"""One retry policy for infrastructure calls (S3, Kafka, engines, judges), built on tenacity.

Exponential backoff with jitter, a log line per backoff step naming what failed, and an optional
deadline. Whether an exception is worth retrying is the caller's decision (`retry_if`): bad data
never is (see `offdpo.errors`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")
log = logging.getLogger(__name__)


def policy(
    what: str,
    *,
    retry_if: Callable[[BaseException], bool],
    max_s: float | None = None,
    initial_s: float = 0.2,
    max_delay_s: float = 10.0,
    stop: threading.Event | None = None,
    logger: logging.Logger = log,
) -> tenacity.Retrying:
    """A `tenacity.Retrying` for `what`: backoff `initial_s` doubling up to `max_delay_s`, with jitter.

    `max_s` bounds the total time (None: for as long as it takes); a set `stop` event ends the
    retries at the next step (the last exception is re-raised). Use as `policy(...)(fn)` or with
    `for attempt in policy(...): with attempt: ...`.
    """
    stops: list[tenacity.stop.stop_base] = [tenacity.stop_never if max_s is None else tenacity.stop_after_delay(max_s)]
    sleep: Callable[[float], None] = tenacity.nap.sleep
    if stop is not None:
        stops.append(tenacity.stop_when_event_set(stop))

        def sleep(seconds: float) -> None:  # wakes as soon as `stop` is set
            stop.wait(seconds)

    def log_step(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s failed (%s: %s); retry %d in %.1f s",
            what,
            type(exc).__name__,
            exc,
            state.attempt_number,
            state.next_action.sleep if state.next_action else 0.0,
        )

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=tenacity.wait_exponential_jitter(multiplier=initial_s, max=max_delay_s, jitter=initial_s),
        stop=tenacity.stop_any(*stops),
        before_sleep=log_step,
        sleep=sleep,
        reraise=True,
    )


def call(what: str, fn: Callable[[], T], **kwargs) -> T:
    """Run `fn` under `policy(what, **kwargs)`."""
    return policy(what, **kwargs)(fn)
