"""Broker profiles: the one place where a broker's divergences from Apache Kafka are handled.

Every Kafka client the services make comes from `offdpo.kafka.make_producer` / `make_consumer`, and
every consumer loop polls through `poller(cfg)` and asks `assignment_watch(cfg, topics)`; those read
the profile (`OFFDPO_KAFKA_BROKER_PROFILE`) and apply what it needs. Nothing else in the product knows
which broker it talks to.

- `kafka` (the default; Apache Kafka, Strimzi, MSK, Confluent): idempotent producers, consumers that
  read only committed transactional data (`read_committed`), plain polls, no assignment watch. A hole
  in a partition's offsets there is a transaction marker, a compacted or expired range: normal.
- `tansu` (set by the local stack, localdev/stack.py; the Tansu 0.6 broker the tests and the demo run
  on), whose divergences are documented in README.md ("The local broker's divergences"):
  1. its S3 storage reserves a batch's offsets before it writes the batch, so a reader can step over a
     batch still being written: consumers poll through `OffsetHoleGuard`;
  2. it records an idempotent producer's sequence before it writes the batch, so a retry after a
     broker kill is answered "duplicate" and the record is lost: producers are not idempotent (acks=all
     and one request in flight keep at-least-once and the order; every record the services produce is
     idempotent by content: pair ids, shard keys, dead-letter positions);
  3. it answers a rejoin with the assignment it stored before, so the only member of a group can stay
     without partitions forever: `AssignmentWatch` replaces such a member.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

from kafka import KafkaConsumer, TopicPartition

from offdpo.config import KafkaConfig

log = logging.getLogger(__name__)


class BrokerProfile(enum.StrEnum):
    KAFKA = "kafka"
    TANSU = "tansu"


def profile(cfg: KafkaConfig) -> BrokerProfile:
    return BrokerProfile(cfg.broker_profile)  # KafkaConfig validated the name


def producer_settings(cfg: KafkaConfig) -> dict[str, Any]:
    """kafka-python producer settings the profile needs (the caller's own overrides win)."""
    if profile(cfg) is BrokerProfile.TANSU:
        return {"enable_idempotence": False}  # divergence 2
    return {"enable_idempotence": True}


def consumer_settings(cfg: KafkaConfig) -> dict[str, Any]:
    """kafka-python consumer settings the profile needs (the caller's own overrides win)."""
    if profile(cfg) is BrokerProfile.TANSU:
        return {}  # Tansu 0.6 has no transactions to hide
    # kafka-python's default is read_uncommitted: a transactional producer's aborted records would be
    # processed. Our producers are not transactional, but a topic may be shared with ones that are.
    return {"isolation_level": "read_committed"}


class Poller(Protocol):
    def poll(self, consumer: KafkaConsumer, **poll_kwargs) -> dict[TopicPartition, list]: ...


class PlainPoller:
    """consumer.poll as it is: a broker whose offsets have no holes a reader must wait for."""

    def poll(self, consumer: KafkaConsumer, **poll_kwargs) -> dict[TopicPartition, list]:
        return consumer.poll(**poll_kwargs)


def poller(cfg: KafkaConfig) -> Poller:
    """How a consumer loop polls on this broker."""
    if profile(cfg) is BrokerProfile.TANSU and cfg.offset_hole_wait_ms > 0:
        return OffsetHoleGuard(cfg.offset_hole_wait_ms / 1000)
    return PlainPoller()


class MemberWatch(Protocol):
    """What the only member of a group holds (a trainer run's), and whether it must be replaced."""

    def missing(self, consumer: KafkaConsumer) -> set[TopicPartition]: ...

    def needs_new_consumer(self, consumer: KafkaConsumer) -> bool: ...


def member_watch(topics: Iterable[str], replace_after_s: float = math.inf) -> MemberWatch:
    """Tells which partitions of `topics` the member lacks; by default never asks for a new member
    (a broker that answers a rejoin with a fresh assignment mends that itself)."""
    return AssignmentWatch(topics, after_s=replace_after_s)


def assignment_watch(cfg: KafkaConfig, topics: Iterable[str]) -> MemberWatch:
    """For the only member of a group: replaced after a while without some partitions only where
    the broker may never mend it (divergence 3)."""
    if profile(cfg) is BrokerProfile.TANSU:
        return member_watch(topics, INCOMPLETE_ASSIGNMENT_NEW_CONSUMER_S)
    return member_watch(topics)


# How long the only member of a group may lack partitions of its topics before it is replaced by a new
# member (AssignmentWatch), and how often its assignment is compared with the topics' metadata.
INCOMPLETE_ASSIGNMENT_NEW_CONSUMER_S = 60.0
ASSIGNMENT_CHECK_EVERY_S = 5.0


class AssignmentWatch:
    """For a group of ONE member (a trainer run's group): is the member missing partitions of its
    topics, and has it been long enough that it must be replaced by a new member?

    A member that joined or rejoined while the broker could not describe its topics (Tansu with its
    storage down answers UnknownError for the topic's metadata, or fewer partitions right after a
    restart) is assigned fewer partitions than the topic has, or none. kafka-python notices at its next
    metadata refresh (metadata_max_age_ms) and rejoins, but Tansu 0.6 answers that rejoin with the same
    generation and the assignment it stored before, so the member would never read the missing
    partitions (their pairs never trained; seen in CI, 66 of 80 pairs trained after a broker restart);
    a new member id gets the leader's current assignment. In a group with several members a partial
    assignment is normal: do not use this there.
    """

    def __init__(
        self,
        topics: Iterable[str],
        after_s: float = INCOMPLETE_ASSIGNMENT_NEW_CONSUMER_S,
        check_every_s: float = ASSIGNMENT_CHECK_EVERY_S,
        clock=time.monotonic,
    ):
        self.topics, self.after_s, self.check_every_s, self.clock = list(topics), after_s, check_every_s, clock
        self.incomplete_since: float | None = None
        self._checked_at: float | None = None
        self._missing: set[TopicPartition] = set()

    def missing(self, consumer: KafkaConsumer) -> set[TopicPartition]:
        """Partitions of the topics (as the consumer's metadata lists them) the consumer does not hold;
        compared at most every check_every_s (the answer in between is the last one). Empty while the
        metadata cannot be had (the broker is down): nothing can be told then."""
        now = self.clock()
        if self._checked_at is not None and now - self._checked_at < self.check_every_s:
            return self._missing
        self._checked_at = now
        held = consumer.assignment()
        missing: set[TopicPartition] = set()
        try:
            for topic in self.topics:
                missing |= {TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()}
        except Exception as exc:  # noqa: BLE001 - the broker is down: the member may well be complete
            log.debug("topic metadata unavailable (%s): assignment not checked", exc)
            missing = set()
        self._missing = missing - held
        return self._missing

    def needs_new_consumer(self, consumer: KafkaConsumer) -> bool:
        missing = self.missing(consumer)
        if not missing:
            self.incomplete_since = None
            return False
        now = self.clock()
        if self.incomplete_since is None:
            self.incomplete_since = now
        if now - self.incomplete_since < self.after_s:
            return False
        self.incomplete_since = None  # the new member gets after_s of its own
        self._checked_at = None
        log.warning(
            "the Kafka consumer has lacked %s for %.0f s (the only member of its group, so they are nobody's): "
            "replacing it with a new member",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(missing)),
            self.after_s,
        )
        return True


def _known_positions(consumer: KafkaConsumer) -> dict[TopicPartition, int]:
    """The next offset the consumer will return for each partition whose position it already holds.

    KafkaConsumer.position() refreshes committed offsets over the network first; this reads the
    subscription state it keeps (kafka-python 3.0), and is empty if that ever changes shape."""
    try:
        states = list(consumer._subscription.assignment.items())
    except AttributeError:
        return {}
    out = {}
    for tp, state in states:
        position = getattr(state, "position", None)
        offset = getattr(position, "offset", position)
        if isinstance(offset, int) and offset >= 0:
            out[tp] = offset
    return out


COMMITTED_TIMEOUT_MS = 5000  # how long OffsetHoleGuard waits for a partition's committed offset


class OffsetHoleGuard:
    """Polls a consumer and holds back records that come after a hole in their partition's offsets,
    until the hole fills or `wait_s` passes.

    Tansu's S3 storage (dynostore) reserves a batch's offsets (advances the watermark) before it
    writes the batch object, and a fetch returns whichever batch objects exist. With two producers on
    one partition, a fetch can find the later batch while the earlier one is still being written; the
    consumer's position then moves past the earlier batch and this member never reads it (a fresh-clone
    CI run, 2026-11-30: 5 pairs of partition 0 never scored, so the demo's scoring never finished). A
    hole is re-read from its start until its records appear; one that stays `wait_s` (a produce whose
    write failed after its offsets were reserved) is stepped over with a warning. On Apache Kafka a
    topic without transactions or compaction has no holes, and this only compares offsets.
    """

    def __init__(self, wait_s: float, clock=time.monotonic):
        self.wait_s, self.clock = wait_s, clock
        self._first_seen: dict[tuple[TopicPartition, int], float] = {}  # (partition, hole start) -> when

    def poll(self, consumer: KafkaConsumer, **poll_kwargs) -> dict[TopicPartition, list]:
        """consumer.poll(**poll_kwargs), less any records after a hole that may still fill."""
        before = _known_positions(consumer)
        polled = consumer.poll(**poll_kwargs)
        if self.wait_s <= 0:
            return polled
        out: dict[TopicPartition, list] = {}
        for tp, recs in polled.items():
            # A member that had no position yet (just assigned) started at the group's committed offset.
            expected = before[tp] if tp in before else self._committed(consumer, tp)
            kept = self._contiguous(consumer, tp, expected, recs)
            if kept:
                out[tp] = kept
        return out

    @staticmethod
    def _committed(consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp`; None when there is none (the member started from the
        reset policy: nothing to compare with) or the broker did not say in time."""
        try:
            committed = consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS)
        except Exception:  # noqa: BLE001 - unknown: the first records are taken as they come
            return None
        offset = getattr(committed, "offset", committed)
        return offset if isinstance(offset, int) and offset >= 0 else None

    def _contiguous(self, consumer: KafkaConsumer, tp: TopicPartition, expected: int | None, recs: list) -> list:
        """The records of `tp` up to the first hole that may still fill; seeks back to that hole."""
        for i, rec in enumerate(recs):
            if expected is None or rec.offset <= expected:
                expected = rec.offset + 1
                continue
            hole = (tp, expected)
            now = self.clock()
            first_seen = self._first_seen.setdefault(hole, now)
            if now - first_seen >= self.wait_s:
                log.warning(
                    "%s[%d]: offsets %d..%d never appeared in %.0f s; reading on from %d",
                    tp.topic,
                    tp.partition,
                    expected,
                    rec.offset - 1,
                    self.wait_s,
                    rec.offset,
                )
                del self._first_seen[hole]
                expected = rec.offset + 1
                continue
            if first_seen == now:
                log.info(
                    "%s[%d]: offsets %d..%d not readable yet (a batch still being written?); re-reading from %d",
                    tp.topic,
                    tp.partition,
                    expected,
                    rec.offset - 1,
                    expected,
                )
            try:
                consumer.seek(tp, expected)
            except Exception:  # noqa: BLE001 - partition revoked meanwhile: its new owner reads it
                log.warning("could not seek %s back to %d", tp, expected)
            return recs[:i]
        for key in [k for k in self._first_seen if k[0] == tp and k[1] < (expected or 0)]:
            del self._first_seen[key]  # filled
        return recs
