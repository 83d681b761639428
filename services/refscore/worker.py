"""The stream worker: preference pairs from Kafka -> scored Parquet shards in S3 -> shard-ready events.

Per micro-batch (bounded by pairs, estimated tokens and time):
  1. decode and tokenise every record; a record that cannot be scored goes to the dead-letter topic;
  2. score chosen and rejected of all good records in one engine call (shared with gRPC callers);
  3. per partition, write one shard under a key derived from the fingerprint and the offsets it
     covers (scores/<fingerprint>/<topic>/pNNNN-<first>-<last>.parquet);
  4. publish a ShardReady event per shard, flush;
  5. only then commit the offsets.
A crash anywhere before 5 redoes the batch from the committed offset. If the shard for that
offset already exists (crash between 3 and 5), it is announced again and its range skipped, so a
redo never writes a second copy of any row. Events may repeat; the trainer dedups by object key.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import defaultdict

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from offdpo import records
from offdpo.config import KafkaConfig, S3Config
from offdpo.kafka import (
    GROUP_CHANGED,
    CommitRefusals,
    DeadLetterSink,
    make_consumer,
    make_producer,
    now_timestamp,
    rewind,
)
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from services.refscore import metrics
from services.refscore.config import RefscoreConfig
from services.refscore.scorer import InvalidArgument, Prepared, Scorer

log = logging.getLogger(__name__)


class StreamWorker:
    def __init__(self, scorer: Scorer, cfg: RefscoreConfig, kafka: KafkaConfig, s3: S3Config):
        self.scorer = scorer
        self.cfg = cfg
        self.kafka = kafka
        self.store = ObjectStore(s3)
        self.consumer = None
        self.producer = None
        self.dlq: DeadLetterSink | None = None
        self._bucket_ready = False
        self.pairs_scored = 0
        self.shards_written = 0
        self._last_lag = 0.0

    # -- main loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not self.scorer.ready.wait(timeout=1.0):
            if stop.is_set() or self.scorer.load_error:
                return
        log.info("stream worker consuming %s as group %s", self.kafka.pairs_topic, self.cfg.group_id)
        backoff, refusals = 0.5, CommitRefusals()
        try:
            while not stop.is_set():
                if not self._connect(stop):  # (re)creates whatever client was dropped below
                    break
                try:
                    batch = self._collect(stop)
                except KafkaError:
                    # A consumer whose poll raises (its heartbeat or join failed for good) is replaced;
                    # nothing was processed, so nothing is redone.
                    log.exception("polling %s failed; a new consumer in %.1f s", self.kafka.pairs_topic, backoff)
                    self._drop_consumer()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if not batch:
                    continue
                try:
                    self.process(batch)
                    backoff = 0.5
                    refusals.committed()
                except GROUP_CHANGED as exc:
                    # Not an outage: the group is rebalancing, and only poll() completes that. The
                    # batch's shards are written and announced, so the redo is cheap; waiting out the
                    # outage backoff (up to 30 s, without polling) kept the group rebalancing forever
                    # after an S3 outage (fault suite, s3_outage).
                    if refusals.refused(self.consumer, batch, exc):
                        self._drop_consumer()
                except Exception as exc:  # noqa: BLE001 - S3/Kafka outage or engine failure: redo the batch later
                    log.exception("batch failed; will redo it from the committed offsets in %.1f s", backoff)
                    rewind(self.consumer, batch)
                    if isinstance(exc, KafkaError):
                        # An idempotent producer that hit a fatal error (seen after the broker lost its
                        # storage) refuses every later send: start a new one.
                        self._drop_producer()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                self._report_lag()
        finally:
            self.close()

    def _connect(self, stop: threading.Event) -> bool:
        """The bucket (once) and whichever Kafka client is missing, retried until they work: S3 or
        Kafka may start after us (a pod scheduled before MinIO is up) or be down when a client is
        replaced, and a worker thread that gave up would leave refscore serving gRPC with its stream
        dead. False when `stop` came first."""
        backoff = 1.0
        while not stop.is_set():
            try:
                if not self._bucket_ready:
                    self.store.ensure_bucket()
                    self._bucket_ready = True
                if self.consumer is None:
                    self.consumer = make_consumer(
                        self.kafka, self.cfg.group_id, [self.kafka.pairs_topic], max_poll_records=self.cfg.batch_pairs
                    )
                if self.producer is None:
                    self.producer = make_producer(self.kafka, "refscore-worker")
                    self.dlq = DeadLetterSink(self.producer, self.kafka, "refscore")
                return True
            except Exception:  # noqa: BLE001 - S3 or Kafka not reachable (yet)
                log.exception("stream worker cannot reach S3 or Kafka; retrying in %.0f s", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        return False

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

    def _collect(self, stop: threading.Event) -> list:
        batch, tokens, deadline = [], 0, None
        while not stop.is_set() and len(batch) < self.cfg.batch_pairs and tokens < self.cfg.batch_tokens:
            wait_s = 0.5 if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                break
            polled = self.consumer.poll(
                timeout_ms=int(min(wait_s, 0.5) * 1000), max_records=self.cfg.batch_pairs - len(batch)
            )
            for recs in polled.values():
                batch.extend(recs)
                tokens += sum(len(r.value or b"") for r in recs) // 3  # rough bytes -> tokens
            if batch and deadline is None:
                deadline = time.monotonic() + self.cfg.batch_wait_s
            if not batch and deadline is None:
                return []  # idle: let the caller check `stop`
        return batch

    def _report_lag(self) -> None:
        if time.monotonic() - self._last_lag < 10:
            return
        self._last_lag = time.monotonic()
        try:
            assigned = list(self.consumer.assignment())
            ends = self.consumer.end_offsets(assigned)
            for tp in assigned:
                # Apache Kafka reports last offset + 1; the local Tansu broker reports less, so clamp.
                metrics.WORKER_LAG.labels(str(tp.partition)).set(max(0, ends[tp] - self.consumer.position(tp)))
        except Exception:  # noqa: BLE001 - metrics must never stop the worker
            log.debug("lag report failed", exc_info=True)

    # -- one micro-batch ---------------------------------------------------------------------------
    def process(self, batch) -> None:
        fp = self.scorer.fingerprint
        by_tp: dict[TopicPartition, list] = defaultdict(list)
        for rec in sorted(batch, key=lambda r: (r.topic, r.partition, r.offset)):
            by_tp[TopicPartition(rec.topic, rec.partition)].append(rec)
        commits: dict[TopicPartition, int] = {}
        for tp in list(by_tp):
            by_tp[tp] = self._skip_existing_shards(tp, by_tp[tp], fp, commits)

        # 1. decode + tokenise; bad records to the dead-letter topic
        good: dict[TopicPartition, list[tuple[object, records_pb2.PreferencePair, Prepared, Prepared]]] = {}
        for tp, recs in by_tp.items():
            good[tp] = []
            for rec in recs:
                item = self._prepare(rec)
                if item is not None:
                    good[tp].append(item)

        # 2. score everything in one engine call
        flat = [p for items in good.values() for (_, _, c, r) in items for p in (c, r)]
        logps = self._score(flat, good) if flat else []
        self.dlq.flush()

        # 3 + 4. one shard per partition, then its event
        cursor, events = 0, []
        for tp, recs in by_tp.items():
            if not recs:
                continue
            first, last = recs[0].offset, recs[-1].offset
            rows = []
            for rec, pair, chosen, rejected in good[tp]:
                if rec is None:  # dead-lettered by the engine fallback
                    continue
                c_lp, r_lp = logps[cursor], logps[cursor + 1]
                cursor += 2
                rows.append(
                    records_pb2.ScoredPair(
                        pair=pair,
                        fingerprint=fp,
                        prompt_token_ids=chosen.prompt_ids,
                        chosen_token_ids=chosen.answer_ids,
                        rejected_token_ids=rejected.answer_ids,
                        chosen_logprobs=c_lp,
                        rejected_logprobs=r_lp,
                        chosen_logprob_sum=float(sum(c_lp)),
                        rejected_logprob_sum=float(sum(r_lp)),
                    )
                )
            if rows:
                key = records.shard_key(fp.fingerprint_id, tp.topic, tp.partition, first, last)
                data = records.scored_pairs_to_parquet(rows, fp)
                self.store.put_bytes(key, data, content_type="application/vnd.apache.parquet")
                log.info("wrote %s (%d pairs)", key, len(rows))
                self._failpoint("after_shard_write")
                events.append(self._event(key, data, [r.pair.pair_id for r in rows], fp, tp, first, last))
                self.shards_written += 1
                self.pairs_scored += len(rows)
                metrics.WORKER_SHARDS.inc()
                metrics.WORKER_PAIRS.inc(len(rows))
            commits[tp] = last + 1
        self._publish(events)
        self._failpoint("before_commit")

        # 5. commit only what is durably written and announced
        if commits:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in commits.items()})
            log.info("committed %s", {f"{tp.topic}[{tp.partition}]": off for tp, off in commits.items()})
        metrics.WORKER_BATCH_PAIRS.observe(len(batch))

    def _prepare(self, rec):
        try:
            pair = records.decode_pair(rec.value)
        except records.RecordError as exc:
            self._dead_letter(rec, f"{exc}", "invalid_pair")
            return None
        where = f"pair {pair.pair_id}"
        try:
            chosen = self.scorer.prepare_one(pair.prompt, "answer_text", _Answer(pair.chosen), f"{where} chosen")
            rejected = self.scorer.prepare_one(pair.prompt, "answer_text", _Answer(pair.rejected), f"{where} rejected")
        except InvalidArgument as exc:
            kind = "too_long" if "exceeds the model's context" in str(exc) else "tokenization_error"
            self._dead_letter(rec, str(exc), kind)
            return None
        return (rec, pair, chosen, rejected)

    def _score(self, flat: list[Prepared], good) -> list[list[float]]:
        try:
            return self.scorer.score(flat)
        except Exception as exc:  # noqa: BLE001
            log.warning("engine failed on the batch (%s); scoring pairs one by one to isolate the cause", exc)
        out: list[list[float]] = []
        failures = 0
        for tp, items in good.items():
            kept = []
            for rec, pair, chosen, rejected in items:
                try:
                    c_lp, r_lp = self.scorer.score([chosen, rejected])
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    self._dead_letter(rec, f"the engine failed on pair {pair.pair_id}: {exc}", "engine_error")
                    continue
                out += [c_lp, r_lp]
                kept.append((rec, pair, chosen, rejected))
            good[tp] = kept
        if failures and not out:
            raise RuntimeError("the engine failed on every pair of the batch; treating it as an outage")
        return out

    def _dead_letter(self, rec, reason: str, error_type: str) -> None:
        self.dlq.send_record(rec, reason, error_type)
        metrics.WORKER_DEADLETTERS.labels(error_type).inc()

    # -- shards and events -------------------------------------------------------------------------
    def _event(self, key, data, pair_ids, fp, tp, first, last) -> records_pb2.ShardReady:
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
        futures = [
            self.producer.send(self.kafka.shards_topic, key=e.object_key.encode(), value=e.SerializeToString())
            for e in events
        ]
        self.producer.flush()
        for f in futures:
            f.get(timeout=60)  # raises if the broker did not acknowledge

    def _skip_existing_shards(self, tp: TopicPartition, recs: list, fp, commits: dict) -> list:
        """Records at offsets a previous attempt already wrote a shard for: re-announce, skip, commit."""
        while recs:
            first = recs[0].offset
            keys = self.store.list_keys(records.shard_key_prefix(fp.fingerprint_id, tp.topic, tp.partition, first))
            if not keys:
                return recs
            key = keys[0]
            _, _, last = records.parse_shard_key(key)
            data = self.store.get_bytes(key, max_bytes=records.MAX_SHARD_BYTES)
            shard = records.read_shard(data, key)
            log.info("shard %s already written by an earlier attempt; announcing it again and skipping its range", key)
            self._publish([self._event(key, data, shard.pair_ids, fp, tp, first, last)])
            commits[tp] = last + 1
            if last >= recs[-1].offset:
                if last > recs[-1].offset:
                    self.consumer.seek(tp, last + 1)
                return []
            recs = [r for r in recs if r.offset > last]
        return recs

    def _failpoint(self, name: str) -> None:
        if self.cfg.failpoint == name:
            log.error("failpoint %s: killing this process (fault-injection test)", name)
            os.kill(os.getpid(), signal.SIGKILL)


class _Answer:
    """Adapter so a pair's answer goes through the same preparation path as a gRPC ScoreItem."""

    def __init__(self, text: str):
        self.answer_text = text
