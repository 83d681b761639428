"""Continuous: ShardReady events from Kafka, at most `max_poll_records` per poll. Events are
de-duplicated by object key (refscore may announce a shard twice after a crash), pairs by pair_id. A
shard whose data is wrong is dead-lettered with the reason and training goes on. Offsets are
committed (`StreamSource.commit`) only after a checkpoint holding the source's state is written, so
after a crash the events come back and the state says which of them, and which of their pairs, were
already trained (see `StreamSource` for why that state stays bounded and is still exactly once).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tenacity
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from offdpo import broker_profile, retry
from offdpo import kafka as okafka
from offdpo.errors import BadInput, RecordError
from offdpo.kafka import GROUP_CHANGED, MAX_RECORD_BYTES, DeadLetterSink
from offdpo.records import (
    MAX_SHARD_BYTES,
    ReferenceFingerprint,
    ShardReady,
    decode,
    parse_shard_key,
)
from services.trainer.examples import EvalSet, Example, Refusal
from services.trainer.infra import (
    KAFKA_PROBE_EVERY_S,
    KAFKA_PROBE_TIMEOUT_MS,
    InfraStatus,
    Interrupted,
    until_done,
)
from services.trainer.shards import (
    ObjectReader,
    check_fingerprint,
    examples_from_shard,
    fetch_shard,
)

log = logging.getLogger(__name__)


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


class _Recent:
    """The last `size` distinct strings added, in order, with O(1) membership."""

    def __init__(self, size: int, items: Iterable[str] = ()):
        self.size = size
        self.order: collections.deque[str] = collections.deque()
        self.members: set[str] = set()
        for item in items:
            self.add(item)

    def add(self, item: str) -> None:
        if item in self.members or self.size <= 0:
            return
        self.order.append(item)
        self.members.add(item)
        while len(self.order) > self.size:
            self.members.discard(self.order.popleft())

    def __contains__(self, item: object) -> bool:
        return item in self.members

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)


class TrainedShards:
    """Exactly which shards are done, in state that grows with the gaps between them, not with the run.

    A shard key made by refscore (`records.shard_key`) names one partition's offset range of the pairs
    topic under its reference and topic incarnation: scores/<fp>/<topic>/[id-<tid>/]pNNNN-<first>-<last>.
    The done ranges of each such partition are kept merged (adjacent or overlapping ranges become one),
    so a run that trains its stream in order holds one interval per partition however long it runs,
    and a shard announced again any time later (a redo, `offdpo deadletter replay`, a replica that
    lost its group) is known done exactly, never forgotten. Keys of another form are kept as they are.
    """

    def __init__(self) -> None:
        self.ranges: dict[str, list[list[int]]] = {}  # "<dir>/pNNNN" -> sorted disjoint [first, last]
        self.keys: set[str] = set()

    @staticmethod
    def _split(key: str) -> tuple[str, int, int] | None:
        head, _, name = key.rpartition("/")
        try:
            partition, first, last = parse_shard_key(name)
        except ValueError:
            return None
        if not name.endswith(".parquet") or first > last:
            return None
        return f"{head}/p{partition:04d}", first, last

    def add(self, key: str) -> None:
        split = self._split(key)
        if split is None:
            self.keys.add(key)
            return
        group, first, last = split
        out: list[list[int]] = []
        for a, b in sorted(self.ranges.get(group, []) + [[first, last]]):
            if out and a <= out[-1][1] + 1:  # overlapping or adjacent offsets: one range
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        self.ranges[group] = out

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        split = self._split(key)
        if split is None:
            return key in self.keys
        group, first, last = split
        return any(a <= first and last <= b for a, b in self.ranges.get(group, ()))

    def state(self) -> dict[str, Any]:
        return {"ranges": self.ranges, "keys": sorted(self.keys)}

    def load(self, state: dict[str, Any]) -> None:
        for group, ranges in state.get("ranges", {}).items():
            for a, b in ranges:
                name = f"p{int(group.rsplit('/p', 1)[1]):04d}-{int(a):012d}-{int(b):012d}.parquet"
                self.add(f"{group.rsplit('/', 1)[0]}/{name}")
        for key in state.get("keys", []):
            self.keys.add(key)


class StreamSource:
    """Follows the shard-ready topic. Not thread-safe; lives on rank 0.

    `consumer` is a kafka-python KafkaConsumer subscribed to `topic`; `deadletter` receives the events
    whose shard cannot be trained; `stop`, once set, makes `next_batch` stop waiting and return None.

    Exactly once with bounded state. Refscore writes one shard per (partition, offset range) of the
    pairs topic and announces it with one event; this source handles the events of each partition of
    the shard-ready topic in offset order, and each event ends either done (its pairs trained, held
    out, or already trained; or dead-lettered) or in flight (some pairs not trained yet). The
    checkpoint holds, per partition, the watermark (the first offset not done: every event before it
    is done), the offsets of the done events above it, and the in-flight events with the pair ids
    they still owe. After a crash Kafka redelivers from the committed offset, which is never past the
    watermark (it is the watermark, committed after the checkpoint that holds it). A redelivered event
    below the watermark or listed done is skipped, an in-flight one yields only the pairs it still
    owes, any other is new: so every event's pairs train once, whatever was or was not committed.
    That state grows with the events in flight (bounded by --max-poll-records and the batch size),
    not with the length of the run, unlike the set of every pair id trained it replaces.
    The same pair in two *different* shards (content labelled twice) is filtered by a window of the
    last `dedup_window` trained pair ids, also in the checkpoint; such a duplicate arriving further
    apart than the window trains again, as a new sample.
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
        *,
        vocab_size: int | None = None,
        max_poll_records: int = 16,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        dedup_window: int = 16384,
        evals: EvalSet | None = None,
        infra: InfraStatus | None = None,
        new_consumer: Callable[[], Any] | None = None,
        other_references: Iterable[str] = (),
        offset_holes: broker_profile.Poller | None = None,
        assignment_watch: broker_profile.MemberWatch | None = None,
    ):
        self.store, self.consumer, self.deadletter = store, consumer, deadletter
        # Events after a hole in a partition's offsets wait for it to fill (several refscore replicas
        # announce into one partition; the broker profile's poller). None: polled as they come.
        self.offset_holes = offset_holes or broker_profile.PlainPoller()
        # Fingerprint ids of the other references refscore scores into the same topic (a trainer follows
        # one): their events are skipped, not dead-lettered (OFFDPO_TRAINER_OTHER_REFERENCES).
        self.other_references = frozenset(other_references)
        self.skipped_other = 0
        # The run's group has this one member, so it must hold every partition of the topic; one left
        # without some is replaced by a new member built by `new_consumer`, on a broker whose profile
        # says a rejoin may not mend it. None: never replaced.
        self.new_consumer = new_consumer
        self.assignment_watch = assignment_watch or broker_profile.member_watch([topic])
        self.expected_fp, self.allowed_ids = expected_fp, allowed_ids
        self.max_length, self.truncation, self.vocab_size = max_length, truncation, vocab_size
        self.poll_timeout_ms, self.stop_when_idle_s, self.topic = poll_timeout_ms, stop_when_idle_s, topic
        self.max_poll_records, self.max_shard_bytes = max_poll_records, max_shard_bytes
        self.stop = stop
        self.evals = evals or EvalSet(0.0, 0)
        self.infra = infra if infra is not None else InfraStatus()  # shared with the readiness probe
        self.recent = _Recent(dedup_window)  # pair ids trained most recently
        self.done_shards = TrainedShards()  # shards whose every pair is trained (or skipped), exactly
        self.buffer: list[Example] = []
        self.buffered: set[str] = set()
        self.events: list[_Event] = []  # in flight, in arrival order
        self.last_offset: dict[int, int] = {}  # per partition, the last event handled by this process
        self._kafka_probed_at: float | None = None
        self._kafka_down = False
        self.floor: dict[int, int] = {}  # per partition, the watermark of the checkpoint resumed from
        self.done_offsets: dict[int, set[int]] = {}  # done events at or above the watermark
        self.owed: dict[tuple[int, int], set[str]] = {}  # the checkpoint's in-flight events, not seen again yet
        self.owed_keys: dict[tuple[int, int], str] = {}
        # The incarnation of the topic the offsets above belong to (its topic id; None: not known yet,
        # or a broker without topic ids). A topic deleted and created again restarts its offsets at 0.
        self.topic_id: str | None = None
        self.last_new = time.monotonic()

    def _in_flight(self) -> set[str]:
        return {e.key for e in self.events}

    def _dead_letter(self, rec: Any, reason: str, error_type: str) -> None:
        # DeadLetterSink.send raises errors.Unavailable until the broker acknowledges: retried here,
        # since the event's offset may only be committed past once its dead letter is durable.
        what = f"dead letter for {rec.topic}[{rec.partition}]@{rec.offset}"
        until_done(what, lambda: self.deadletter.send_record(rec, reason, error_type), self.infra, self.stop)

    def _read(self, rec: Any) -> tuple[str, list[Example]] | None:
        """The event's shard key and its examples; None when the event was dead-lettered or seen before.
        Raises Interrupted when a stop came while the shard could not be fetched."""
        what = f"shard-ready event {rec.topic}[{rec.partition}]@{rec.offset}"
        try:
            event = decode(ShardReady, rec.value, MAX_RECORD_BYTES, what)
        except RecordError as exc:
            self._dead_letter(rec, str(exc), exc.error_type)
            return None
        key = event.object_key
        if key in self.done_shards or key in self._in_flight():
            log.info("shard %s announced again: already taken, skipped", key)
            return None
        other = event.fingerprint.fingerprint_id
        if (
            other in self.other_references
            and other != self.expected_fp.fingerprint_id
            and other not in self.allowed_ids
        ):
            self.skipped_other += 1
            self.done_shards.add(key)  # announced again: skipped unread, without this line again
            log.info(
                "shard %s is scored under reference %s (%s), one of OFFDPO_TRAINER_OTHER_REFERENCES: skipped "
                "(%d such shard(s) so far)",
                key,
                other,
                event.fingerprint.model_id,
                self.skipped_other,
            )
            return None
        try:
            if event.fingerprint.fingerprint_id:  # cheap check before downloading
                check_fingerprint(event.fingerprint, self.expected_fp, self.allowed_ids, f"shard {key}")
            data = until_done(
                f"fetch shard {key}",
                lambda: fetch_shard(self.store, key, self.max_shard_bytes),
                self.infra,
                self.stop,
            )
            examples, refusals = examples_from_shard(
                data, key, self.expected_fp, self.allowed_ids, self.max_length, self.truncation, self.vocab_size
            )
        except BadInput as exc:  # CorruptShard, FingerprintMismatch, ShardMissing, ShardTooLarge
            self._dead_letter(rec, str(exc), exc.error_type)
            return None
        by_type: dict[str, list[Refusal]] = {}
        for refusal in refusals:
            by_type.setdefault(refusal.error_type, []).append(refusal)
        for error_type, items in sorted(by_type.items()):
            shown = "; ".join(items[:200]) + (f"; and {len(items) - 200} more" if len(items) > 200 else "")
            self._dead_letter(rec, f"{len(items)} record(s) refused, the rest trained: {shown}", error_type)
        return key, examples

    def _handle(self, rec: Any) -> None:
        part, offset = rec.partition, rec.offset
        if offset <= self.last_offset.get(part, -1) or offset < self.floor.get(part, 0):
            return  # handled already: redelivered after a rejoin, or before the checkpoint resumed from
        if offset in self.done_offsets.get(part, ()):
            self.last_offset[part] = offset
            return
        read = self._read(rec)  # may raise Interrupted: then this event is not handled
        self.last_offset[part] = offset
        owed = self.owed.pop((part, offset), None)
        self.owed_keys.pop((part, offset), None)
        if read is None:
            self.done_offsets.setdefault(part, set()).add(offset)
            return
        key, examples = read
        ev = _Event(part, offset, key)
        for e in examples:
            if self.evals.offer(e):
                continue  # held out for evaluation: never trained
            if e.pair_id in self.recent or e.pair_id in self.buffered:
                continue
            if owed is not None and e.pair_id not in owed:
                continue  # trained before the checkpoint this run resumed from
            ev.pending.add(e.pair_id)
            self.buffered.add(e.pair_id)
            self.buffer.append(e)
        if ev.pending:
            self.events.append(ev)
        else:
            self._finished(ev)
        self.last_new = time.monotonic()

    def _topic_recreated(self) -> bool:
        """Whether the topic now has another id than the one this source's offsets belong to. Then its
        offsets (the checkpoint's watermarks, done and owed events, the group's committed offsets)
        say nothing about the new topic: they are dropped, and the new topic is read from its beginning.
        Nothing is trained twice: a shard already trained is still skipped by its key (done_shards) and
        its pairs by their ids (recent)."""
        tid = okafka.topic_id(self.consumer, self.topic)
        if tid is None:
            return False
        old, self.topic_id = self.topic_id, tid
        if old is None or old == tid:
            return False
        log.warning(
            "topic %s was deleted and created again (topic id %s -> %s): the offsets of the checkpoint and "
            "of the group belong to the old topic; reading the new one from its beginning",
            self.topic,
            old,
            tid,
        )
        self.floor, self.done_offsets, self.last_offset = {}, {}, {}
        self.owed, self.owed_keys = {}, {}
        for ev in self.events:
            ev.offset = -1  # its pairs still train; its old offset must never mark a new event done
        partitions = [tp for tp in self.consumer.assignment() if tp.topic == self.topic]
        if partitions:
            self.consumer.seek_to_beginning(*partitions)
        return True

    def _finished(self, ev: _Event) -> None:
        if ev.offset < 0:  # an event of a topic since recreated
            self.done_shards.add(ev.key)
            return
        self.done_offsets.setdefault(ev.partition, set()).add(ev.offset)
        self.done_shards.add(ev.key)

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        return max_steps or None

    def next_batch(self, size: int, min_size: int = 1) -> list[Example] | None:
        """A full batch as soon as enough pairs arrived; on idle stop, what is left (if >= min_size)."""
        try:
            while len(self.buffer) < size:
                if self.stop is not None and self.stop.is_set():
                    return None  # the buffered pairs are not trained, so not committed: they come back
                polled = self.offset_holes.poll(
                    self.consumer, timeout_ms=self.poll_timeout_ms, max_records=self.max_poll_records
                )
                if polled and self._topic_recreated():
                    continue  # read again from the new topic's beginning
                for tp in sorted(polled, key=lambda t: t.partition):
                    for rec in polled[tp]:
                        self._handle(rec)
                # Still joining, or holding only some partitions: idle time starts once we hold them all
                # (a partition nobody reads is not idle).
                if not self.consumer.assignment() or self.assignment_watch.missing(self.consumer):
                    self.last_new = time.monotonic()
                    if self.new_consumer is not None and self.assignment_watch.needs_new_consumer(self.consumer):
                        self._replace_consumer()
                    continue
                if not polled and not self._kafka_reachable():
                    self.last_new = time.monotonic()  # an outage is not a quiet topic: never idle-stop on it
                    continue
                if not polled and self.stop_when_idle_s and time.monotonic() - self.last_new > self.stop_when_idle_s:
                    if len(self.buffer) >= min_size:
                        break
                    return None
        except Interrupted as exc:
            log.warning("%s: the event in hand is not done and not committed; it comes back on restart", exc)
            return None
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        self.buffered -= {e.pair_id for e in batch}
        return batch

    def mark_trained(self, batch: list[Example]) -> None:
        ids = {e.pair_id for e in batch}
        for e in batch:  # in batch order: the window forgets the oldest first
            self.recent.add(e.pair_id)
        for ev in self.events:
            ev.pending -= ids
        for ev in [e for e in self.events if not e.pending]:
            self._finished(ev)
        self.events = [e for e in self.events if e.pending]

    def resume_offsets(self) -> dict[int, int]:
        """Per partition, the first offset not done (the watermark): what Kafka may forget is before it."""
        out = {}
        for part in set(self.last_offset) | set(self.floor):
            pending = [e.offset for e in self.events if e.partition == part and e.offset >= 0]
            pending += [o for (p, o) in self.owed if p == part]
            if pending:
                out[part] = min(pending)
            else:
                out[part] = max(self.last_offset.get(part, -1) + 1, self.floor.get(part, 0))
        return out

    def commit(self) -> None:
        """Commit `resume_offsets()`, right after a checkpoint holding this source's state is written.

        A commit fails while the broker is down (retried with backoff) or is refused while the group
        rebalances. The checkpoint already holds what the events above the last commit owe, so a
        commit that still fails is deferred to the next checkpoint: events redelivered after a restart
        are filtered, never trained twice."""
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
        watermarks = self.resume_offsets()
        for part, done in self.done_offsets.items():  # what is below the watermark is implied by it
            done.difference_update({o for o in done if o < watermarks.get(part, 0)})
        in_flight = [
            {"partition": e.partition, "offset": e.offset, "key": e.key, "pending": sorted(e.pending)}
            for e in self.events
            if e.offset >= 0  # an event of a topic since recreated cannot be read again
        ] + [
            {"partition": p, "offset": o, "key": self.owed_keys.get((p, o), ""), "pending": sorted(ids)}
            for (p, o), ids in self.owed.items()
        ]
        return {
            "mode": "continuous",
            "format": 2,
            "offsets": {str(p): o for p, o in watermarks.items()},
            "done_offsets": {str(p): sorted(d) for p, d in self.done_offsets.items() if d},
            "in_flight": in_flight,
            "recent_pair_ids": list(self.recent),
            "trained_shards": self.done_shards.state(),
            "topic": self.topic,
            "topic_id": self.topic_id,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.floor = {int(p): int(o) for p, o in state.get("offsets", {}).items()}
        self.topic_id = state.get("topic_id")
        self.done_offsets = {int(p): set(map(int, d)) for p, d in state.get("done_offsets", {}).items()}
        for ev in state.get("in_flight", []):
            self.owed[(int(ev["partition"]), int(ev["offset"]))] = set(ev["pending"])
            self.owed_keys[(int(ev["partition"]), int(ev["offset"]))] = ev.get("key", "")
        # Checkpoints before format 2 held every pair id trained: the most recent ones fill the window.
        for pid in state.get("recent_pair_ids", state.get("trained_pair_ids", [])):
            self.recent.add(pid)
        self.done_shards.load(state.get("trained_shards", {}))
        for key in state.get("done_shards", []):  # checkpoints before trained_shards: the last 1,024 keys
            self.done_shards.add(key)

    def _kafka_reachable(self) -> bool:
        """After an empty poll: does the broker answer? kafka-python retries a lost broker inside poll(),
        which then returns nothing, just as for a quiet topic; asking for the end offsets (every
        KAFKA_PROBE_EVERY_S) tells them apart. An outage is reported to `infra` (the readiness probe and
        the metrics see it, as they see S3's) and is not counted as idle time."""
        now = time.monotonic()
        if self._kafka_probed_at is not None and now - self._kafka_probed_at < KAFKA_PROBE_EVERY_S:
            return not self._kafka_down
        self._kafka_probed_at = now
        partitions = list(self.consumer.assignment()) or [TopicPartition(self.topic, 0)]
        try:
            self.consumer.end_offsets(partitions, timeout_ms=KAFKA_PROBE_TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the broker's, not the data's
            self._kafka_down = True
            self.infra.failed(f"Kafka ({self.topic} end offsets)", exc, KAFKA_PROBE_EVERY_S)
            return False
        if self._kafka_down:
            self._kafka_down = False
            self.infra.recovered()
        return True

    def _replace_consumer(self) -> None:
        assert self.new_consumer is not None
        try:
            self.consumer.close()
        except Exception as exc:  # noqa: BLE001 - nothing is lost: uncommitted events come back to the new
            # member, which recognises them as in flight or done (see the class docstring)
            log.warning("closing the Kafka consumer being replaced failed: %s", exc)
        self.consumer = self.new_consumer()

    def close(self) -> None:
        self.consumer.close()
        self.deadletter.flush()


def _log_commit_retry(state: tenacity.RetryCallState) -> None:
    # The trainer's own line for a commit retry, in place of the policy's generic one: a commit is
    # retried a few times only, then deferred (see StreamSource.commit).
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("offset commit failed (%s); retrying in %.1f s", exc, delay)
