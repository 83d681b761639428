"""refscore's domain errors: `offdpo.errors` classes, so each carries its gRPC status and dead-letter type.

The server's error interceptor answers with `exc.grpc_status`; the stream worker dead-letters with
`exc.error_type`. Neither reads the message, which only says what is wrong and what to fix.
"""

from __future__ import annotations

import copy
import math
from typing import Self

import grpc

from offdpo import errors


class RefscoreError(errors.OffdpoError):
    """An error refscore raises itself. Sets no class attributes: the `offdpo.errors` class next to it
    in each subclass's bases decides the status and dead-letter type."""

    def at(self, where: str) -> Self:
        """The same error, its message prefixed with where it happened (an item, a pair, a request)."""
        located = copy.copy(self)
        located.args = (f"{where}: {self}",)
        return located

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC trailing metadata sent with the status (none unless a subclass has a hint)."""
        return ()


class InvalidArgument(RefscoreError, errors.BadInput):
    """The request is malformed (no items, a bad parameter)."""


class TooLarge(RefscoreError, errors.TooLarge):
    """The request is over a configured limit (items or tokens per request)."""


class NotReady(RefscoreError, errors.Unavailable):
    """The engine is loading, failed to load or is shutting down."""


class FingerprintMismatch(RefscoreError, errors.FingerprintMismatch):
    """The caller expects scores from another reference model than this server's."""


class DeadlineExceeded(RefscoreError, errors.DeadlineExceeded):
    """The caller's deadline passed while its job waited for the engine."""


class TokenizationError(RefscoreError, errors.TokenizationError):
    """The input cannot be tokenised as asked; the message says why."""


class TooLong(TokenizationError, errors.TooLong):
    """Prompt plus answer do not fit the model's context."""


class QuotaExceeded(RefscoreError):
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
