"""The stream worker: preference pairs from Kafka -> scored Parquet shards in S3 -> shard-ready events.

Per micro-batch (bounded by pairs, estimated tokens and time):
  1. decode and tokenise every record; a record that cannot be scored goes to the dead-letter topic
     (one over the size limits too: the dead letter carries it by reference, so the partition moves on);
  2. score chosen and rejected of all good records in one engine call (shared with gRPC callers);
  3. check that this member still owns the batch's partitions (the fence, below);
  4. per partition, write one shard under a key derived from the fingerprint, the topic's incarnation
     and the offsets it covers (scores/<fingerprint>/<topic>/id-<topic id>/pNNNN-<first>-<last>.parquet);
  5. publish a ShardReady event per shard, flush;
  6. only then commit the offsets.
A crash anywhere before 6 redoes the batch from the committed offset. If the shard for that
offset already exists (crash between 4 and 6), it is announced again and its range skipped, so a
redo never writes a second copy of any row. Events may repeat; the trainer dedups by object key.

Several references: the worker may serve more than one model (the primary, OFFDPO_REFSCORE_MODEL_DIR,
and the extras, OFFDPO_REFSCORE_EXTRA_MODEL_DIRS). Each pair names the one it wants
(`PreferencePair.reference_fingerprint_id`; empty: the primary); a pair naming one this worker does
not serve is dead-lettered (`unknown_reference`). A pair is tokenised and scored by its own model
(tokenisers can differ), and step 4 writes one shard per (partition, fingerprint) with rows, every
fingerprint's shard of a partition covering the same offset range (the batch's), each under its
fingerprint's prefix. How a redo finds what is written is in `_skip_existing_shards`.

Topic identity: offsets restart at 0 when the pairs topic is deleted and created again, or created
anew after a broker lost its log, while S3 keeps the old incarnation's shards. Their keys carry the
topic id the broker gave that incarnation (`offdpo.kafka.topic_id`), so new offsets never match an
old key and are scored, not skipped. A worker that sees the id of a topic change under it replaces
its consumer (its positions belong to the old incarnation) and redoes the batch.

The fence: a member that stopped polling for longer than the group allows (a long GC or engine
pause, a frozen node) is evicted and its partitions given to another replica, which redoes the
batch from the committed offset, possibly cut at other offsets. If the evicted member then woke and
wrote its shards, rows would be in S3 twice under overlapping keys and both announced. So before it
writes, the worker commits the offsets its batch starts at: the group holds those already, or
lower ones whose shards were found written and were just announced again, so for the owner this
commits nothing that is not durable, and for an evicted member the group coordinator refuses it
(a group change: the batch is redone after rejoining, where the new owner's shard is found and
only announced again). What is left is a member evicted between the fence and its commit: its
shard can overlap the new owner's; consumers dedup by pair_id.

Waits are bounded: the engine's answer within OFFDPO_REFSCORE_STALL_S (else the batch is redone),
and the loop beats a `Heartbeat` the watchdog reads (services/refscore/watchdog.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from offdpo import broker_profile, records, retry
from offdpo.config import KafkaConfig, S3Config
from offdpo.errors import BadInput, OffdpoError, RecordTooLarge, Unavailable
from offdpo.kafka import (
    GROUP_CHANGED,
    CommitRefusals,
    DeadLetterSink,
    make_consumer,
    make_producer,
    now_timestamp,
    rewind,
    topic_id,
)
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from services.refscore import metrics
from services.refscore.config import RefscoreConfig
from services.refscore.errors import DuplicateReference, UnknownReference
from services.refscore.scorer import PreparedPair, ScoredRow, Scorer
from services.refscore.watchdog import Heartbeat

log = logging.getLogger(__name__)

# A pair that is not a valid PreferencePair record (undecodable, wrong type, inconsistent).
INVALID_PAIR = "invalid_pair"


class Record(Protocol):
    """The fields of kafka-python's ConsumerRecord that the worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class _Reference:
    """A model this worker scores with: its fingerprint and its scorer."""

    fp: records_pb2.ReferenceFingerprint
    scorer: Scorer


@dataclass
class _Unit:
    """An offset range [first, last] of one partition that becomes one shard per fingerprint with rows
    in it, all under the same range. `written`: fingerprint id -> key of the shard an earlier attempt
    already wrote for this range (its pairs are neither scored nor written again, only re-announced)."""

    tp: TopicPartition
    first: int
    last: int
    recs: list[Record]
    written: dict[str, str]


@dataclass(frozen=True)
class _Pending:
    """A record whose pair is tokenised (by its reference's tokenizer) and waits for that engine."""

    record: Record
    pair: PreparedPair
    unit: _Unit
    ref: _Reference

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, OffdpoError) and exc.retryable


class TopicRecreated(Unavailable):
    """The topic's id changed under a running consumer: its positions belong to the old incarnation."""


class StreamWorker:
    def __init__(
        self,
        scorer: Scorer,
        cfg: RefscoreConfig,
        kafka: KafkaConfig,
        s3: S3Config,
        store: ObjectStore | None = None,
        heartbeat: Heartbeat | None = None,
        *,
        extra_scorers: Sequence[Scorer] = (),
    ):
        """`scorer`: the primary model's (pairs that name no reference); `extra_scorers`: the other
        models this worker serves, picked by the fingerprint id a pair names."""
        self.scorer = scorer
        self.scorers = [scorer, *extra_scorers]
        self.heartbeat = heartbeat or Heartbeat()
        self._canary: dict[str, PreparedPair] = {}  # per reference, a pair its engine scored
        self._topic_ids: dict[str, str] = {}  # the incarnation each topic had when last seen
        self._warned_no_topic_id = False
        self.cfg = cfg
        self.kafka = kafka
        self.store = store or ObjectStore(s3)
        # Several labelers publish to one partition: the broker profile says how to poll that.
        self.offset_holes = broker_profile.poller(kafka)
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.dlq: DeadLetterSink | None = None
        self._bucket_ready = False
        self.pairs_scored = 0
        self.shards_written = 0
        self._last_lag = 0.0

    # -- main loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        # Every model first: a pair naming a model still loading must wait, not be dead-lettered as unknown.
        for scorer in self.scorers:
            while not scorer.ready.wait(timeout=1.0):
                self.heartbeat.beat()  # waiting for the engine to load is progress enough
                if stop.is_set() or scorer.load_error:
                    return
        try:
            # DuplicateReference (two models, one fingerprint: pairs could not pick) is raised: this
            # process must not run so (the watchdog or `worker` mode's exit code says so).
            self._references()
        except Unavailable:  # an engine stopping before the worker started
            return
        log.info("stream worker consuming %s as group %s", self.kafka.pairs_topic, self.cfg.group_id)
        refusals = CommitRefusals()
        try:
            while not stop.is_set():
                try:
                    # Any failure (S3 or Kafka down, the engine failing) is an outage: the batch is
                    # redone from the committed offsets after a backoff, for as long as it takes.
                    retry.call(
                        "stream worker batch",
                        lambda: self._step(stop, refusals),
                        retry_if=lambda exc: isinstance(exc, Exception),
                        initial_s=0.5,
                        max_delay_s=30.0,
                        stop=stop,
                        logger=log,
                    )
                except Exception:  # noqa: BLE001 - `stop` ended the backoff; the failure is logged
                    break
        finally:
            self.close()

    def _step(self, stop: threading.Event, refusals: CommitRefusals) -> None:
        """Connect what is missing, then poll, score, write, announce and commit one micro-batch.
        A failure is raised after undoing what must be undone (rewind the batch, drop a broken client)."""
        self.heartbeat.beat()
        if stop.is_set():
            return
        self._connect()
        consumer = self._consumer
        try:
            batch = self._collect(consumer, stop)
        except KafkaError:
            # A consumer whose poll raises (its heartbeat or join failed for good) is replaced;
            # nothing was processed, so nothing is redone.
            self._drop_consumer()
            raise
        if not batch:
            return
        try:
            self.process(batch)
            refusals.committed()
        except GROUP_CHANGED as exc:
            # Not an outage: the group is rebalancing, and only poll() completes that, so the batch
            # is redone at once rather than after a backoff spent not polling. Refused at the fence,
            # nothing was written; refused at the end, its shards are written and announced already
            # and the redo only re-announces them.
            if refusals.refused(consumer, batch, exc):
                self._drop_consumer()
        except TopicRecreated:
            # Not rewound: the positions are the old incarnation's. A new member starts from the
            # group's committed offsets of the new topic (none: its beginning).
            log.warning("redoing the batch with a new consumer", exc_info=True)
            self._drop_consumer()
            raise
        except Exception as exc:
            log.exception("batch failed; redoing it from the committed offsets")
            rewind(consumer, batch)
            if isinstance(exc, KafkaError):
                # An idempotent producer that hit a fatal error refuses every later send: start a new one.
                self._drop_producer()
            raise
        self._report_lag(consumer)

    def _connect(self) -> None:
        """The bucket (once) and whichever Kafka client is missing. S3 or Kafka may start after us (a
        pod scheduled before MinIO is up) or be down when a client is replaced; a failure here is
        retried like any other, so the worker never gives up and leaves refscore serving gRPC with
        its stream dead."""
        if not self._bucket_ready:
            self.store.ensure_bucket()
            self._bucket_ready = True
        if self.consumer is None:
            self.consumer = make_consumer(
                self.kafka, self.cfg.group_id, [self.kafka.pairs_topic], max_poll_records=self.cfg.batch_pairs
            )
        if self.producer is None:
            # A ShardReady event names its shard, so a duplicate is harmless (the trainer skips a shard
            # it has done or holds): idempotence is the broker profile's choice.
            self.producer = make_producer(self.kafka, "refscore-worker")
            self.dlq = DeadLetterSink(self.producer, self.kafka, "refscore")

    @property
    def _consumer(self) -> KafkaConsumer:
        assert self.consumer is not None, "connected at the start of each step"
        return self.consumer

    @property
    def _producer(self) -> KafkaProducer:
        assert self.producer is not None, "connected at the start of each step"
        return self.producer

    @property
    def _dlq(self) -> DeadLetterSink:
        assert self.dlq is not None, "connected at the start of each step"
        return self.dlq

    def _drop_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception:  # noqa: BLE001 - the old member times out of the group anyway
                log.warning("closing the replaced consumer failed", exc_info=True)

    def _drop_producer(self) -> None:
        producer, self.producer, self.dlq = self.producer, None, None
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                log.warning("closing the failed producer failed", exc_info=True)

    def close(self) -> None:
        for client in (self.producer, self.consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing a Kafka client failed")
        self.producer = self.consumer = None

    def _collect(self, consumer: KafkaConsumer, stop: threading.Event) -> list[Record]:
        batch: list[Record] = []
        tokens = 0
        deadline: float | None = None
        while not stop.is_set() and len(batch) < self.cfg.batch_pairs and tokens < self.cfg.batch_tokens:
            wait_s = 0.5 if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                break
            polled = self.offset_holes.poll(
                consumer, timeout_ms=int(min(wait_s, 0.5) * 1000), max_records=self.cfg.batch_pairs - len(batch)
            )
            self.heartbeat.beat()
            for recs in polled.values():
                batch.extend(recs)
                tokens += sum(len(r.value or b"") for r in recs) // 3  # rough bytes -> tokens
            if batch and deadline is None:
                deadline = time.monotonic() + self.cfg.batch_wait_s
            if not batch and deadline is None:
                return []  # idle: let the caller check `stop`
        return batch

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        if time.monotonic() - self._last_lag < 10:
            return
        self._last_lag = time.monotonic()
        try:
            assigned = list(consumer.assignment())
            ends = consumer.end_offsets(assigned)
            for tp in assigned:
                # Apache Kafka reports last offset + 1; the local Tansu broker reports less, so clamp.
                metrics.WORKER_LAG.labels(str(tp.partition)).set(max(0, ends[tp] - consumer.position(tp)))
        except Exception:  # noqa: BLE001 - metrics must never stop the worker
            log.debug("lag report failed", exc_info=True)

    # -- one micro-batch ---------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> None:
        refs = self._references()
        by_tp: dict[TopicPartition, list[Record]] = defaultdict(list)
        for rec in sorted(batch, key=lambda r: (r.topic, r.partition, r.offset)):
            by_tp[TopicPartition(rec.topic, rec.partition)].append(rec)
        ids = self._incarnations({tp.topic for tp in by_tp})
        commits: dict[TopicPartition, int] = {}
        units = {tp: self._skip_existing_shards(tp, recs, refs, ids[tp.topic], commits) for tp, recs in by_tp.items()}

        # 1. decode, route + tokenise; what cannot be scored goes to the dead-letter topic
        pending = [p for tp_units in units.values() for unit in tp_units for p in self._prepare(unit, refs)]
        # 2. score every pair of the batch, one engine job per reference
        rows = self._score(pending)
        self._dlq.flush()
        # 3. still the owner of these partitions? (raises a group change if not: the batch is redone)
        self._fence({tp: tp_units[0].first for tp, tp_units in units.items() if tp_units})
        # 4 + 5. per partition and range, one shard per fingerprint with rows, then its event
        events = []
        for tp, tp_units in units.items():
            for unit in tp_units:
                for fp_id, ref in refs.items():
                    if (key := unit.written.get(fp_id)) is not None:
                        events.append(self._existing_event(key, ref.fp, tp, unit.first, unit.last))
                    elif ref_rows := rows.get((tp, unit.first, fp_id)):
                        events.append(self._write_shard(tp, unit.first, unit.last, ref_rows, ref.fp, ids[tp.topic]))
                commits[tp] = max(commits.get(tp, 0), unit.last + 1)
        self._publish(events)
        self._failpoint("before_commit")
        # 6. commit only what is durably written and announced
        if commits:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in commits.items()})
            log.info("committed %s", {f"{tp.topic}[{tp.partition}]": off for tp, off in commits.items()})
        metrics.WORKER_BATCH_PAIRS.observe(len(batch))

    def _references(self) -> dict[str, _Reference]:
        """The loaded models by fingerprint id, the primary first. NotReady while one is not loaded
        (or stopping); DuplicateReference when two have the same fingerprint (pairs could not pick)."""
        refs: dict[str, _Reference] = {}
        for scorer in self.scorers:
            fp = scorer.model().fingerprint
            other = refs.get(fp.fingerprint_id)
            if other is not None and other.scorer is not scorer:
                raise DuplicateReference(
                    f"{scorer.cfg.model_dir!r} and {other.scorer.cfg.model_dir!r} have the same fingerprint "
                    f"{fp.fingerprint_id} ({fp.model_id}): serve each reference once"
                )
            refs[fp.fingerprint_id] = _Reference(fp, scorer)
        return refs

    def _incarnations(self, topics: set[str]) -> dict[str, str | None]:
        """The topic id of each topic of the batch. Raises TopicRecreated when one differs from the id
        this worker saw before (the topic was deleted and created again under it)."""
        out: dict[str, str | None] = {}
        for topic in sorted(topics):
            tid = topic_id(self._consumer, topic)
            seen = self._topic_ids.get(topic)
            if tid is not None and seen is not None and tid != seen:
                del self._topic_ids[topic]
                raise TopicRecreated(
                    f"topic {topic} changed its id from {seen} to {tid}: it was deleted and created again"
                )
            if tid is None and not self._warned_no_topic_id:
                self._warned_no_topic_id = True
                log.warning(
                    "the broker reports no topic id for %s: shard keys carry no incarnation, so a recreated "
                    "topic could alias old shards",
                    topic,
                )
            if tid is not None:
                self._topic_ids[topic] = tid
            out[topic] = tid
        return out

    def _fence(self, firsts: dict[TopicPartition, int]) -> None:
        """Commit the offsets the batch starts at before writing for it (the module docstring says why):
        everything below them is written and announced; refused with a group change for a member
        evicted meanwhile."""
        if firsts:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in firsts.items()})

    def _prepare(self, unit: _Unit, refs: dict[str, _Reference]) -> list[_Pending]:
        """Decode the unit's records, pick each pair's reference and tokenise it with that model's
        tokenizer. Pairs of a reference whose shard for this range is written already are left out."""
        primary = next(iter(refs.values()))
        pending = []
        for rec in unit.recs:
            try:
                pair = records.decode_pair(rec.value)
            except records.RecordError as exc:
                # Over the size limit keeps its own type (the dead letter carries it by reference).
                self._dead_letter(rec, str(exc), exc.error_type if isinstance(exc, RecordTooLarge) else INVALID_PAIR)
                continue
            wanted = pair.reference_fingerprint_id
            ref = refs.get(wanted) if wanted else primary
            if ref is None:
                served = ", ".join(f"{fp_id} ({r.fp.model_id})" for fp_id, r in refs.items())
                unknown = UnknownReference(
                    f"pair {pair.pair_id} wants reference {wanted!r}, which this stream worker does not serve; "
                    f"it serves {served} (primary {primary.fp.fingerprint_id}). Send it to a worker that serves "
                    "it, or add that model to OFFDPO_REFSCORE_EXTRA_MODEL_DIRS"
                )
                self._dead_letter(rec, str(unknown), unknown.error_type)
                continue
            if ref.fp.fingerprint_id in unit.written:
                continue
            try:
                pending.append(_Pending(rec, ref.scorer.prepare_pair(pair), unit, ref))
            except BadInput as exc:  # too long, or not tokenisable as asked
                self._dead_letter(rec, str(exc), exc.error_type)
        return pending

    def _score(self, pending: list[_Pending]) -> dict[tuple[TopicPartition, int, str], list[ScoredRow]]:
        """Scored rows by (partition, unit's first offset, fingerprint id), in record order; one engine
        call per reference. If an engine fails on its pairs, they are scored one by one and those it
        fails on are dead-lettered."""
        by_ref: dict[str, list[_Pending]] = defaultdict(list)
        for p in pending:
            by_ref[p.ref.fp.fingerprint_id].append(p)
        rows: dict[tuple[TopicPartition, int, str], list[ScoredRow]] = defaultdict(list)
        for fp_id, group in by_ref.items():
            scorer = group[0].ref.scorer
            try:
                scored: list[ScoredRow | None] = list(self._engine([p.pair for p in group], scorer))
            except Exception as exc:  # noqa: BLE001 - isolate the pair that breaks the engine
                if _retryable(exc):
                    raise
                log.warning("engine failed on the batch (%s); scoring pairs one by one to isolate the cause", exc)
                alone = [self._score_alone(p) for p in group]
                if all(isinstance(r, Exception) for r in alone) and not self._engine_works(fp_id, scorer):
                    # Not these pairs: the engine fails on a pair it scored before. An outage: the batch
                    # is redone after a backoff, and the watchdog restarts the process if it lasts.
                    self.heartbeat.failing(f"{type(exc).__name__}: {exc}")
                    raise Unavailable(
                        "the engine failed on every pair of the batch and on a pair it scored before"
                    ) from exc
                for p, r in zip(group, alone):
                    if isinstance(r, Exception):
                        self._dead_letter(
                            p.record, f"the engine failed on pair {p.pair.pair.pair_id}: {r}", "engine_error"
                        )
                scored = [r if not isinstance(r, Exception) else None for r in alone]
            self.heartbeat.working()
            for p, row in zip(group, scored):
                if row is not None and fp_id not in self._canary:
                    self._canary[fp_id] = p.pair
            for p, row in zip(group, scored):
                if row is not None:
                    rows[(p.tp, p.unit.first, fp_id)].append(row)
        return rows

    def _engine(self, pairs: list[PreparedPair], scorer: Scorer | None = None) -> list[ScoredRow]:
        """Score on the shared engine (`scorer`'s; default the primary's), waiting at most
        OFFDPO_REFSCORE_STALL_S (then NotReady: the batch is redone) and beating the heartbeat while
        waiting, so the watchdog tells waiting from stuck."""
        return (scorer or self.scorer).score_pairs(pairs, timeout=self.cfg.stall_s, heartbeat=self.heartbeat.beat)

    def _score_alone(self, p: _Pending) -> ScoredRow | Exception:
        """The pair's row, or what the engine raised on it alone (not retryable: the caller decides)."""
        try:
            return self._engine([p.pair], p.ref.scorer)[0]
        except Exception as exc:  # noqa: BLE001 - the caller tells a pair that breaks the engine from a broken engine
            if _retryable(exc):
                raise
            return exc

    def _engine_works(self, fp_id: str, scorer: Scorer) -> bool:
        """Whether the engine still scores a pair it scored before (this process's first good pair of
        that reference; before there is one, a tiny pair of our own), which tells a broken engine
        (an outage: retried, nothing dead-lettered) from a batch whose every pair breaks it."""
        canary = self._canary.get(fp_id)
        try:
            if canary is None:
                canary = scorer.prepare_pair(records.make_pair(records.text_prompt("Hello"), " yes", " no"))
        except Exception:  # noqa: BLE001 - no canary: the safe answer is "broken" (retried, not lost)
            log.warning("could not build a canary pair to test the engine with", exc_info=True)
            return False
        try:
            self._engine([canary], scorer)
        except Exception as exc:  # noqa: BLE001 - any failure on a known-good pair means the engine
            if _retryable(exc):
                raise
            return False
        return True

    def _dead_letter(self, rec: Record, reason: str, error_type: str) -> None:
        self._dlq.send_record(rec, reason, error_type)
        metrics.WORKER_DEADLETTERS.labels(error_type).inc()

    # -- shards and events -------------------------------------------------------------------------
    def _write_shard(
        self,
        tp: TopicPartition,
        first: int,
        last: int,
        rows: list[ScoredRow],
        fp: records_pb2.ReferenceFingerprint,
        tid: str | None,
    ) -> records_pb2.ShardReady:
        key = records.shard_key(fp.fingerprint_id, tp.topic, tp.partition, first, last, topic_id=tid)
        data = records.scored_pairs_to_parquet([r.to_record(fp) for r in rows], fp)
        self.store.put_bytes(key, data, content_type="application/vnd.apache.parquet")
        log.info("wrote %s (%d pairs)", key, len(rows))
        self._failpoint("after_shard_write")
        self.shards_written += 1
        self.pairs_scored += len(rows)
        metrics.WORKER_SHARDS.labels(fp.fingerprint_id).inc()
        metrics.WORKER_PAIRS.labels(fp.fingerprint_id).inc(len(rows))
        return self._event(key, data, [r.prepared.pair.pair_id for r in rows], fp, tp, first, last)

    def _event(
        self,
        key: str,
        data: bytes,
        pair_ids: list[str],
        fp: records_pb2.ReferenceFingerprint,
        tp: TopicPartition,
        first: int,
        last: int,
    ) -> records_pb2.ShardReady:
        return records_pb2.ShardReady(
            bucket=self.store.bucket,
            object_key=key,
            row_count=len(pair_ids),
            pair_ids=pair_ids,
            fingerprint=fp,
            source_ranges=[
                records_pb2.KafkaRange(topic=tp.topic, partition=tp.partition, first_offset=first, last_offset=last)
            ],
            sha256=records.sha256_hex(data),
            created_at=now_timestamp(),
        )

    def _publish(self, events: list[records_pb2.ShardReady]) -> None:
        producer = self._producer
        futures = [
            producer.send(self.kafka.shards_topic, key=e.object_key.encode(), value=e.SerializeToString())
            for e in events
        ]
        producer.flush(timeout=60)
        for f in futures:
            f.get(timeout=60)  # raises if the broker did not acknowledge

    def _existing_event(
        self, key: str, fp: records_pb2.ReferenceFingerprint, tp: TopicPartition, first: int, last: int
    ) -> records_pb2.ShardReady:
        """The event of a shard an earlier attempt wrote (read back for its pair ids and checksum)."""
        data = self.store.get_bytes(key, max_bytes=records.MAX_SHARD_BYTES)
        shard = records.read_shard(data, key)
        return self._event(key, data, shard.pair_ids, fp, tp, first, last)

    def _skip_existing_shards(
        self,
        tp: TopicPartition,
        recs: list[Record],
        refs: dict[str, _Reference],
        tid: str | None,
        commits: dict[TopicPartition, int],
    ) -> list[_Unit]:
        """What of this partition's records is left to do, as units (ranges), after what an earlier
        attempt already wrote (in this topic incarnation).

        Every attempt writes all fingerprints' shards of a range under the same [first, last], so a
        redo starting at `first` finds, per fingerprint it serves, either that range's shard or none.
        - None for any fingerprint: nothing was written from here; the rest is one new unit.
        - One for every fingerprint: the range is done (a crash between write and commit); its shards
          are announced again and the range skipped, as with a single model.
        - Some, not all: a crash between two fingerprints' writes, or fingerprints without rows in that
          range (a worker that cannot tell which without reading the records). The range is redone
          under the same key range [first, last] as a unit that scores and writes only the fingerprints
          whose shard is missing, and announces the others again: no already written shard is written
          again (so no row twice, whatever the bytes), and a missing one gets the key it would have had,
          so every fingerprint's shards keep the same boundaries and the next redo finds them. A batch
          that does not reach `last` reads the partition on to `last` first (`_read_through`): the
          range must not be cut elsewhere, or its rest would be scored again under a key that overlaps.
        With one model this is the single-model behaviour: a shard found is the whole range done."""
        units: list[_Unit] = []
        while recs:
            first = recs[0].offset
            found: dict[str, str] = {}
            for fp_id in refs:
                prefix = records.shard_key_prefix(fp_id, tp.topic, tp.partition, first, topic_id=tid)
                if keys := self.store.list_keys(prefix):
                    found[fp_id] = keys[0]
            if not found:
                units.append(_Unit(tp, first, recs[-1].offset, recs, {}))
                break
            lasts = {records.parse_shard_key(key)[2] for key in found.values()}
            if len(lasts) > 1:  # not written by this worker's rule; redo up to the longest, skip the written
                log.error("shards at %s[%d]@%d end at different offsets: %s", tp.topic, tp.partition, first, found)
            last = max(lasts)
            if len(found) < len(refs):
                if recs[-1].offset < last:
                    recs = recs + self._read_through(tp, last)
                log.info(
                    "range %s[%d] %d-%d partly written by an earlier attempt (%s): scoring the other references",
                    tp.topic,
                    tp.partition,
                    first,
                    last,
                    ", ".join(found.values()),
                )
                units.append(_Unit(tp, first, last, [r for r in recs if r.offset <= last], found))
                recs = [r for r in recs if r.offset > last]
                continue
            log.info(
                "shard(s) %s already written by an earlier attempt; announcing again and skipping their range",
                ", ".join(found.values()),
            )
            self._publish([self._existing_event(key, refs[fp_id].fp, tp, first, last) for fp_id, key in found.items()])
            commits[tp] = last + 1
            if last >= recs[-1].offset:
                if last > recs[-1].offset:
                    self._consumer.seek(tp, last + 1)
                break
            recs = [r for r in recs if r.offset > last]
        return units

    def _read_through(self, tp: TopicPartition, last: int) -> list[Record]:
        """The records of `tp` from the consumer's position up to offset `last`, polled with the other
        partitions paused (their positions do not move); the consumer is left at last + 1. Raises
        Unavailable (the batch is redone) when that takes longer than OFFDPO_REFSCORE_STALL_S."""
        consumer = self._consumer
        others = [t for t in consumer.assignment() if t != tp]
        out: list[Record] = []
        deadline = time.monotonic() + self.cfg.stall_s
        if others:
            consumer.pause(*others)
        try:
            while consumer.position(tp) <= last:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"reading {tp.topic}[{tp.partition}] on to offset {last}, to redo a range an earlier attempt "
                        f"wrote, took over {self.cfg.stall_s:.0f} s"
                    )
                polled = consumer.poll(timeout_ms=500, max_records=self.cfg.batch_pairs)
                self.heartbeat.beat()
                out.extend(r for r in polled.get(tp, []) if r.offset <= last)
        finally:
            if others:
                consumer.resume(*others)
        if consumer.position(tp) > last + 1:
            consumer.seek(tp, last + 1)
        return out

    def _failpoint(self, name: str) -> None:
        if self.cfg.failpoint == name:
            log.error("failpoint %s: killing this process (fault-injection test)", name)
            os.kill(os.getpid(), signal.SIGKILL)
