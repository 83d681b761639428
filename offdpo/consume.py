"""The one consume -> process -> commit loop every Kafka consumer of the pipeline runs on.

A service gives the loop a `handle(batch)` function; the loop owns everything between the broker and
it, once, for everyone:

    poll (bounded, through the broker profile's poller) -> handle(batch) -> per-record outcomes
    -> dead letters produced and acknowledged -> commit the contiguous finished offsets

`handle` says, for each record in order, what became of it:
- `DONE`: its output is durable (written and acknowledged), or it needs none;
- `DeadLetter(error)`: the record itself is bad (`error` is a non-retryable `OffdpoError`, whose
  `error_type` the letter carries); the loop sends the letter and waits for the broker's
  acknowledgement before any offset past it is committed;
- `Retry(error)`: a dependency is down (`error` is retryable); not the record's fault, never
  dead-lettered: the loop commits up to the first such record of its partition, rewinds there and
  backs off (offdpo.retry: exponential, with jitter), then redoes it.
`handle` may also raise: an error `retry_if` accepts (by default `is_infrastructure`: a retryable
`OffdpoError`, a Kafka client error, a connection error) rewinds the whole batch to its first unfinished
record and backs off; any other error is a bug and ends the loop.

The guarantees, and where they are kept:
- at-least-once: an offset is committed only after every record below it (in its partition) is DONE or
  dead-lettered and acknowledged. Offsets are compared as the records come, not as integers: on Apache
  Kafka a partition's offsets skip transaction markers and compacted records.
- no work twice inside one member: records finished behind an unfinished one (a gap) are remembered and
  skipped when the gap is redone, then committed with it.
- rebalance: partitions revoked during a step lose their in-flight work (records read but not handled,
  results not committed, the records finished behind a gap): whoever owns them next redoes them from
  the committed offset. The listener may run on kafka-python's IO thread at any time; what it revokes
  is dropped at the next of the loop's checks (after each poll, before the commit). What is finished
  is committed before the next poll, so a rebalance finds nothing finished and uncommitted except the
  records behind a gap, which cannot be committed.
- a commit refused by a group change is retried at once from the committed offsets (CommitRefusals),
  and a consumer stuck refusing, or one the broker profile's member watch condemns, is replaced.
- stop: the batch in hand is finished and committed, no new poll starts, a backoff ends at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from offdpo import broker_profile, retry
from offdpo.config import KafkaConfig
from offdpo.errors import OffdpoError
from offdpo.kafka import GROUP_CHANGED, CommitRefusals, DeadLetterSink, make_consumer, rewind, topic_id

log = logging.getLogger(__name__)


# -- what handle() says of each record ---------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    """The record's output is durable (written and acknowledged), or it needs none."""


DONE = Done()


@dataclass(frozen=True)
class DeadLetter:
    """The record itself is bad: dead-lettered with `error`'s message and error_type."""

    error: OffdpoError

    def __post_init__(self):
        if self.error.retryable:
            raise TypeError(f"{type(self.error).__name__} is retryable (a dependency down, not bad data): use Retry")


@dataclass(frozen=True)
class Retry:
    """A dependency is down for this record: redone after a backoff, never dead-lettered."""

    error: OffdpoError

    def __post_init__(self):
        if not self.error.retryable:
            raise TypeError(f"{type(self.error).__name__} is not retryable (bad data): use DeadLetter")


Outcome = Done | DeadLetter | Retry


def is_infrastructure(exc: BaseException) -> bool:
    """The default `retry_if`: trouble with what the service depends on, never with the input."""
    if isinstance(exc, OffdpoError):
        return exc.retryable
    return isinstance(exc, (KafkaError, ConnectionError, TimeoutError))


def _tp(rec) -> TopicPartition:
    return TopicPartition(rec.topic, rec.partition)


class Batch:
    """What handle() gets: the records to process (offset order within each partition)."""

    def __init__(self, records: list, consumer: Any):
        self.records = records
        self._consumer = consumer
        self.covered: dict[TopicPartition, int] = {}

    def topic_id(self, topic: str) -> str | None:
        """The id of the topic incarnation these records come from (None when the broker gives none)."""
        return topic_id(self._consumer, topic)

    def cover(self, tp: TopicPartition, next_offset: int) -> None:
        """Everything of `tp` below `next_offset` is already durable (an earlier attempt's output covers
        it): the loop may commit up to there, and reads on from there."""
        self.covered[tp] = max(self.covered.get(tp, next_offset), next_offset)


Handle = Callable[[Batch], Sequence[Outcome]]


# -- settings, hooks, counts -------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopSettings:
    what: str  # what the loop does, for log lines ("archiving the pairs topic")
    max_records: int = 500  # most records in one batch
    fill_s: float = 0.0  # after the first record, how long to keep polling to fill the batch
    poll_s: float = 0.5  # longest single poll
    idle_exit_s: float | None = None  # return after this long without records (None: run until stopped)
    initial_s: float = 0.5  # backoff after trouble: first wait, doubling (with jitter) up to max_delay_s
    max_delay_s: float = 30.0
    retry_if: Callable[[BaseException], bool] = is_infrastructure
    # Start again from the committed offsets with a new group member after any trouble, instead of
    # rewinding this one (for a caller that cannot tell whether the trouble was its client's).
    new_consumer_on_error: bool = False


def _nothing(*args) -> None:
    return None


@dataclass
class Hooks:
    """Metrics and health: called from the loop's thread."""

    heartbeat: Callable[[], None] = _nothing  # every time round the loop (liveness)
    # (True, error) on each failed try; (False, None) after each step that went through (readiness)
    outage: Callable[[bool, BaseException | None], None] = _nothing
    batch: Callable[[BatchResult], None] = _nothing  # after each batch committed


@dataclass(frozen=True)
class BatchResult:
    records: int  # read in this batch (including ones finished in an earlier try)
    done: int
    dead_lettered: int
    retry: int
    committed: dict[TopicPartition, int]


@dataclass
class LoopStats:
    batches: int = 0
    done: int = 0
    dead_lettered: int = 0
    troubles: int = 0  # failed tries (each one backed off)
    consumers: int = 0  # consumers made (more than 1: replaced)


class NewConsumer(Protocol):
    """Makes a consumer subscribed to the loop's topics with `listener` (offdpo.kafka.make_consumer)."""

    def __call__(self, listener: ConsumerRebalanceListener) -> Any: ...


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: ConsumeLoop):
        self.loop = loop

    def on_partitions_revoked(self, revoked):
        self.loop.revoked(revoked)

    def on_partitions_assigned(self, assigned):
        log.debug("%s: assigned %s", self.loop.settings.what, sorted(assigned))


# -- the loop ----------------------------------------------------------------------------------------
class ConsumeLoop:
    def __init__(
        self,
        kafka: KafkaConfig,
        new_consumer: NewConsumer,
        handle: Handle,
        settings: LoopSettings,
        deadletters: DeadLetterSink | None = None,
        hooks: Hooks | None = None,
        member_watch: broker_profile.MemberWatch | None = None,
    ):
        self.kafka, self._new_consumer, self.handle, self.settings = kafka, new_consumer, handle, settings
        self.deadletters = deadletters
        self.hooks = hooks or Hooks()
        self.poller = broker_profile.poller(kafka)
        self.member_watch = member_watch  # only for the only member of a group (a trainer run's)
        self.consumer: Any = None
        self.stats = LoopStats()
        self._refusals = CommitRefusals()
        self._listener = _Rebalance(self)
        # The rebalance listener may run on the client's IO thread: these two are shared with it.
        self._lock = threading.Lock()
        self._done: dict[TopicPartition, set[int]] = defaultdict(set)  # finished behind a gap, not committed
        self._lost: set[TopicPartition] = set()  # revoked since the current step began
        self._redo = False  # a rewind left records to redo: an empty poll is not an idle topic

    # -- rebalance ----------------------------------------------------------------------------------
    def revoked(self, tps: Collection[TopicPartition]) -> None:
        """The group took `tps` from this member: their in-flight work is dropped (see the docstring)."""
        with self._lock:
            self._lost |= set(tps)
            for tp in tps:
                self._done.pop(tp, None)
        if tps:
            log.info("%s: partitions revoked: %s", self.settings.what, sorted(tps))

    # -- running ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> LoopStats:
        """Consume until `stop` is set or, with idle_exit_s, until nothing arrived for that long while
        this member held partitions and had nothing to redo."""
        s = self.settings
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    got = retry.call(
                        s.what,
                        lambda: self._step(stop),
                        retry_if=self._trouble,
                        initial_s=s.initial_s,
                        max_delay_s=s.max_delay_s,
                        stop=stop,
                        logger=log,
                    )
                except Exception as exc:
                    if stop.is_set() and s.retry_if(exc):
                        log.warning("%s: stopping during trouble; what is not committed is redone: %s", s.what, exc)
                        break
                    raise
                self.hooks.outage(False, None)
                if got or self._redo or not self._assigned():
                    # The idle clock runs only while partitions are ours: a rerun joins a group whose
                    # killed member still holds them until its session times out.
                    last_record = time.monotonic()
                elif s.idle_exit_s is not None and time.monotonic() - last_record > s.idle_exit_s:
                    log.info("%s: idle for %.1f s, done", s.what, s.idle_exit_s)
                    break
        finally:
            self.close()
        return self.stats

    def _trouble(self, exc: BaseException) -> bool:
        if not self.settings.retry_if(exc):
            return False
        self.stats.troubles += 1
        self.hooks.outage(True, exc)
        return True

    def _assigned(self) -> bool:
        return self.consumer is not None and bool(self.consumer.assignment())

    def close(self) -> None:
        consumer, self.consumer = self.consumer, None
        with self._lock:
            self._done.clear()
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - a consumer of an unreachable broker may fail to close
                log.debug("closing the Kafka consumer failed", exc_info=True)

    # -- one step: poll, handle, dead letters, commit -----------------------------------------------
    def _step(self, stop: threading.Event) -> int:
        self.hooks.heartbeat()
        if self.consumer is None:
            self.consumer = self._new_consumer(self._listener)
            self.stats.consumers += 1
        consumer = self.consumer
        if self.member_watch is not None and self.member_watch.needs_new_consumer(consumer):
            self.close()
            return 0
        with self._lock:
            self._lost = set()
        recs = self._collect(consumer, stop)
        if not recs:
            return 0
        with self._lock:
            lost_before = set(self._lost)
            todo = [r for r in recs if r.offset not in self._done.get(_tp(r), ())]
        batch = Batch(todo, consumer)
        try:
            outcomes = self._handle(batch)
        except Exception:
            self._after_trouble(consumer, recs)
            raise
        with self._lock:
            lost = self._lost - lost_before  # revoked while handling: nothing of theirs is committed
        commit_at, unfinished = self._commit_points(recs, batch.covered, lost)
        if commit_at:
            try:
                consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in commit_at.items()})
            except GROUP_CHANGED as exc:
                # Redone at once from the committed offsets (what was finished is skipped then).
                self._redo = True
                if self._refusals.refused(consumer, recs, exc):
                    self.close()
                return len(recs)
            except Exception:
                self._after_trouble(consumer, recs)
                raise
            self._refusals.committed()
            for tp, offset in commit_at.items():
                if offset > max(r.offset for r in recs if _tp(r) == tp) + 1:
                    consumer.seek(tp, offset)  # an earlier attempt's output covers records not read yet
        with self._lock:
            for tp, offset in commit_at.items():
                self._done[tp] = {o for o in self._done[tp] if o >= offset}
        self._count(len(recs), outcomes, commit_at)
        self._redo = bool(unfinished)
        if unfinished:
            rewind(consumer, unfinished)
            raise next(o.error for o in outcomes if isinstance(o, Retry))
        return len(recs)

    def _collect(self, consumer: Any, stop: threading.Event) -> list:
        """Poll until max_records, or fill_s after the first record; one empty poll ends it."""
        s = self.settings
        batch: list = []
        deadline: float | None = None
        while not stop.is_set() and len(batch) < s.max_records:
            wait_s = s.poll_s if deadline is None else deadline - time.monotonic()
            if wait_s <= 0:
                break
            with self._lock:
                lost_before = set(self._lost)
            polled = self.poller.poll(
                consumer, timeout_ms=int(min(wait_s, s.poll_s) * 1000), max_records=s.max_records - len(batch)
            )
            with self._lock:
                lost = self._lost - lost_before
            if lost:  # read before the rebalance: whoever owns them now reads them again
                batch = [r for r in batch if _tp(r) not in lost]
            for recs in polled.values():
                batch.extend(recs)
            if batch and deadline is None:
                deadline = time.monotonic() + s.fill_s
            if not batch and deadline is None:
                break
        return sorted(batch, key=lambda r: (r.topic, r.partition, r.offset))

    def _handle(self, batch: Batch) -> list[Outcome]:
        """handle(batch), then its dead letters sent and acknowledged; records finished are remembered."""
        outcomes = list(self.handle(batch)) if batch.records else []
        if len(outcomes) != len(batch.records):
            raise TypeError(f"handle returned {len(outcomes)} outcomes for {len(batch.records)} records")
        self._finished([r for r, o in zip(batch.records, outcomes) if isinstance(o, Done)])
        letters = [(r, o) for r, o in zip(batch.records, outcomes) if isinstance(o, DeadLetter)]
        if letters:
            if self.deadletters is None:
                raise TypeError(f"{self.settings.what}: handle dead-lettered records but the loop has no sink")
            for rec, letter in letters:
                # Returns once the broker acknowledged the letter (acks=all), else raises Unavailable:
                # no offset past a record is committed before its letter is durable.
                self.deadletters.send_record(rec, str(letter.error), letter.error.error_type)
            self._finished([rec for rec, _ in letters])
        return outcomes

    def _finished(self, recs: list) -> None:
        with self._lock:
            for rec in recs:
                if _tp(rec) not in self._lost:
                    self._done[_tp(rec)].add(rec.offset)

    def _commit_points(
        self, recs: list, covered: dict[TopicPartition, int], lost: set[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], list]:
        """Per partition, the offset to commit (after the last finished record before the first
        unfinished one) and the first unfinished records (to rewind to)."""
        by_tp: dict[TopicPartition, list] = defaultdict(list)
        for rec in recs:
            by_tp[_tp(rec)].append(rec)
        commit_at: dict[TopicPartition, int] = {}
        unfinished = []
        with self._lock:
            for tp, part in by_tp.items():
                if tp in lost:
                    continue
                done, skip_below = self._done[tp], covered.get(tp, -1)
                first = next((r for r in part if r.offset >= skip_below and r.offset not in done), None)
                if first is None:
                    commit_at[tp] = max(part[-1].offset + 1, skip_below)
                    continue
                unfinished.append(first)
                if first is not part[0]:
                    commit_at[tp] = first.offset
        return commit_at, unfinished

    def _after_trouble(self, consumer: Any, recs: list) -> None:
        """The batch failed: redo it from its first unfinished record of each partition."""
        self._redo = True
        if self.settings.new_consumer_on_error:
            self.close()
            return
        with self._lock:
            firsts = [r for r in recs if r.offset not in self._done.get(_tp(r), ()) and _tp(r) not in self._lost]
        rewind(consumer, firsts)

    def _count(self, n: int, outcomes: list[Outcome], commit_at: dict[TopicPartition, int]) -> None:
        result = BatchResult(
            records=n,
            done=sum(isinstance(o, Done) for o in outcomes),
            dead_lettered=sum(isinstance(o, DeadLetter) for o in outcomes),
            retry=sum(isinstance(o, Retry) for o in outcomes),
            committed=commit_at,
        )
        self.stats.batches += 1
        self.stats.done += result.done
        self.stats.dead_lettered += result.dead_lettered
        self.hooks.batch(result)


def subscribed(kafka: KafkaConfig, group_id: str, topics: list[str], **overrides) -> NewConsumer:
    """A NewConsumer from offdpo.kafka.make_consumer."""

    def new(listener: ConsumerRebalanceListener) -> Any:
        return make_consumer(kafka, group_id, topics, listener=listener, **overrides)

    return new


__all__ = [
    "DONE",
    "Batch",
    "BatchResult",
    "ConsumeLoop",
    "DeadLetter",
    "Done",
    "Hooks",
    "LoopSettings",
    "LoopStats",
    "Outcome",
    "Retry",
    "is_infrastructure",
    "subscribed",
]
