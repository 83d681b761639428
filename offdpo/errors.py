"""One exception hierarchy for the whole pipeline.

Every error a service can meet while handling one input is an `OffdpoError` subclass that carries
how it is reported, so nothing downstream reads message text to decide:

- `error_type`: the `DeadLetter.error_type` written when the input is dead-lettered;
- `grpc_status`: the status code a gRPC caller gets;
- `retryable`: True for infrastructure trouble (S3 or Kafka unreachable, an engine or judge down).
  A retryable error is never dead-lettered: the consumer stops progress on that input, backs off and
  tries again without committing.

The message always says what is wrong and what to fix; it never decides the class.
"""

from __future__ import annotations

import grpc


class OffdpoError(Exception):
    """Base of every domain error. Subclasses set the three class attributes below."""

    error_type: str = "internal_error"
    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable: bool = False


# -- bad input: dead-lettered, INVALID_ARGUMENT -----------------------------------------------------
class BadInput(OffdpoError, ValueError):
    """The input itself is wrong; retrying cannot help. Dead-lettered with `error_type`."""

    error_type = "invalid_input"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class RecordError(BadInput):
    """A record is malformed (undecodable, schema-invalid, inconsistent lengths)."""

    error_type = "invalid_record"


class DecodeError(RecordError):
    """The bytes are not the protobuf message they should be."""

    error_type = "decode_error"


class RecordTooLarge(RecordError):
    """A record is over the size limit of the place it was read from."""

    error_type = "too_large"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class TokenizationError(BadInput):
    """The input cannot be tokenised as asked."""

    error_type = "tokenization_error"


class TooLong(TokenizationError):
    """The tokenised input exceeds the model's context or the configured maximum length."""

    error_type = "too_long"


class CorruptShard(RecordError):
    """A scored shard cannot be read as one (bad Parquet, wrong schema, checksum mismatch)."""

    error_type = "corrupt_shard"


class FingerprintMismatch(BadInput):
    """Scores come from another reference model (weights, tokenizer, template or dtype) than expected."""

    error_type = "fingerprint_mismatch"
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(OffdpoError, ValueError):
    """A setting is missing or invalid; the message names the variable. Raised at start, never per input."""

    error_type = "config_error"
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


# -- limits: RESOURCE_EXHAUSTED ---------------------------------------------------------------------
class TooLarge(BadInput):
    """The request or record is over a configured size limit."""

    error_type = "too_large"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- infrastructure: retried, never dead-lettered ---------------------------------------------------
class Unavailable(OffdpoError):
    """A dependency (S3, Kafka, the engine, a judge) cannot be reached or is not ready yet."""

    error_type = "unavailable"
    grpc_status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(OffdpoError):
    """The caller's deadline passed before the work was done."""

    error_type = "deadline_exceeded"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
