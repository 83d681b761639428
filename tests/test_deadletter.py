"""The dead-letter sink: durable before the caller commits, and never too big to send."""

from __future__ import annotations

import hashlib

import pytest
from kafka.errors import KafkaTimeoutError

from offdpo import errors
from offdpo.config import KafkaConfig
from offdpo.kafka import DEAD_LETTER_INLINE_BYTES, DeadLetterSink
from offdpo.v1.records_pb2 import DeadLetter
from tests.fakes import FakeBroker, FakeProducer, FakeRecord


def _sink():
    broker = FakeBroker()
    producer = FakeProducer(broker)
    return broker, producer, DeadLetterSink(producer, KafkaConfig(), "test")


def test_a_dead_letter_carries_the_record_its_origin_and_the_reason():
    broker, _, sink = _sink()
    sink.send_record(FakeRecord("pairs", 2, 41, b"k", b"\x00bad"), "not a PreferencePair", "decode_error")
    (rec,) = broker.records(KafkaConfig().deadletter_topic)
    letter = DeadLetter.FromString(rec.value)
    assert (letter.topic, letter.partition, letter.offset) == ("pairs", 2, 41)
    assert letter.original_value == b"\x00bad" and not letter.original_truncated
    assert (letter.error_type, letter.reason, letter.service) == ("decode_error", "not a PreferencePair", "test")
    assert rec.key == b"pairs/2/41" and sink.count == 1


def test_an_unacknowledged_dead_letter_raises_unavailable_so_the_caller_does_not_commit():
    broker, producer, sink = _sink()
    producer.fail_next(1, KafkaTimeoutError("no ack"))
    with pytest.raises(errors.Unavailable, match=r"pairs\[0\]@7 was not acknowledged") as info:
        sink.send_record(FakeRecord("pairs", 0, 7, None, b"x"), "bad", "decode_error")
    assert info.value.retryable and sink.count == 0
    assert broker.records(KafkaConfig().deadletter_topic) == []


def test_a_record_too_big_to_carry_is_dead_lettered_by_reference():
    broker, _, sink = _sink()
    big = bytes(range(256)) * ((12 * 1024 * 1024) // 256)  # 12 MiB: the broker took it, a dead letter can't carry it
    assert len(big) > DEAD_LETTER_INLINE_BYTES
    sink.send_record(FakeRecord("pairs", 1, 3, b"key", big), "over the limit", "too_large")
    (rec,) = broker.records(KafkaConfig().deadletter_topic)
    letter = DeadLetter.FromString(rec.value)
    assert letter.original_truncated and letter.original_size == len(big)
    assert letter.original_sha256 == hashlib.sha256(big).hexdigest()
    assert letter.original_value == big[:1024] and len(rec.value) < 4096
