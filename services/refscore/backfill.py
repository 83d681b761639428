"""Rescore / backfill: the stored pairs, scored again under a new reference model.

    python -m services.refscore rescore --from scores/<old fingerprint id>/ --model DIR
    python -m services.refscore rescore --from archive/pairs/<topic>/ --model DIR
    python -m services.refscore rescore --from scores/<old>/ --model s3://<bucket>/runs/<run>/checkpoints/step-<N>/model/
    offdpo rescore ...                                   (the same command)

A new base model, tokenizer, chat template or dtype makes every stored score incomparable (the
trainer refuses records of another fingerprint), but the pairs are still good: each scored row
carries its PreferencePair, and the pairs archive (`offdpo.archive`) holds every pair record. The
backfill reads them, tokenises and scores them with the new reference (the same `Scorer`, the same
tokenisation boundary as the stream worker), and writes shards under the new fingerprint:

- one output shard per source object, under the key the stream worker would give that Kafka range
  (scores/<new fingerprint>/<topic>/id-<topic id>/pNNNN-<first>-<last>.parquet), so the shards keep
  their provenance and a redo writes the same keys;
- a ShardReady event per shard on the shard-ready topic (OFFDPO_TOPIC_SHARDS or --shards-topic),
  naming the same Kafka range, then a marker backfill/<new fingerprint>/announced/<...> so a rerun
  does not announce it again.

Resumable and idempotent: an output shard that exists is never scored or written again. A killed
backfill rerun skips what is written, announces a shard written but not yet announced (the kill fell
between write and event), and goes on: the same keys, no duplicate rows. Each object is one S3 PUT,
so no shard is ever half-written.

Checked before anything is written (so a refused backfill leaves nothing behind and can be rerun
after the fix): the model directory has a tokenizer; every source shard carries the fingerprint its
prefix names (a prefix that mixes fingerprints is refused, naming the shard); every pair decodes and
the new reference can tokenise it within its context (else the pair and its source object are named);
the new reference differs from the old one.

Beside live traffic: the backfill reads S3, not the pairs topic, so it joins no consumer group and
never moves the live stream's offsets; it runs its own engine (its own pod: deploy/components/backfill,
a low PriorityClass that never preempts the live services); it holds one source object at a time
and has one engine job of at most --batch-pairs pairs in flight; and if it shares a Scorer with the
live server, its jobs are a caller of their own ("backfill") in the engine's fair queue, so live
callers get every other turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kafka import KafkaProducer

from offdpo import archive, errors, records
from offdpo.config import KafkaConfig, S3Config
from offdpo.kafka import make_producer, now_timestamp
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from services.refscore.config import RefscoreConfig
from services.refscore.errors import NotReady
from services.refscore.scorer import Prepared, PreparedPair, ScoredRow, Scorer

log = logging.getLogger(__name__)

BACKFILL_CALLER = "backfill"  # its FIFO in the engine's fair queue
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# -- errors: each names what is wrong and where ---------------------------------------------------------
class RescoreError(errors.BadInput):
    """The backfill's input cannot be rescored as asked."""

    error_type = "rescore_error"


class MixedFingerprints(errors.FingerprintMismatch):
    """A source prefix holds shards scored by more than one reference."""


class ModelWithoutTokenizer(errors.ConfigError):
    """The new reference's directory (a checkpoint) has no tokenizer."""


class UnencodablePair(errors.TokenizationError):
    """The new reference cannot tokenise a stored pair (no chat template, too long for its context...)."""


class SameReference(errors.ConfigError):
    """The new reference has the fingerprint the source was scored with: nothing to rescore."""


# -- sources ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceObject:
    """One stored object whose pairs become one output shard (same topic, partition and offset range)."""

    key: str
    topic: str
    topic_id: str | None
    partition: int
    first: int
    last: int

    def out_key(self, fp_id: str) -> str:
        return records.shard_key(fp_id, self.topic, self.partition, self.first, self.last, topic_id=self.topic_id)


def parse_scores_key(key: str) -> SourceObject:
    """scores/<fp>/<topic>/[id-<topic id>/]pNNNN-<first>-<last>.parquet -> its parts."""
    parts = key.split("/")
    if parts[0] != "scores" or not key.endswith(".parquet") or len(parts) not in (4, 5):
        raise RescoreError(f"{key} is not a shard key (scores/<fingerprint>/<topic>/[id-<topic id>/]pNNNN-F-L.parquet)")
    tid = None
    if len(parts) == 5:
        if not parts[3].startswith("id-"):
            raise RescoreError(f"{key} is not a shard key: {parts[3]!r} is not an id-<topic id> segment")
        tid = parts[3][3:]
    try:
        partition, first, last = records.parse_shard_key(key)
    except ValueError:
        raise RescoreError(f"{key}: the file name is not pNNNN-<first>-<last>.parquet") from None
    return SourceObject(key, parts[2], tid, partition, first, last)


class Source:
    """Where the pairs come from: scored shards under scores/<fp>/..., or the pairs archive."""

    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix
        if prefix.startswith("scores/"):
            self.kind = "shards"
            parts = prefix.split("/")
            if len(parts) < 2 or not parts[1]:
                raise RescoreError(f"--from {prefix}: name the fingerprint (scores/<fingerprint id>/)")
            self.fingerprint_id: str | None = parts[1]
            if not prefix.endswith("/") and len(parts) == 2:
                self.prefix = prefix + "/"  # scores/ab never matches scores/abc/...
        elif prefix.startswith(archive.ARCHIVE_PREFIX.rstrip("/")):
            self.kind = "archive"
            self.fingerprint_id = None
            self.prefix = prefix if prefix.startswith(archive.ARCHIVE_PREFIX) else archive.ARCHIVE_PREFIX
        else:
            raise RescoreError(
                f"--from {prefix}: expected scores/<fingerprint id>/[...] (scored shards) or "
                f"{archive.ARCHIVE_PREFIX}[<topic>/] (the pairs archive)"
            )

    def objects(self) -> list[SourceObject]:
        if self.kind == "archive":
            keys = archive.list_archive(self.store, self.prefix)
            return [SourceObject(k.key, k.topic, k.topic_id, k.partition, k.first, k.last) for k in keys]
        out = []
        for key in self.store.list_keys(self.prefix):
            if not key.endswith(".parquet"):
                log.warning("ignoring %s: not a shard", key)
                continue
            out.append(parse_scores_key(key))
        return out

    def pairs(self, obj: SourceObject) -> tuple[list[records.PreferencePair], int, records.ReferenceFingerprint | None]:
        """The object's pairs in order, how many records were skipped (archived records that are not
        pairs: the stream worker dead-lettered them), and the fingerprint it was scored with (shards)."""
        if self.kind == "archive":
            recs = archive.read_archive(self.store.get_bytes(obj.key, max_bytes=archive.MAX_ARCHIVE_BYTES), obj.key)
            pairs, skipped = [], 0
            for r in recs:
                try:
                    pairs.append(r.pair())
                except records.RecordError as exc:
                    skipped += 1
                    log.info("%s: record %d@%d is not a pair (%s); skipped", obj.key, r.partition, r.offset, exc)
            return pairs, skipped, None
        shard = records.read_shard(self.store.get_bytes(obj.key, max_bytes=records.MAX_SHARD_BYTES), obj.key)
        if shard.fingerprint.fingerprint_id != self.fingerprint_id:
            raise MixedFingerprints(
                f"shard {obj.key} was scored by fingerprint {shard.fingerprint.fingerprint_id} "
                f"({shard.fingerprint.model_id}), not {self.fingerprint_id} as its prefix {self.prefix} says: "
                f"the prefix mixes fingerprints; rescore one fingerprint's prefix at a time"
            )
        pairs = []
        for i, raw in enumerate(shard.table.column("pair").to_pylist()):
            try:
                pairs.append(records.decode_pair(raw))
            except records.RecordError as exc:
                raise errors.CorruptShard(f"shard {obj.key} row {i}: {exc}") from None
        return pairs, 0, shard.fingerprint


# -- progress --------------------------------------------------------------------------------------------
class Progress:
    """count / total, rate and ETA on stderr, at most every `every_s` seconds (and at the end)."""

    def __init__(self, total: int, out: TextIO | None = None, every_s: float = 2.0):
        self.total = total
        self.done = 0
        self.out = out or sys.stderr
        self.every_s = every_s
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"rescore: {self.done}/{self.total} pairs ({pct:.1f}%), {rate:.1f} pairs/s, ETA {eta}",
            file=self.out,
            flush=True,
        )


@dataclass
class Result:
    fingerprint_id: str
    objects: int = 0
    shards_written: int = 0
    shards_existing: int = 0
    events_published: int = 0
    pairs_scored: int = 0
    records_skipped: int = 0
    out_keys: list[str] = dataclasses.field(default_factory=list)


# -- the backfill ----------------------------------------------------------------------------------------
class Backfill:
    def __init__(
        self,
        scorer: Scorer,
        store: ObjectStore,
        kafka: KafkaConfig,
        *,
        out_store: ObjectStore | None = None,
        batch_pairs: int = 256,
        timeout_s: float = 600.0,
        failpoint: str = "",
        progress_out: TextIO | None = None,
    ):
        self.scorer = scorer
        self.store = store
        self.out = out_store or store
        self.kafka = kafka
        self.batch_pairs = max(1, batch_pairs)
        self.timeout_s = timeout_s
        self.failpoint = failpoint
        self.progress_out = progress_out
        self._producer: KafkaProducer | None = None

    def run(self, source_prefix: str, stop: threading.Event | None = None) -> Result:
        stop = stop or threading.Event()
        fp = self.scorer.model().fingerprint
        source = Source(self.store, source_prefix)
        if source.fingerprint_id == fp.fingerprint_id:
            raise SameReference(
                f"the new reference {self.scorer.cfg.model_dir} has fingerprint {fp.fingerprint_id}, the one "
                f"{source.prefix} was scored with: nothing to rescore"
            )
        objects = source.objects()
        if not objects:
            raise RescoreError(f"nothing to rescore: no objects under {source.prefix} in bucket {self.store.bucket}")
        self.out.ensure_bucket()
        result = Result(fp.fingerprint_id, objects=len(objects))
        todo = self._preflight(source, objects, fp, result)
        progress = Progress(sum(n for _, n in todo), self.progress_out)
        log.info(
            "rescoring %d of %d objects under %s (%d pairs) into fingerprint %s",
            len(todo), len(objects), source.prefix, progress.total, fp.fingerprint_id,
        )  # fmt: skip
        try:
            for obj, _ in todo:
                if stop.is_set():
                    log.info("stop requested: %d objects left; rerun to go on", len(todo))
                    break
                self._one(source, obj, fp, result, progress)
        finally:
            self._close()
        progress.add(0, final=True)
        result.out_keys = sorted({o.out_key(fp.fingerprint_id) for o in objects})
        return result

    # Everything that can be wrong with the input is found here, before the first write.
    def _preflight(
        self,
        source: Source,
        objects: list[SourceObject],
        fp: records_pb2.ReferenceFingerprint,
        result: Result,
    ) -> list[tuple[SourceObject, int]]:
        todo = []
        for obj in objects:
            pairs, _, _ = source.pairs(obj)  # refuses a shard of another fingerprint, naming it
            out_key = obj.out_key(fp.fingerprint_id)
            if self.out.exists(out_key):
                if self.out.exists(self._marker(out_key)):
                    result.shards_existing += 1
                    continue
                todo.append((obj, 0))  # written, not announced: announce it
                continue
            for pair in pairs:
                self._prepare(obj, pair)
            todo.append((obj, len(pairs)))
        return todo

    def _prepare(self, obj: SourceObject, pair: records.PreferencePair) -> PreparedPair:
        try:
            return self.scorer.prepare_pair(pair)
        except errors.TokenizationError as exc:
            raise UnencodablePair(
                f"{obj.key}: the new reference {self.scorer.cfg.model_dir} cannot tokenise {exc}; nothing was written"
            ) from None

    def _one(
        self,
        source: Source,
        obj: SourceObject,
        fp: records_pb2.ReferenceFingerprint,
        result: Result,
        progress: Progress,
    ) -> None:
        out_key = obj.out_key(fp.fingerprint_id)
        if self.out.exists(out_key):
            data = self.out.get_bytes(out_key, max_bytes=records.MAX_SHARD_BYTES)
            shard = records.read_shard(data, out_key)
            if shard.fingerprint.fingerprint_id != fp.fingerprint_id:
                raise MixedFingerprints(f"{out_key} holds fingerprint {shard.fingerprint.fingerprint_id}")
            log.info("%s already written by an earlier run; announcing it", out_key)
            result.shards_existing += 1
            self._announce(obj, out_key, data, shard.pair_ids, fp, result)
            return
        pairs, skipped, _ = source.pairs(obj)
        result.records_skipped += skipped
        rows: list[ScoredRow] = []
        for i in range(0, len(pairs), self.batch_pairs):
            prepared = [self._prepare(obj, p) for p in pairs[i : i + self.batch_pairs]]
            rows += self._score(prepared)
            progress.add(len(prepared))
        if not rows:
            log.info("%s holds no pairs; no shard", obj.key)
            self.out.put_bytes(self._marker(out_key), b"")
            return
        data = records.scored_pairs_to_parquet([r.to_record(fp) for r in rows], fp)
        self.out.put_bytes(out_key, data, content_type="application/vnd.apache.parquet")
        log.info("wrote %s (%d pairs, from %s)", out_key, len(rows), obj.key)
        result.shards_written += 1
        result.pairs_scored += len(rows)
        if self.failpoint == "after_shard_write":
            log.error("failpoint after_shard_write: killing this process (fault-injection test)")
            os.kill(os.getpid(), signal.SIGKILL)
        self._announce(obj, out_key, data, [r.prepared.pair.pair_id for r in rows], fp, result)

    def _score(self, prepared: list[PreparedPair]) -> list[ScoredRow]:
        items = [Prepared(p.prompt_ids, answer) for p in prepared for answer in (p.chosen_ids, p.rejected_ids)]
        future = self.scorer.submit_score(items, caller=BACKFILL_CALLER)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                logps = future.result(timeout=1.0)
                break
            except TimeoutError:
                if time.monotonic() >= deadline or not self.scorer.engine_alive():
                    future.cancel()
                    raise NotReady(f"the engine did not answer within {self.timeout_s:.0f} s") from None
        return [ScoredRow(p, logps[2 * i], logps[2 * i + 1]) for i, p in enumerate(prepared)]

    def _marker(self, out_key: str) -> str:
        fp_id = out_key.split("/")[1]
        return f"backfill/{fp_id}/announced/{out_key.split('/', 2)[2]}"

    def _announce(
        self,
        obj: SourceObject,
        out_key: str,
        data: bytes,
        pair_ids: list[str],
        fp: records_pb2.ReferenceFingerprint,
        result: Result,
    ) -> None:
        event = records_pb2.ShardReady(
            bucket=self.out.bucket,
            object_key=out_key,
            row_count=len(pair_ids),
            pair_ids=pair_ids,
            fingerprint=fp,
            source_ranges=[
                records_pb2.KafkaRange(
                    topic=obj.topic, partition=obj.partition, first_offset=obj.first, last_offset=obj.last
                )
            ],
            sha256=records.sha256_hex(data),
            created_at=now_timestamp(),
        )
        if self._producer is None:
            self._producer = make_producer(self.kafka, "refscore-backfill")
        future = self._producer.send(self.kafka.shards_topic, key=out_key.encode(), value=event.SerializeToString())
        self._producer.flush(timeout=60)
        future.get(timeout=60)
        self.out.put_bytes(self._marker(out_key), b"")
        result.events_published += 1

    def _close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=10)


# -- command line ----------------------------------------------------------------------------------------
def check_model_dir(model_dir: str | Path) -> Path:
    """The new reference's directory must exist and hold a tokenizer (a bare checkpoint has none)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise errors.ConfigError(f"--model {path}: no such directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelWithoutTokenizer(
            f"--model {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): a checkpoint saved "
            f"without its tokenizer cannot score text; save it next to the weights (tokenizer.save_pretrained)"
        )
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="scores/<old fingerprint id>/[<topic>/] (scored shards) or archive/pairs/[<topic>/] (the pairs "
        "archive); s3://BUCKET/... to read another bucket",
    )
    p.add_argument(
        "--model",
        required=True,
        help="the new reference: a model directory (weights + tokenizer) or a trainer checkpoint in S3 "
        "(s3://BUCKET/runs/<run>/checkpoints/step-<N>/model/, downloaded once into OFFDPO_REFSCORE_MODEL_CACHE)",
    )
    p.add_argument("--engine", help="vllm or transformers (default: OFFDPO_REFSCORE_ENGINE)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: OFFDPO_REFSCORE_DTYPE)")
    p.add_argument("--to-bucket", help="write the new shards to this bucket (default: the source's)")
    p.add_argument("--shards-topic", help="announce the new shards on this topic (default: OFFDPO_TOPIC_SHARDS)")
    p.add_argument("--batch-pairs", type=int, default=64, help="most pairs in one engine job (default 64)")


def run(args: argparse.Namespace, progress_out: TextIO | None = None) -> int:
    """`rescore` from parsed arguments; exit 0, or 2 with the reason on stderr for bad input."""
    try:
        from services.refscore.model_source import is_s3_uri, parse_s3_uri

        if is_s3_uri(args.model):  # a trainer checkpoint in S3: downloaded (and checked) as refscore does
            parse_s3_uri(args.model)
        else:
            check_model_dir(args.model)
        overrides = {"model_dir": str(args.model)}
        if args.engine:
            overrides["engine"] = args.engine
        if args.dtype:
            overrides["dtype"] = args.dtype
        cfg = dataclasses.replace(RefscoreConfig.from_env(), **overrides)
        cfg.engine_settings()
        s3 = S3Config.from_env()
        kafka = KafkaConfig.from_env()
        if args.shards_topic:
            kafka = dataclasses.replace(kafka, shards_topic=args.shards_topic)
        bucket, prefix = _split_source(args.source, s3.bucket)
        store = ObjectStore(s3, bucket)
        out = ObjectStore(s3, args.to_bucket) if args.to_bucket else store
        scorer = Scorer(cfg)
        from offdpo.shutdown import StopOnSignals

        with StopOnSignals("the backfill finishes the shard it is writing, then stops (rerun to go on)") as signals:
            try:
                scorer.load()
            except Exception as exc:  # noqa: BLE001 - a reference that cannot load is a bad --model
                raise errors.ConfigError(f"--model {args.model} cannot be loaded as a reference: {exc}") from exc
            try:
                result = Backfill(
                    scorer,
                    store,
                    kafka,
                    out_store=out,
                    batch_pairs=args.batch_pairs,
                    timeout_s=cfg.stall_s,
                    failpoint=cfg.failpoint,
                    progress_out=progress_out,
                ).run(prefix, signals.requested)
            finally:
                scorer.shutdown()
    except (errors.BadInput, errors.ConfigError) as exc:
        print(f"rescore: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(
        f"rescore: done: {result.pairs_scored} pairs scored into {result.shards_written} new shards, "
        f"{result.shards_existing} already there, {result.events_published} announced, "
        f"{result.records_skipped} archived records skipped; fingerprint {result.fingerprint_id}",
        file=sys.stderr,
    )
    return 0


def _split_source(source: str, default_bucket: str) -> tuple[str, str]:
    if source.startswith("s3://"):
        bucket, _, prefix = source[len("s3://") :].partition("/")
        return bucket, prefix
    return default_bucket, source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.refscore rescore",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
