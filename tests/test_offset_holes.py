"""Holes in a partition's offsets (offdpo.broker_profile.OffsetHoleGuard).

Tansu's S3 storage reserves a batch's offsets before it writes the batch object; a reader that fetches
in between sees the later batch and, unguarded, steps over the earlier one for good (a CI run on
2026-11-30: the demo's scoring never finished). The real-broker test makes that hole on purpose: it
moves the middle one of three batch objects out of Tansu's bucket, polls, and puts it back.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pytest
from kafka import TopicPartition

from localdev.stack import TANSU_BUCKET
from offdpo.broker_profile import OffsetHoleGuard
from offdpo.kafka import ensure_topics, make_consumer, make_producer
from offdpo.s3 import make_minio_client


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int


class FakeConsumer:
    """Answers poll() from a script; records seeks and keeps positions the way kafka-python does."""

    def __init__(self, tp: TopicPartition, position: int, answers: list[list[int]]):
        self.tp, self.answers, self.seeks = tp, list(answers), []
        self.group_committed: int | None = None
        self._position = position
        self._subscription = self  # OffsetHoleGuard reads consumer._subscription.assignment

    @property
    def assignment(self):
        return {self.tp: type("State", (), {"position": type("Pos", (), {"offset": self._position})()})()}

    def poll(self, **_):
        offsets = self.answers.pop(0)
        recs = [Rec(self.tp.topic, self.tp.partition, o) for o in offsets if o >= self._position]
        if recs:
            self._position = recs[-1].offset + 1
        return {self.tp: recs} if recs else {}

    def seek(self, tp, offset):
        self.seeks.append(offset)
        self._position = offset

    def committed(self, tp, timeout_ms=None):
        return self.group_committed


class JustAssigned(FakeConsumer):
    """A member with no position before its first poll: kafka-python sets it from the group's committed
    offset inside that poll (and may return records in the same call)."""

    def __init__(self, tp, committed, answers):
        super().__init__(tp, committed, answers)
        self.group_committed, self._known = committed, False

    @property
    def assignment(self):
        return super().assignment if self._known else {}

    def poll(self, **kw):
        self._known = True
        return super().poll(**kw)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


TP = TopicPartition("t", 0)


def _offsets(polled):
    return [r.offset for recs in polled.values() for r in recs]


def test_records_after_a_hole_wait_until_the_hole_fills():
    consumer = FakeConsumer(TP, 10, [[15, 16], [15, 16], [10, 11, 12, 13, 14, 15, 16]])
    guard = OffsetHoleGuard(wait_s=15, clock=Clock())
    assert _offsets(guard.poll(consumer)) == [] and consumer.seeks == [10]
    assert _offsets(guard.poll(consumer)) == [] and consumer.seeks == [10, 10]
    assert _offsets(guard.poll(consumer)) == [10, 11, 12, 13, 14, 15, 16]
    assert not guard._first_seen


def test_a_hole_inside_one_poll_cuts_the_records_there():
    consumer = FakeConsumer(TP, 0, [[0, 1, 2, 6, 7], [3, 4, 5, 6, 7]])
    guard = OffsetHoleGuard(wait_s=15, clock=Clock())
    assert _offsets(guard.poll(consumer)) == [0, 1, 2] and consumer.seeks == [3]
    assert _offsets(guard.poll(consumer)) == [3, 4, 5, 6, 7]


def test_a_hole_that_never_fills_is_stepped_over_after_the_wait(caplog):
    clock = Clock()
    consumer = FakeConsumer(TP, 10, [[15], [15], [15, 16]])
    guard = OffsetHoleGuard(wait_s=15, clock=clock)
    assert _offsets(guard.poll(consumer)) == []
    clock.now = 14.9
    assert _offsets(guard.poll(consumer)) == []
    clock.now = 15.0
    assert _offsets(guard.poll(consumer)) == [15, 16]
    assert "offsets 10..14 never appeared in 15 s" in caplog.text


def test_a_member_just_assigned_compares_its_first_records_with_the_committed_offset():
    consumer = JustAssigned(TP, 10, [[15, 16], [10, 11, 12, 13, 14, 15, 16]])
    guard = OffsetHoleGuard(wait_s=15, clock=Clock())
    assert _offsets(guard.poll(consumer)) == [] and consumer.seeks == [10]
    assert _offsets(guard.poll(consumer)) == [10, 11, 12, 13, 14, 15, 16]
    nothing_committed = JustAssigned(TP, 0, [[15, 16]])
    nothing_committed.group_committed = None  # started from the reset policy: nothing to compare with
    assert _offsets(OffsetHoleGuard(wait_s=15, clock=Clock()).poll(nothing_committed)) == [15, 16]


def test_wait_zero_turns_the_guard_off():
    consumer = FakeConsumer(TP, 10, [[15, 16]])
    assert _offsets(OffsetHoleGuard(wait_s=0).poll(consumer)) == [15, 16] and consumer.seeks == []


def test_the_position_is_read_from_kafka_pythons_subscription_state(stack, unique):
    # OffsetHoleGuard reads kafka-python's own record of positions (position() would ask the broker):
    # if an upgrade changes its shape, this says so instead of the guard going blind.
    from offdpo.broker_profile import _known_positions

    topic = f"test.positions.{unique}"
    ensure_topics(stack.kafka, [topic], partitions=1)
    producer = make_producer(stack.kafka, "test")
    for i in range(3):
        producer.send(topic, value=str(i).encode()).get(timeout=30)
    producer.close()
    consumer = make_consumer(stack.kafka, f"g-{unique}", [topic])
    try:
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 3 and time.monotonic() < deadline:
            got += _offsets(consumer.poll(timeout_ms=500))
        assert len(got) == 3, f"read {got} within 60 s"
        assert _known_positions(consumer) == {TopicPartition(topic, 0): max(got) + 1}
    finally:
        consumer.close()


def _read(consumer, seconds: float, until: int, guard: OffsetHoleGuard | None = None) -> list[bytes]:
    """Values polled (through `guard` if given) for `seconds` or until `until` of them arrived."""
    seen: list[bytes] = []
    deadline = time.monotonic() + seconds
    while len(seen) < until and time.monotonic() < deadline:
        polled = guard.poll(consumer, timeout_ms=500) if guard else consumer.poll(timeout_ms=500)
        seen += [r.value for recs in polled.values() for r in recs]
    return seen


@pytest.mark.stack
def test_a_batch_written_late_is_read_not_skipped_on_the_real_broker(stack, unique):
    topic = f"test.holes.{unique}"
    ensure_topics(stack.kafka, [topic], partitions=1)
    producer = make_producer(stack.kafka, "test")

    def produce(batch: str) -> None:  # one produce request: one batch object in Tansu's bucket
        for i in range(3):
            producer.send(topic, value=f"{batch}-{i}".encode())
        producer.flush()

    produce("head")
    guarded, plain = (make_consumer(stack.kafka, f"g-{unique}-{name}", [topic]) for name in ("guarded", "plain"))
    guard = OffsetHoleGuard(wait_s=300)
    try:
        # Both members hold a position (after "head") before the hole opens, as in a running pipeline.
        assert len(_read(guarded, 60, 3, guard)) == 3 and len(_read(plain, 60, 3)) == 3
        produce("early")
        produce("late")
        producer.close()
        s3 = make_minio_client(stack.s3)
        objects = sorted(
            o.object_name
            for o in s3.list_objects(TANSU_BUCKET, prefix="clusters/", recursive=True)
            if f"/topics/{topic}/" in o.object_name and o.object_name.endswith(".batch")
        )
        assert len(objects) == 3, objects
        early = objects[1]
        body = s3.get_object(TANSU_BUCKET, early).read()
        s3.remove_object(TANSU_BUCKET, early)  # the early batch "still being written"

        assert _read(plain, 30, 3) == [b"late-0", b"late-1", b"late-2"], "Tansu serves the later batch"
        assert _read(guarded, 8, 1, guard) == [], "records after the hole are held while it may still fill"
        s3.put_object(TANSU_BUCKET, early, io.BytesIO(body), len(body))
        assert _read(guarded, 60, 6, guard) == [f"{b}-{i}".encode() for b in ("early", "late") for i in range(3)]
        assert _read(plain, 5, 1) == [], "the plain consumer stepped over the early batch for good"
    finally:
        guarded.close()
        plain.close()
