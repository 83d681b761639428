"""The shared retry policy and the error hierarchy that decides dead letters and gRPC codes."""

from __future__ import annotations

import threading

import grpc
import pytest

from offdpo import errors, records, retry


def test_retries_what_it_is_told_to_and_returns_the_result():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection refused")
        return "done"

    assert retry.call("flaky", flaky, retry_if=lambda e: isinstance(e, OSError), initial_s=0.001) == "done"
    assert len(calls) == 3


def test_bad_data_is_not_retried():
    calls = []

    def bad():
        calls.append(1)
        raise errors.RecordError("pair has no prompt")

    with pytest.raises(errors.RecordError):
        retry.call("bad", bad, retry_if=lambda e: isinstance(e, errors.OffdpoError) and e.retryable)
    assert len(calls) == 1


def test_a_set_stop_event_ends_the_retries_with_the_last_error():
    stop = threading.Event()
    stop.set()
    with pytest.raises(OSError, match="down"):
        retry.call("s3", lambda: (_ for _ in ()).throw(OSError("down")), retry_if=lambda e: True, stop=stop)


def test_errors_carry_their_dead_letter_type_and_grpc_status():
    with pytest.raises(errors.DecodeError) as info:
        records.decode_pair(b"\xff\xff not protobuf")
    assert info.value.error_type == "decode_error" and info.value.grpc_status == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(info.value, records.RecordError)  # callers catching RecordError still see it
    with pytest.raises(errors.RecordTooLarge) as too_big:
        records.decode_pair(b"x" * 100, max_bytes=10)
    assert too_big.value.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(errors.CorruptShard) as corrupt:
        records.read_shard(b"not parquet", "shard s")
    assert corrupt.value.error_type == "corrupt_shard" and "shard s" in str(corrupt.value)
    assert errors.Unavailable.retryable and not errors.BadInput.retryable
    assert errors.FingerprintMismatch.grpc_status == grpc.StatusCode.FAILED_PRECONDITION
