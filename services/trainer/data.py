"""Where training records come from, and the checks they pass first.

Replay: every *.parquet under an S3 prefix, validated up front (a bad shard stops the run before
step 1), de-duplicated by pair_id, shuffled per epoch with (seed, epoch). The order is a pure
function of (shard list, seed, epoch), so a resumed run skips exactly the pairs it already trained.

Continuous: ShardReady events from Kafka. Events are de-duplicated by object key (refscore may
announce a shard twice after a crash), pairs by pair_id. A bad shard is dead-lettered with the
reason and training goes on. Offsets are committed (`StreamSource.commit`) only after a checkpoint
holding the source's state is written, so after a crash the events come back and the pair_id filter
drops what was trained.

Refusals are `offdpo.errors` classes (CorruptShard, FingerprintMismatch, DecodeError, ...): a
dead letter's error_type is the class's, never read from the message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import tenacity
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from offdpo import kafka as okafka
from offdpo import retry
from offdpo.config import KafkaConfig
from offdpo.errors import BadInput, FingerprintMismatch, RecordError
from offdpo.kafka import GROUP_CHANGED, MAX_RECORD_BYTES, DeadLetterSink
from offdpo.records import ReferenceFingerprint, ShardReady, decode, fingerprint_mismatch, read_shard
from services.trainer.config import TrainerConfig

log = logging.getLogger(__name__)


class DataError(BadInput):
    """The run's training data was refused as a whole (replay: a bad shard or record stops the run
    before step 1; a resume that cannot continue exactly once). The message names the shard, the pair
    and what to fix."""

    error_type = "data_refused"


class ObjectReader(Protocol):
    """What the sources read from the object store (offdpo.s3.ObjectStore)."""

    bucket: str

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def list_keys(self, prefix: str) -> list[str]: ...


@dataclass
class Example:
    pair_id: str
    prompt: list
    chosen: list
    rejected: list
    ref_chosen: list  # per-token reference log-probs of `chosen`
    ref_rejected: list
    shard: str

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def check_fingerprint(
    shard_fp: ReferenceFingerprint, expected_fp: ReferenceFingerprint, allowed_ids: Iterable[str], what: str
) -> None:
    """Raises FingerprintMismatch unless the shard was scored by this run's reference (or is allowed)."""
    if shard_fp.fingerprint_id in allowed_ids:
        return
    diff = fingerprint_mismatch(expected_fp, shard_fp)
    if diff:
        raise FingerprintMismatch(
            f"{what}: reference fingerprint {shard_fp.fingerprint_id} does not match this run's "
            f"reference {expected_fp.fingerprint_id} ({diff}). Rescore with the run's reference, point "
            f"--reference-model at the model that scored it, or accept it deliberately with "
            f"--allow-fingerprint {shard_fp.fingerprint_id}"
        )


def examples_from_shard(
    data: bytes,
    key: str,
    expected_fp: ReferenceFingerprint,
    allowed_ids: Iterable[str],
    max_length: int,
    truncation: str,
) -> tuple[list[Example], list[str]]:
    """Parse and check one shard. Returns (examples, refusals of single records); a shard-level fault
    raises CorruptShard or FingerprintMismatch.

    Truncation rule: a record is too long when len(prompt) + max(len(chosen), len(rejected)) > max_length.
    'refuse' refuses it; 'truncate_answers' keeps the prompt and cuts both answers to the tokens that
    fit, with their reference log-probs cut the same way (causal: a prefix's log-probs do not change).
    A prompt that leaves no room for an answer is always refused.
    """
    shard = read_shard(data, what=f"shard {key}")
    check_fingerprint(shard.fingerprint, expected_fp, allowed_ids, f"shard {key}")
    cols = {
        c: shard.table.column(c).to_pylist()
        for c in (
            "pair_id",
            "prompt_token_ids",
            "chosen_token_ids",
            "rejected_token_ids",
            "chosen_logprobs",
            "rejected_logprobs",
        )
    }
    examples: list[Example] = []
    refusals: list[str] = []
    for i, pid in enumerate(cols["pair_id"]):
        p, c, r = cols["prompt_token_ids"][i], cols["chosen_token_ids"][i], cols["rejected_token_ids"][i]
        lc, lr = cols["chosen_logprobs"][i], cols["rejected_logprobs"][i]
        if not p or not c or not r:
            refusals.append(f"pair {pid} in shard {key}: empty prompt or answer (the prompt must hold at least BOS)")
            continue
        total = len(p) + max(len(c), len(r))
        if total > max_length:
            room = max_length - len(p)
            if truncation != "truncate_answers" or room < 1:
                refusals.append(
                    f"pair {pid} in shard {key} is {total} tokens (prompt {len(p)} + longest answer "
                    f"{max(len(c), len(r))}), over --max-length {max_length}; raise --max-length or set "
                    f"--truncation truncate_answers"
                )
                continue
            c, lc, r, lr = c[:room], lc[:room], r[:room], lr[:room]
        examples.append(Example(pid, p, c, r, lc, lr, key))
    return examples, refusals


# -- the sources ----------------------------------------------------------------------------------
class Source(Protocol):
    """Where the training loop's pairs come from (on rank 0 only)."""

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        """Optimizer steps the run will take, when known (it shapes the learning-rate schedule)."""
        ...

    def next_batch(self, size: int) -> list[Example] | None:
        """Up to `size` pairs; None when there are no more (or a stop was requested while waiting)."""
        ...

    def mark_trained(self, batch: list[Example]) -> None: ...

    def state(self) -> dict[str, Any]:
        """The data position, saved in each checkpoint."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def commit(self) -> None:
        """Let the upstream forget what the checkpoint just written covers."""
        ...

    def close(self) -> None: ...


# -- replay ------------------------------------------------------------------------------------
class ReplaySource:
    """Fixed epochs over an S3 prefix. Position = (epoch, index into that epoch's shuffled order)."""

    def __init__(
        self,
        store: ObjectReader,
        prefix: str,
        epochs: int,
        seed: int,
        expected_fp: ReferenceFingerprint,
        allowed_ids: Iterable[str],
        max_length: int,
        truncation: str,
    ):
        keys = [k for k in store.list_keys(prefix) if k.endswith(".parquet")]
        if not keys:
            raise DataError(f"no *.parquet shards under s3://{store.bucket}/{prefix}")
        by_id: dict[str, Example] = {}
        for key in keys:
            examples, refusals = examples_from_shard(
                store.get_bytes(key), key, expected_fp, allowed_ids, max_length, truncation
            )
            if refusals:
                raise DataError(f"{len(refusals)} record(s) refused, nothing trained: " + "; ".join(refusals[:5]))
            for e in examples:
                by_id.setdefault(e.pair_id, e)  # identity by content: a pair in two shards trains once
        self.shards = keys
        self.pairs = [by_id[k] for k in sorted(by_id)]
        self.epochs, self.seed = epochs, seed
        self.epoch, self.index = 0, 0
        log.info("replay: %d shards, %d unique pairs, %d epochs", len(keys), len(self.pairs), epochs)

    def order(self, epoch: int) -> list[Example]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(self.pairs)
        rng.shuffle(order)
        return order

    def steps_per_epoch(self, batch: int) -> int:
        return -(-len(self.pairs) // batch)

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        total = self.epochs * self.steps_per_epoch(batch)
        return min(total, max_steps) if max_steps else total

    def next_batch(self, size: int) -> list[Example] | None:
        while self.epoch < self.epochs:
            order = self.order(self.epoch)
            if self.index < len(order):
                batch = order[self.index : self.index + size]  # the last batch of an epoch may be short
                self.index += len(batch)
                return batch
            self.epoch, self.index = self.epoch + 1, 0
        return None

    def mark_trained(self, batch: list[Example]) -> None:
        pass  # the position moved when the batch was taken; a resume restores it from the checkpoint

    def state(self) -> dict[str, Any]:
        return {"mode": "replay", "epoch": self.epoch, "index": self.index, "shards": self.shards}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("shards") != self.shards:
            raise DataError(
                "the shards under the prefix changed since the checkpoint (was "
                f"{len(state.get('shards', []))}, now {len(self.shards)}); replay needs the same set to "
                "resume exactly once, start a new --run-name"
            )
        self.epoch, self.index = state["epoch"], state["index"]

    def commit(self) -> None:
        pass  # nothing upstream to tell: the position lives in the checkpoint only

    def close(self) -> None:
        pass


# -- continuous --------------------------------------------------------------------------------
@dataclass
class _Event:
    partition: int
    offset: int
    key: str
    pending: set[str] = field(default_factory=set)  # pair ids of this event not yet trained


def _commit_retryable(exc: BaseException) -> bool:
    # A group change is not retried: only the next poll() completes a rebalance, and a retry loop
    # here would hold that poll up.
    return isinstance(exc, KafkaError) and not isinstance(exc, GROUP_CHANGED)


class StreamSource:
    """Follows the shard-ready topic. Not thread-safe; lives on rank 0.

    `consumer` is a kafka-python KafkaConsumer subscribed to `topic`; `deadletter` receives the events
    whose shard cannot be trained; `stop`, once set, makes `next_batch` stop waiting and return None.
    """

    COMMIT_ATTEMPTS = 5

    def __init__(
        self,
        store: ObjectReader,
        consumer: Any,
        deadletter: DeadLetterSink,
        expected_fp: ReferenceFingerprint,
        allowed_ids: Iterable[str],
        max_length: int,
        truncation: str,
        poll_timeout_ms: int,
        stop_when_idle_s: float,
        topic: str,
        stop: threading.Event | None = None,
    ):
        self.store, self.consumer, self.deadletter = store, consumer, deadletter
        self.expected_fp, self.allowed_ids = expected_fp, allowed_ids
        self.max_length, self.truncation = max_length, truncation
        self.poll_timeout_ms, self.stop_when_idle_s, self.topic = poll_timeout_ms, stop_when_idle_s, topic
        self.stop = stop
        self.trained: set[str] = set()  # pair ids trained in this run (the one "epoch" of a stream)
        self.done_shards: set[str] = set()  # object keys whose every pair is trained
        self.buffer: list[Example] = []
        self.buffered: set[str] = set()
        self.events: list[_Event] = []  # in arrival order, until fully trained
        self.last_offset: dict[int, int] = {}
        self.last_new = time.monotonic()

    def _in_flight(self) -> set[str]:
        return {e.key for e in self.events}

    def _read(self, rec: Any) -> tuple[str, list[Example]] | None:
        """The event's shard key and its examples; None when the event was dead-lettered or seen before."""
        what = f"shard-ready event {rec.topic}[{rec.partition}]@{rec.offset}"
        try:
            event = decode(ShardReady, rec.value, MAX_RECORD_BYTES, what)
        except RecordError as exc:
            self.deadletter.send_record(rec, str(exc), exc.error_type)
            return None
        key = event.object_key
        if key in self.done_shards or key in self._in_flight():
            log.info("shard %s announced again: already taken, skipped", key)
            return None
        try:
            if event.fingerprint.fingerprint_id:  # cheap check before downloading
                check_fingerprint(event.fingerprint, self.expected_fp, self.allowed_ids, f"shard {key}")
            examples, refusals = examples_from_shard(
                self.store.get_bytes(key), key, self.expected_fp, self.allowed_ids, self.max_length, self.truncation
            )
        except BadInput as exc:  # CorruptShard, FingerprintMismatch
            self.deadletter.send_record(rec, str(exc), exc.error_type)
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. the object is missing: dead-letter, keep training
            self.deadletter.send_record(
                rec, f"shard {key} could not be read: {type(exc).__name__}: {exc}", "shard_unreadable"
            )
            return None
        if refusals:
            self.deadletter.send_record(
                rec, f"{len(refusals)} record(s) refused, the rest trained: " + "; ".join(refusals), "record_too_long"
            )
        return key, examples

    def _handle(self, rec: Any) -> None:
        self.last_offset[rec.partition] = rec.offset
        read = self._read(rec)
        if read is None:
            return
        key, examples = read
        ev = _Event(rec.partition, rec.offset, key)
        for e in examples:
            if e.pair_id in self.trained or e.pair_id in self.buffered:
                continue
            ev.pending.add(e.pair_id)
            self.buffered.add(e.pair_id)
            self.buffer.append(e)
        self.events.append(ev)
        self.last_new = time.monotonic()

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        return max_steps or None

    def next_batch(self, size: int, min_size: int = 1) -> list[Example] | None:
        """A full batch as soon as enough pairs arrived; on idle stop, what is left (if >= min_size)."""
        while len(self.buffer) < size:
            if self.stop is not None and self.stop.is_set():
                return None  # the buffered pairs are not trained, so not committed: they come back
            polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
            for tp in sorted(polled, key=lambda t: t.partition):
                for rec in polled[tp]:
                    self._handle(rec)
            if not self.consumer.assignment():  # still joining the group: idle time starts once we have partitions
                self.last_new = time.monotonic()
                continue
            if not polled and self.stop_when_idle_s and time.monotonic() - self.last_new > self.stop_when_idle_s:
                if len(self.buffer) >= min_size:
                    break
                return None
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        self.buffered -= {e.pair_id for e in batch}
        return batch

    def mark_trained(self, batch: list[Example]) -> None:
        ids = {e.pair_id for e in batch}
        self.trained |= ids
        for ev in self.events:
            ev.pending -= ids
        for ev in [e for e in self.events if not e.pending]:
            self.done_shards.add(ev.key)
        self.events = [e for e in self.events if e.pending]

    def resume_offsets(self) -> dict[int, int]:
        """Per partition, the first offset not fully trained: what Kafka may forget is before it."""
        out = {}
        for part, last in self.last_offset.items():
            pending = [e.offset for e in self.events if e.partition == part]
            out[part] = min(pending) if pending else last + 1
        return out

    def commit(self) -> None:
        """Commit `resume_offsets()`, right after a checkpoint holding this source's state is written.

        A commit fails while the broker is down (retried with backoff) or is refused while the group
        rebalances. The checkpoint already holds the trained pair ids, so a commit that still fails is
        deferred to the next checkpoint: events redelivered after a restart are filtered, never
        trained twice."""
        offsets = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in self.resume_offsets().items()
        }
        attempts = retry.policy("offset commit", retry_if=_commit_retryable, initial_s=0.5).copy(
            stop=tenacity.stop_after_attempt(self.COMMIT_ATTEMPTS), before_sleep=_log_commit_retry
        )
        try:
            attempts(self.consumer.commit, offsets)
        except GROUP_CHANGED as exc:
            log.warning(
                "offset commit refused by a group rebalance (%s); deferred to the next checkpoint", type(exc).__name__
            )
        except KafkaError as exc:
            log.warning(
                "offset commit failed %d times (%s); deferred to the next checkpoint", self.COMMIT_ATTEMPTS, exc
            )

    def state(self) -> dict[str, Any]:
        return {
            "mode": "continuous",
            "trained_pair_ids": sorted(self.trained),
            "done_shards": sorted(self.done_shards),
            "offsets": {str(p): o for p, o in self.resume_offsets().items()},
            "topic": self.topic,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.trained = set(state.get("trained_pair_ids", []))
        self.done_shards = set(state.get("done_shards", []))

    def close(self) -> None:
        self.consumer.close()
        self.deadletter.flush()


def open_source(
    cfg: TrainerConfig,
    store: ObjectReader,
    kafka: KafkaConfig,
    expected_fp: ReferenceFingerprint,
    stop: threading.Event,
) -> Source:
    """The source `cfg.mode` asks for. Replay reads and checks every shard now (raising BadInput)."""
    allowed = set(cfg.allow_fingerprint)
    if cfg.mode == "replay":
        return ReplaySource(
            store, cfg.prefix, cfg.epochs, cfg.seed, expected_fp, allowed, cfg.max_length, cfg.truncation
        )
    group = cfg.consumer_group or f"offdpo-trainer-{cfg.run_name}"
    # Looked up on the module when called, so a test can put a wrapped client in its place.
    consumer = okafka.make_consumer(kafka, group, [kafka.shards_topic])
    sink = DeadLetterSink(okafka.make_producer(kafka, f"trainer-{cfg.run_name}"), kafka, "trainer")
    return StreamSource(
        store,
        consumer,
        sink,
        expected_fp,
        allowed,
        cfg.max_length,
        cfg.truncation,
        cfg.poll_timeout_ms,
        cfg.stop_when_idle_s,
        kafka.shards_topic,
        stop=stop,
    )


def _log_commit_retry(state: tenacity.RetryCallState) -> None:
    # The trainer's own line for a commit retry, in place of the policy's generic one: a commit is
    # retried a few times only, then deferred (see StreamSource.commit).
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("offset commit failed (%s); retrying in %.1f s", exc, delay)
