"""The pairs archive: every labelled pair record, kept in S3 as Parquet for longer than Kafka keeps it.

Kafka's retention is finite; the archive is what rescoring under a new reference
(`offdpo rescore --from archive/pairs/...`) and new runs start from once the topic is gone.

Layout: one object per (topic incarnation, partition, offset range), the same scheme as the scored shards:

    archive/pairs/<topic>/id-<topic id>/pNNNN-<first offset>-<last offset>.parquet

(without the `id-` segment when the broker reports no topic id). Each row is one Kafka record as it
was: partition, offset, timestamp, key and the raw value bytes (a serialized PreferencePair, or
whatever was published: bad records are archived too and skipped by readers, which also find them in
the dead-letter topic), plus the pair id when the value decodes. The file's metadata names the
topic and topic id. Fixed writer settings: the same records give the same bytes.

Idempotent, like the stream worker: the `Archiver` writes an object, then commits the offsets it
covers. A crash in between redoes the batch from the committed offset, finds the object that starts
there already written and skips its range, so a redo never writes a second copy of any record.
A member evicted from the group while writing could leave two objects with overlapping ranges; readers
dedup by (topic id, partition, offset) (`read_archive_keys`).

The archiver is a consumer with a group of its own (OFFDPO_ARCHIVE_GROUP, default `offdpo-archiver`):
it only reads the pairs topic, never takes partitions from refscore's group, and its lag does not
hold anything else back.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition

from offdpo import errors, records
from offdpo.config import EnvConfig, KafkaConfig, S3Config, env
from offdpo.consume import DONE, Batch, ConsumeLoop, LoopSettings, Outcome, subscribed
from offdpo.s3 import ObjectStore, safe_key_part

log = logging.getLogger(__name__)

ARCHIVE_PREFIX = "archive/pairs/"
ARCHIVE_FORMAT_VERSION = "1"
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024

ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp_ms", pa.int64(), nullable=False),
        pa.field("key", pa.binary(), nullable=True),
        pa.field("value", pa.binary(), nullable=True),  # the record as published (a serialized PreferencePair)
        pa.field("pair_id", pa.string(), nullable=False),  # "" when the value is not a valid pair
    ]
)


class CorruptArchive(errors.RecordError):
    """An archive object cannot be read as one (bad Parquet, wrong schema or format, a key that lies)."""

    error_type = "corrupt_archive"


@dataclasses.dataclass(frozen=True, repr=False)
class ArchiveConfig(EnvConfig):
    group_id: str = env("OFFDPO_ARCHIVE_GROUP", "offdpo-archiver", "Kafka consumer group of the pairs archiver")
    batch_records: int = env("OFFDPO_ARCHIVE_BATCH_RECORDS", 5000, "most records in one archive object")
    batch_wait_s: float = env("OFFDPO_ARCHIVE_BATCH_WAIT_S", 30.0, "longest wait to fill an archive batch")
    failpoint: str = env(
        "OFFDPO_ARCHIVE_FAILPOINT",
        "",
        "fault injection for tests: 'after_write' SIGKILLs the archiver before its commit",
    )


# -- keys ------------------------------------------------------------------------------------------
def archive_key(topic: str, partition: int, first: int, last: int, topic_id: str | None = None) -> str:
    return f"{archive_key_prefix(topic, partition, first, topic_id=topic_id)}{last:012d}.parquet"


def archive_key_prefix(topic: str, partition: int, first: int | None = None, topic_id: str | None = None) -> str:
    incarnation = "" if topic_id is None else f"{safe_key_part('id-' + topic_id, 'topic id')}/"
    prefix = f"{ARCHIVE_PREFIX}{safe_key_part(topic, 'topic')}/{incarnation}p{partition:04d}-"
    return prefix if first is None else f"{prefix}{first:012d}-"


@dataclass(frozen=True)
class ArchiveKey:
    key: str
    topic: str
    topic_id: str | None
    partition: int
    first: int
    last: int


def parse_archive_key(key: str) -> ArchiveKey:
    """The parts of a key made by `archive_key`; CorruptArchive naming the key if it is not one."""
    if not key.startswith(ARCHIVE_PREFIX) or not key.endswith(".parquet"):
        raise CorruptArchive(
            f"{key} is not an archive object key ({ARCHIVE_PREFIX}<topic>/[id-<id>/]pNNNN-F-L.parquet)"
        )
    parts = key[len(ARCHIVE_PREFIX) :].split("/")
    if len(parts) == 2:
        (topic, name), tid = parts, None
    elif len(parts) == 3 and parts[1].startswith("id-"):
        topic, tid, name = parts[0], parts[1][3:], parts[2]
    else:
        raise CorruptArchive(
            f"{key} is not an archive object key ({ARCHIVE_PREFIX}<topic>/[id-<id>/]pNNNN-F-L.parquet)"
        )
    try:
        partition, first, last = records.parse_shard_key(name)
    except ValueError:
        raise CorruptArchive(f"{key}: the file name is not pNNNN-<first>-<last>.parquet") from None
    return ArchiveKey(key, topic, tid, partition, first, last)


# -- objects ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchivedRecord:
    topic: str
    topic_id: str | None
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    pair_id: str

    def pair(self) -> records.PreferencePair:
        """The record's pair; RecordError (with the reason) when the value is not a valid pair."""
        return records.decode_pair(self.value)


def records_to_parquet(topic: str, tid: str | None, recs: list) -> bytes:
    """One archive object from kafka-python ConsumerRecords of one partition, in offset order."""
    pair_ids = []
    for r in recs:
        try:
            pair_ids.append(records.decode_pair(r.value).pair_id)
        except records.RecordError:
            pair_ids.append("")
    table = pa.table(
        {
            "partition": [r.partition for r in recs],
            "offset": [r.offset for r in recs],
            "timestamp_ms": [int(r.timestamp if r.timestamp is not None else -1) for r in recs],
            "key": [r.key for r in recs],
            "value": [r.value for r in recs],
            "pair_id": pair_ids,
        },
        schema=ARCHIVE_SCHEMA,
    )
    meta = {
        b"offdpo.archive_format": ARCHIVE_FORMAT_VERSION.encode(),
        b"offdpo.topic": topic.encode(),
        b"offdpo.topic_id": (tid or "").encode(),
    }
    buf = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(meta), buf, compression="zstd", write_statistics=False, store_schema=True
    )
    return buf.getvalue()


def read_archive(data: bytes, key: str) -> list[ArchivedRecord]:
    """The records of one archive object, checked against its key; CorruptArchive naming the key."""
    parsed = parse_archive_key(key)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise CorruptArchive(f"{key} is {len(data)} bytes, over the limit of {MAX_ARCHIVE_BYTES}")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptArchive(f"{key} is not a readable Parquet file: {exc}") from None
    meta = table.schema.metadata or {}
    if meta.get(b"offdpo.archive_format") != ARCHIVE_FORMAT_VERSION.encode():
        raise CorruptArchive(f"{key} has archive format {meta.get(b'offdpo.archive_format')!r}")
    if not table.schema.remove_metadata().equals(ARCHIVE_SCHEMA):
        raise CorruptArchive(f"{key} has schema {table.schema.remove_metadata()}, expected {ARCHIVE_SCHEMA}")
    topic = meta.get(b"offdpo.topic", b"").decode()
    tid = meta.get(b"offdpo.topic_id", b"").decode() or None
    if (topic, tid) != (parsed.topic, parsed.topic_id):
        raise CorruptArchive(f"{key} holds records of topic {topic} (id {tid}), not of the topic its key names")
    cols = {name: table.column(name).to_pylist() for name in ARCHIVE_SCHEMA.names}
    out = [
        ArchivedRecord(
            topic,
            tid,
            cols["partition"][i],
            cols["offset"][i],
            cols["timestamp_ms"][i],
            cols["key"][i],
            cols["value"][i],
            cols["pair_id"][i],
        )  # fmt: skip
        for i in range(table.num_rows)
    ]
    for r in out:
        if r.partition != parsed.partition or not parsed.first <= r.offset <= parsed.last:
            raise CorruptArchive(f"{key} holds offset {r.partition}@{r.offset}, outside the range its key names")
    return out


def list_archive(store: ObjectStore, prefix: str = ARCHIVE_PREFIX) -> list[ArchiveKey]:
    """Archive objects under `prefix` (archive/pairs/, or one topic's archive/pairs/<topic>/), in
    (topic, incarnation, partition, first offset) order; other keys under it are refused."""
    if not prefix.startswith(ARCHIVE_PREFIX):
        raise CorruptArchive(f"{prefix} is not under {ARCHIVE_PREFIX}")
    keys = [parse_archive_key(k) for k in store.list_keys(prefix)]
    return sorted(keys, key=lambda k: (k.topic, k.topic_id or "", k.partition, k.first, k.last))


def read_archive_keys(store: ObjectStore, keys: list[ArchiveKey]) -> Iterator[tuple[ArchiveKey, list[ArchivedRecord]]]:
    """Each object's records, without any (topic id, partition, offset) an earlier object held
    (overlaps left by an evicted archiver)."""
    seen: dict[tuple[str, str | None, int], int] = {}  # highest offset read per partition (keys are in order)
    for k in keys:
        recs = read_archive(store.get_bytes(k.key, max_bytes=MAX_ARCHIVE_BYTES), k.key)
        part = (k.topic, k.topic_id, k.partition)
        high = seen.get(part, -1)
        yield k, [r for r in recs if r.offset > high]
        seen[part] = max([high] + [r.offset for r in recs])


# -- the archiver ----------------------------------------------------------------------------------
class Archiver:
    """Copies the pairs topic into the archive on the consume loop (offdpo.consume): a batch of up to
    batch_records (or batch_wait_s), one object per partition (after skipping ranges already written),
    then the loop commits. See the module docstring for the guarantees."""

    def __init__(
        self,
        kafka: KafkaConfig,
        s3: S3Config,
        cfg: ArchiveConfig | None = None,
        store: ObjectStore | None = None,
        topics: list[str] | None = None,
    ):
        self.kafka = kafka
        self.cfg = cfg or ArchiveConfig.from_env()
        self.store = store or ObjectStore(s3)
        self.topics = topics or [kafka.pairs_topic]
        self.objects_written = 0
        self.records_archived = 0

    def run(self, stop: threading.Event, until_idle_s: float | None = None) -> None:
        """Archive until `stop` is set (or, with `until_idle_s`, until nothing arrived for that long
        while partitions were ours: a one-shot catch-up). Outages are retried with backoff."""
        self.store.ensure_bucket()
        settings = LoopSettings(
            f"archiving {', '.join(self.topics)}",
            max_records=self.cfg.batch_records,
            fill_s=self.cfg.batch_wait_s,
            idle_exit_s=until_idle_s,
            initial_s=0.5,
            max_delay_s=30.0,
            # S3 and Kafka trouble of every kind is retried; only bad input (a bug here) ends the run.
            retry_if=lambda exc: isinstance(exc, Exception) and not isinstance(exc, errors.BadInput),
        )
        loop = ConsumeLoop(self.kafka, subscribed(self.kafka, self.cfg.group_id, self.topics), self.handle, settings)
        loop.run(stop)

    def process(self, consumer: KafkaConsumer, recs: list) -> list[Outcome]:
        """Archive one batch outside the loop (what its handle does); the caller commits."""
        return self.handle(Batch(recs, consumer))

    def handle(self, batch: Batch) -> list[Outcome]:
        by_tp: dict[TopicPartition, list] = defaultdict(list)
        for rec in sorted(batch.records, key=lambda r: (r.topic, r.partition, r.offset)):
            by_tp[TopicPartition(rec.topic, rec.partition)].append(rec)
        tids = {t: batch.topic_id(t) for t in sorted({tp.topic for tp in by_tp})}
        for tp, recs in by_tp.items():
            tid = tids[tp.topic]
            recs = self._skip_existing(batch, tp, recs, tid)
            if not recs:
                continue
            key = archive_key(tp.topic, tp.partition, recs[0].offset, recs[-1].offset, topic_id=tid)
            self.store.put_bytes(
                key, records_to_parquet(tp.topic, tid, recs), content_type="application/vnd.apache.parquet"
            )
            log.info("archived %s (%d records)", key, len(recs))
            self.objects_written += 1
            self.records_archived += len(recs)
            if self.cfg.failpoint == "after_write":
                import os
                import signal

                log.error("failpoint after_write: killing this process (fault-injection test)")
                os.kill(os.getpid(), signal.SIGKILL)
        return [DONE] * len(batch.records)

    def _skip_existing(self, batch: Batch, tp: TopicPartition, recs: list, tid: str | None) -> list:
        """Records an earlier attempt already archived (an object starting at the first offset): skipped,
        and covered for the commit."""
        while recs:
            keys = self.store.list_keys(archive_key_prefix(tp.topic, tp.partition, recs[0].offset, topic_id=tid))
            if not keys:
                return recs
            last = parse_archive_key(keys[0]).last
            log.info("%s already archived by an earlier attempt; skipping its range", keys[0])
            batch.cover(tp, last + 1)
            recs = [r for r in recs if r.offset > last]
        return recs


def run_archiver(until_idle_s: float | None = None, stop: threading.Event | None = None) -> int:
    """`python -m services.refscore archive` / `offdpo archive`: the archiver with settings from the environment."""
    from offdpo.shutdown import StopOnSignals

    archiver = Archiver(KafkaConfig.from_env(), S3Config.from_env(), ArchiveConfig.from_env())
    if stop is not None:
        archiver.run(stop, until_idle_s)
        return 0
    with StopOnSignals("the archiver finishes (and commits) its current batch, then stops") as signals:
        log.info("archiving %s as group %s", archiver.topics, archiver.cfg.group_id)
        archiver.run(signals.requested, until_idle_s)
    return 0
