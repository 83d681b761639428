"""Kafka clients (kafka-python) with the settings every service shares, and the dead-letter sink.

Delivery contract: producers use acks=all; consumers never auto-commit, and commit an offset only
after what they produced from it is durably written (at-least-once + idempotent writes).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable

from google.protobuf import timestamp_pb2
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
    UnknownMemberIdError,
)

from offdpo import broker_profile, errors
from offdpo.config import KafkaConfig
from offdpo.v1 import records_pb2

log = logging.getLogger(__name__)
# kafka-python logs every connection, assignment and offset reset at INFO: hundreds of lines that drown
# the services' own logs (and the demo's report). Its warnings and errors still show.
logging.getLogger("kafka").setLevel(logging.WARNING)

# Record size limits (deploy/README.md, "Record size limits"). The broker's largest record: deploy sets
# message.max.bytes on the brokers and max.message.bytes on every topic to this. Consumers fetch that
# much from one partition, so any record the broker accepted reaches the service, which dead-letters
# it when it is over its own limit instead of stalling the partition.
BROKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Largest record our producers send (max_request_size) and largest value any service accepts; bigger
# values are dead-lettered (by reference), not parsed.
MAX_RECORD_BYTES = 8 * 1024 * 1024

# Commit refusals that mean "the group changed", not "the broker is down": the next poll() completes
# the rebalance, so a consumer redoes or goes on at once instead of backing off without polling.
GROUP_CHANGED = (RebalanceInProgressError, CommitFailedError, IllegalGenerationError, UnknownMemberIdError)
# Refusals in a row after which a consumer is replaced by a new one: kafka-python can stay in its
# client-side "rebalancing" state without poll() ever completing it (every commit refused, every poll
# answered from the fetch buffer); a new member rejoins the group from the committed offsets.
GROUP_REFUSALS_BEFORE_NEW_CONSUMER = 3


def rewind(consumer: KafkaConsumer, recs) -> None:
    """Seek back to the first record of an uncommitted batch, so this member redoes it if it keeps the partition."""
    firsts: dict[TopicPartition, int] = {}
    for rec in recs:
        tp = TopicPartition(rec.topic, rec.partition)
        firsts[tp] = min(firsts.get(tp, rec.offset), rec.offset)
    for tp, offset in firsts.items():
        try:
            consumer.seek(tp, offset)
        except Exception:  # noqa: BLE001 - partition revoked meanwhile: its new owner redoes it
            log.warning("could not rewind %s to %d", tp, offset)


class CommitRefusals:
    """Commits a group change refused in a row. `refused` rewinds the batch so this member redoes it
    at once, or, after GROUP_REFUSALS_BEFORE_NEW_CONSUMER in a row, says the consumer must be replaced
    (the new member redoes the batch from the committed offsets)."""

    def __init__(self):
        self.in_a_row = 0

    def committed(self) -> None:
        self.in_a_row = 0

    def refused(self, consumer: KafkaConsumer, recs, exc: Exception) -> bool:
        self.in_a_row += 1
        log.warning(
            "offset commit refused by a group rebalance (%s); redoing the batch from the committed offsets now",
            type(exc).__name__,
        )
        if self.in_a_row < GROUP_REFUSALS_BEFORE_NEW_CONSUMER:
            rewind(consumer, recs)
            return False
        log.warning(
            "%d commits in a row refused by a group rebalance that poll() does not complete; "
            "replacing the Kafka consumer",
            self.in_a_row,
        )
        self.in_a_row = 0
        return True


def ensure_topics(cfg: KafkaConfig, topics: Iterable[str], partitions: int) -> None:
    admin = KafkaAdminClient(**cfg.client_kwargs(), client_id="offdpo-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def make_producer(cfg: KafkaConfig, client_id: str, **overrides) -> KafkaProducer:
    kwargs = dict(
        cfg.client_kwargs(),
        **broker_profile.producer_settings(cfg),
        client_id=client_id,
        acks="all",
        retries=10,
        max_in_flight_requests_per_connection=1,  # keeps per-partition order across retries
        linger_ms=5,
        max_request_size=MAX_RECORD_BYTES,
    )
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)


def consumer_size_settings() -> dict[str, int]:
    """A consumer's fetch sizes: one partition's fetch holds the broker's largest record."""
    return {"fetch_max_bytes": 2 * BROKER_MAX_MESSAGE_BYTES, "max_partition_fetch_bytes": BROKER_MAX_MESSAGE_BYTES}


def make_consumer(
    cfg: KafkaConfig,
    group_id: str,
    topics: Iterable[str] | None = None,
    listener: ConsumerRebalanceListener | None = None,
    **overrides,
) -> KafkaConsumer:
    """A consumer of the group, subscribed to `topics` (with the rebalance `listener`, offdpo.consume's)."""
    kwargs = dict(
        cfg.client_kwargs(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        **consumer_size_settings(),
        **broker_profile.consumer_settings(cfg),
    )
    kwargs.update(overrides)
    consumer = KafkaConsumer(**kwargs)
    if topics:
        consumer.subscribe(list(topics), listener=listener)
    return consumer


def topic_id(client: KafkaConsumer | KafkaProducer, topic: str) -> str | None:
    """The topic's id as Kafka prints it (`kafka-topics.sh --describe`: TopicId), or None when the
    client's metadata holds none for it (a broker without topic ids, or no metadata fetched yet).

    A topic id names one incarnation of a topic: a topic deleted and created again under the same
    name (or created anew after a broker lost its log) gets a new id while its offsets restart at 0.
    kafka-python keeps the ids of the metadata it fetched (Metadata v10+) on its cluster object,
    which only its private client exposes.
    """
    cluster = getattr(getattr(client, "_client", None), "cluster", None)
    tid = cluster.topic_id(topic) if cluster is not None and hasattr(cluster, "topic_id") else None
    if not isinstance(tid, uuid.UUID) or tid.int == 0:  # Kafka's zero id means "no id"
        return None
    return base64.urlsafe_b64encode(tid.bytes).decode().rstrip("=")


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


# A dead letter carries its original record whole up to this size; a bigger one is carried by
# reference (topic, partition, offset, size, sha256 and its first KiB), so a record the broker took
# but whose dead letter the producer would refuse cannot stall its partition.
DEAD_LETTER_INLINE_BYTES = MAX_RECORD_BYTES - 64 * 1024
DEAD_LETTER_PREFIX_BYTES = 1024


class DeadLetterSink:
    """Sends records that cannot be processed to the dead-letter topic, with the reason.

    Durable: `send` returns only once the broker has acknowledged the dead letter (acks=all), so a
    caller that commits the offset afterwards can never lose the record from both topics. A dead
    letter the broker does not acknowledge within `ack_timeout_s` raises `errors.Unavailable`: the
    caller must not commit, and redoes the input later.
    """

    def __init__(self, producer: KafkaProducer, cfg: KafkaConfig, service: str, ack_timeout_s: float = 60.0):
        self.producer = producer
        self.topic = cfg.deadletter_topic
        self.service = service
        self.ack_timeout_s = ack_timeout_s
        self.count = 0

    def send(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        reason: str,
        error_type: str,
    ) -> None:
        value = value or b""
        letter = records_pb2.DeadLetter(
            original_value=value,
            original_key=key or b"",
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
            error_type=error_type,
            service=self.service,
            failed_at=now_timestamp(),
        )
        if len(value) + len(key or b"") > DEAD_LETTER_INLINE_BYTES:
            letter.original_value = value[:DEAD_LETTER_PREFIX_BYTES]
            letter.original_key = (key or b"")[:DEAD_LETTER_PREFIX_BYTES]
            letter.original_truncated = True
            letter.original_size = len(value)
            letter.original_sha256 = hashlib.sha256(value).hexdigest()
        log.warning("dead-letter %s[%d]@%d (%s): %s", topic, partition, offset, error_type, reason)
        # Key by origin so a redo after a crash lands next to the first attempt.
        dl_key = f"{topic}/{partition}/{offset}".encode()
        try:
            # send() itself raises when the broker is unreachable (no metadata within max_block_ms)
            future = self.producer.send(self.topic, key=dl_key, value=letter.SerializeToString())
            future.get(timeout=self.ack_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure to get an ack means "not durable yet"
            raise errors.Unavailable(
                f"the dead letter for {topic}[{partition}]@{offset} was not acknowledged by the broker "
                f"({type(exc).__name__}: {exc}); not committing past it"
            ) from exc
        self.count += 1

    def send_record(self, record, reason: str, error_type: str) -> None:
        """Dead-letter a kafka-python ConsumerRecord."""
        self.send(
            value=record.value,
            key=record.key,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            error_type=error_type,
        )

    def flush(self, timeout_s: float = 60.0) -> None:
        self.producer.flush(timeout=timeout_s)


def read_topic(cfg: KafkaConfig, topic: str, timeout_s: float = 30.0, idle_s: float = 2.0) -> list:
    """Read every record of a topic from the beginning (no group): for tests, reports and audits.

    Reads until no record arrived for `idle_s`. It does not trust end_offsets(): the local Tansu
    broker reports a high watermark that is not last offset + 1 (seen: 1 for a partition of 30).
    """
    consumer = KafkaConsumer(**cfg.client_kwargs(), enable_auto_commit=False, group_id=None)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle_s:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic}: records still arriving after {timeout_s} s ({len(records)} so far)"
                )
            for recs in consumer.poll(timeout_ms=200).values():
                records.extend(recs)
                last_new = time.monotonic()
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def next_offsets(records) -> dict:
    """{TopicPartition: last offset + 1} of records read with read_topic (what a caught-up group has committed)."""
    out: dict = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        out[tp] = max(out.get(tp, 0), r.offset + 1)
    return out
