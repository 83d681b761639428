"""In-memory stand-ins for the object store and for kafka-python's consumer and producer.

For unit tests of the logic around them (the trainer's data sources, the worker's batching, the
labeler's pipeline), where the real broker or S3 server is not what is under test. They keep the
parts of the real clients' contracts that the code relies on: offsets per partition, commits only
of what the caller says, `send()` returning a future whose `get()` raises a failed produce, a store
whose keys list in order. Failures are injected explicitly (`fail_next`).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition

from offdpo import errors


# -- object store --------------------------------------------------------------------------------
class FakeObjectStore:
    """The methods of `offdpo.s3.ObjectStore`, over a dict. `fail_next(n, exc)` makes the next n calls raise."""

    def __init__(self, bucket: str = "fake"):
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self._failures: collections.deque[BaseException] = collections.deque()

    def fail_next(self, n: int, exc: BaseException) -> None:
        self._failures.extend([exc] * n)

    def _call(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self._failures:
            raise self._failures.popleft()

    def ensure_bucket(self) -> None:
        self._call("ensure_bucket", "")

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream", metadata=None) -> None:
        self._call("put", key)
        self.objects[key] = bytes(data)
        self.metadata[key] = dict(metadata or {})

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        self._call("get", key)
        if key not in self.objects:
            raise KeyError(f"NoSuchKey: {key}")
        data = self.objects[key]
        if max_bytes is not None and len(data) > max_bytes:
            raise errors.TooLarge(f"object {key} is {len(data)} bytes, over the limit of {max_bytes}")
        return data

    def exists(self, key: str) -> bool:
        self._call("stat", key)
        return key in self.objects

    def list_keys(self, prefix: str) -> list[str]:
        self._call("list", prefix)
        return sorted(k for k in self.objects if k.startswith(prefix))

    def iter_keys(self, prefix: str):
        yield from self.list_keys(prefix)

    def delete(self, key: str) -> None:
        self._call("delete", key)
        self.objects.pop(key, None)


# -- Kafka ---------------------------------------------------------------------------------------
@dataclass
class FakeRecord:
    """The fields of kafka-python's ConsumerRecord that the services read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)
    timestamp: int = 0


class FakeBroker:
    """Topics of partitions of records, and committed offsets per consumer group."""

    def __init__(self, partitions: int = 1):
        self.default_partitions = partitions
        self.topics: dict[str, list[list[FakeRecord]]] = {}
        self.committed: dict[tuple[str, TopicPartition], int] = {}
        self._round_robin = itertools.count()

    def create_topic(self, topic: str, partitions: int | None = None) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions or self.default_partitions)])

    def append(
        self, topic: str, value: bytes | None, key: bytes | None = None, partition: int | None = None
    ) -> FakeRecord:
        self.create_topic(topic)
        parts = self.topics[topic]
        if partition is None:
            partition = (hash(key) if key is not None else next(self._round_robin)) % len(parts)
        rec = FakeRecord(topic, partition, len(parts[partition]), key, value)
        parts[partition].append(rec)
        return rec

    def records(self, topic: str) -> list[FakeRecord]:
        return [r for part in self.topics.get(topic, []) for r in part]

    def values(self, topic: str) -> list[bytes | None]:
        return [r.value for r in self.records(topic)]


class FakeFuture:
    def __init__(self, result: Any = None, exc: BaseException | None = None):
        self._result, self._exc = result, exc

    def get(self, timeout: float | None = None) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result

    def succeeded(self) -> bool:
        return self._exc is None

    def failed(self) -> bool:
        return self._exc is not None


class FakeProducer:
    """`send` appends at once (acks=all in effect); `fail_next(n, exc)` makes the next n sends' futures fail."""

    def __init__(self, broker: FakeBroker):
        self.broker = broker
        self.closed = False
        self.flushes = 0
        self._failures: collections.deque[BaseException] = collections.deque()

    def fail_next(self, n: int, exc: BaseException) -> None:
        self._failures.extend([exc] * n)

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None, **_):
        if self._failures:
            return FakeFuture(exc=self._failures.popleft())
        return FakeFuture(self.broker.append(topic, value, key, partition))

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


class FakeConsumer:
    """A group member that owns every partition of its topics. Reads from its position, commits what
    it is told (or its positions), and starts from the group's committed offsets (else the beginning)."""

    def __init__(self, broker: FakeBroker, *topics: str, group: str = "g", max_poll_records: int = 500):
        self.broker, self.group, self.max_poll_records = broker, group, max_poll_records
        self.closed = False
        self.commits: list[dict[TopicPartition, int]] = []
        self._positions: dict[TopicPartition, int] = {}
        self._commit_failures: collections.deque[BaseException] = collections.deque()
        if topics:
            self.subscribe(list(topics))

    def subscribe(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self.broker.create_topic(topic)
            for p in range(len(self.broker.topics[topic])):
                tp = TopicPartition(topic, p)
                self._positions[tp] = self.broker.committed.get((self.group, tp), 0)

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        self._positions = {tp: self.broker.committed.get((self.group, tp), 0) for tp in tps}

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(len(self.broker.topics.get(topic, []))))

    def poll(self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True):
        budget = max_records or self.max_poll_records
        out: dict[TopicPartition, list[FakeRecord]] = {}
        for tp, pos in sorted(self._positions.items()):
            part = self.broker.topics[tp.topic][tp.partition]
            recs = part[pos : pos + budget]
            if recs:
                out[tp] = recs
                budget -= len(recs)
                if update_offsets:
                    self._positions[tp] = pos + len(recs)
            if budget <= 0:
                break
        return out

    def position(self, tp: TopicPartition) -> int:
        return self._positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps or list(self._positions):
            self._positions[tp] = 0

    def end_offsets(self, tps: Iterable[TopicPartition], timeout_ms: int | None = None) -> dict[TopicPartition, int]:
        return {tp: len(self.broker.topics[tp.topic][tp.partition]) for tp in tps}

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.broker.committed.get((self.group, tp))

    def fail_commits(self, n: int, exc: BaseException) -> None:
        self._commit_failures.extend([exc] * n)

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata | int] | None = None) -> None:
        if self._commit_failures:
            raise self._commit_failures.popleft()
        if offsets is None:
            offsets = dict(self._positions)
        done = {tp: (o.offset if isinstance(o, OffsetAndMetadata) else int(o)) for tp, o in offsets.items()}
        for tp, offset in done.items():
            self.broker.committed[(self.group, tp)] = offset
        self.commits.append(done)

    def close(self, autocommit: bool = False) -> None:
        self.closed = True
