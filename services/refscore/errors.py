"""refscore's domain errors: `offdpo.errors` classes, so each carries its gRPC status and dead-letter type.

The server's error interceptor answers with `exc.grpc_status`; the stream worker dead-letters with
`exc.error_type`. Neither reads the message, which only says what is wrong and what to fix.
"""

from __future__ import annotations

import copy
from typing import Self

import grpc

from offdpo import errors
from offdpo.grpc_auth.quotas import QuotaExceeded

__all__ = [
    "DeadlineExceeded",
    "DuplicateReference",
    "FingerprintMismatch",
    "InvalidArgument",
    "ModelNotAllowed",
    "NotReady",
    "QuotaExceeded",  # the shared auth layer's (offdpo.grpc_auth), raised by refscore's quotas
    "RefscoreError",
    "TokenizationError",
    "TooLarge",
    "TooLong",
    "UnknownReference",
]


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


class UnknownReference(FingerprintMismatch):
    """A pair names a reference (`PreferencePair.reference_fingerprint_id`) that the stream worker does
    not serve. Dead-lettered with its own type: the pair is fine, it was sent to the wrong worker (or
    before its reference was deployed), so it can be replayed once a worker serves that reference."""

    error_type = "unknown_reference"


class DeadlineExceeded(RefscoreError, errors.DeadlineExceeded):
    """The caller's deadline passed while its job waited for the engine."""


class TokenizationError(RefscoreError, errors.TokenizationError):
    """The input cannot be tokenised as asked; the message says why."""


class TooLong(TokenizationError, errors.TooLong):
    """Prompt plus answer do not fit the model's context."""


class DuplicateReference(RefscoreError, errors.ConfigError):
    """Two of the reference models one server serves have the same fingerprint (same weights, tokenizer,
    chat template, dtype and model id): requests, which pick a model by fingerprint, could not tell them
    apart. Found when the second one has loaded; the server does not start serving."""


class ModelNotAllowed(RefscoreError):
    """The caller's team may not use the reference model its request picked (the auth file's `models`).
    `offdpo.errors` has no permission class (the auth interceptor refuses before a request is read);
    this one is raised after the request named its model, so it carries the status itself."""

    error_type = "permission_denied"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
