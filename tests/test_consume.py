"""offdpo.consume: the one consume -> process -> commit loop, on in-memory Kafka clients.

Each test pins one line of the loop's contract; the report of the change that added them says which
mutation of the loop each one catches."""

from __future__ import annotations

import threading

import pytest
from kafka import TopicPartition
from kafka.errors import RebalanceInProgressError

from offdpo import errors
from offdpo.config import KafkaConfig
from offdpo.consume import DONE, Batch, ConsumeLoop, DeadLetter, Hooks, LoopSettings, Outcome, Retry
from offdpo.kafka import GROUP_REFUSALS_BEFORE_NEW_CONSUMER, DeadLetterSink
from offdpo.v1 import records_pb2
from tests.fakes import FakeBroker, FakeConsumer, FakeFuture, FakeProducer

KAFKA = KafkaConfig()  # the `kafka` broker profile: plain polls
TOPIC = "in"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


class GroupConsumer(FakeConsumer):
    """A FakeConsumer with a rebalance listener: `revoke` takes partitions away as a rebalance does.
    Commits go to the shared event log."""

    def __init__(self, broker, events, listener, on_poll=None, max_poll_records=500):
        super().__init__(broker, TOPIC, group="g", max_poll_records=max_poll_records)
        self.events, self.listener, self.on_poll = events, listener, on_poll
        self.polls = 0
        self.empty_after_seek, self._empty = 0, 0  # polls answered empty after a rewind (a rebalance running)

    def seek(self, tp, offset):
        super().seek(tp, offset)
        self._empty = self.empty_after_seek

    def revoke(self, *tps):
        for tp in tps:
            self._positions.pop(tp, None)
        self.listener.on_partitions_revoked(set(tps))

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
        self.polls += 1
        if self.on_poll:
            self.on_poll(self)
        if self._empty:
            self._empty -= 1
            return {}
        return super().poll(timeout_ms, max_records, update_offsets)

    def commit(self, offsets=None):
        super().commit(offsets)
        self.events.append(("commit", {tp.partition: o for tp, o in self.commits[-1].items()}))


class AckProducer(FakeProducer):
    """A dead letter lands, and is logged, only when its future is waited on (the broker's ack)."""

    def __init__(self, broker, events, fail_first: int = 0):
        super().__init__(broker)
        self.events, self.fail_first = events, fail_first

    def send(self, topic, value=None, key=None, partition=None, **_):
        if self.fail_first:
            self.fail_first -= 1
            return FakeFuture(exc=TimeoutError("no ack"))
        producer = self

        class Pending:
            def get(self, timeout=None):
                producer.events.append(("letter", key.decode()))
                return producer.broker.append(topic, value, key, partition)

        return Pending()


def fill(broker, *values, partition=0):
    for v in values:
        broker.append(TOPIC, v, partition=partition)


def run(broker, handle, events=None, *, on_poll=None, max_poll_records=500, producer=None, hooks=None, **settings):
    """Run a loop until the topic is idle; returns (loop, consumers made)."""
    events = [] if events is None else events
    made: list[GroupConsumer] = []

    def new_consumer(listener):
        made.append(GroupConsumer(broker, events, listener, on_poll, max_poll_records))
        return made[-1]

    sink = DeadLetterSink(producer or AckProducer(broker, events), KAFKA, "test", ack_timeout_s=1.0)
    opts = dict(idle_exit_s=0.0, initial_s=0.001, max_delay_s=0.002, poll_s=0.01) | settings
    loop = ConsumeLoop(KAFKA, new_consumer, handle, LoopSettings("test loop", **opts), sink, hooks)
    loop.run(threading.Event())
    return loop, made


def committed(broker) -> dict[int, int]:
    return {tp.partition: o for (g, tp), o in broker.committed.items() if g == "g"}


def letters(broker) -> list[records_pb2.DeadLetter]:
    return [records_pb2.DeadLetter.FromString(v) for v in broker.values(KAFKA.deadletter_topic)]


class ByValue:
    """A handle: b"bad..." records are dead-lettered, records in `down_once` need a retry the first
    time; every call's (partition, offset) list is kept in `calls`."""

    def __init__(self, bad=(), down_once=()):
        self.bad, self.down_once = set(bad), set(down_once)
        self.retried: set[bytes] = set()
        self.calls: list[list[tuple[int, int]]] = []

    def __call__(self, batch: Batch) -> list[Outcome]:
        self.calls.append([(r.partition, r.offset) for r in batch.records])
        out: list[Outcome] = []
        for r in batch.records:
            if r.value in self.bad:
                out.append(DeadLetter(errors.RecordError(f"{r.value!r} is not a record")))
            elif r.value in self.down_once and r.value not in self.retried:
                self.retried.add(r.value)
                out.append(Retry(errors.Unavailable("the engine is down")))
            else:
                out.append(DONE)
        return out


def setup(partitions: int = 1) -> tuple[FakeBroker, list[tuple]]:
    return FakeBroker(partitions=partitions), []


# -- dead letters before the commit --------------------------------------------------------------
def test_dead_letters_are_acknowledged_before_any_offset_past_them_is_committed():
    broker, events = setup()
    fill(broker, b"ok0", b"bad", b"ok2")
    run(broker, ByValue(bad={b"bad"}), events)
    assert events == [("letter", f"{TOPIC}/0/1"), ("commit", {0: 3})]
    assert [(d.offset, d.error_type) for d in letters(broker)] == [(1, "invalid_record")]


def test_an_unacknowledged_dead_letter_is_retried_and_nothing_past_it_committed_meanwhile():
    broker, events = setup()
    fill(broker, b"ok0", b"bad", b"ok2")
    handle = ByValue(bad={b"bad"})
    loop, _ = run(broker, handle, events, producer=AckProducer(broker, events, fail_first=1))
    assert events == [("letter", f"{TOPIC}/0/1"), ("commit", {0: 3})], "no commit before the letter's ack"
    assert handle.calls == [[(0, 0), (0, 1), (0, 2)], [(0, 1)]], "the redo is the letter's record only"
    assert loop.stats.troubles == 1 and len(letters(broker)) == 1


# -- a crash between processing and commit -------------------------------------------------------
class Crash(BaseException):
    """The process dies (nothing after this point runs)."""


def test_a_crash_after_processing_before_the_commit_redelivers_everything():
    broker = FakeBroker()
    fill(broker, b"a", b"b", b"c")
    written: list[bytes] = []

    def dies(batch: Batch):
        written.extend(r.value for r in batch.records)  # the output is durable ...
        raise Crash  # ... and the process dies before the loop commits

    with pytest.raises(Crash):
        run(broker, dies)
    assert committed(broker) == {}, "nothing committed before the crash"

    def handle(batch: Batch):
        written.extend(r.value for r in batch.records)
        return [DONE] * len(batch.records)

    run(broker, handle)  # the restart: a new member of the group
    assert written == [b"a", b"b", b"c"] * 2, "every record handled again after the crash (none lost)"
    assert committed(broker) == {0: 3}


# -- infrastructure trouble --------------------------------------------------------------------------
def test_an_infrastructure_error_raised_by_handle_rewinds_and_retries_without_dead_lettering():
    broker = FakeBroker()
    fill(broker, b"a", b"b")
    calls: list[list[int]] = []
    outages: list[bool] = []

    def handle(batch: Batch):
        calls.append([r.offset for r in batch.records])
        if len(calls) == 1:
            raise errors.Unavailable("S3 is down")
        return [DONE] * len(batch.records)

    loop, made = run(broker, handle, hooks=Hooks(outage=lambda down, exc: outages.append(down)))
    assert calls == [[0, 1], [0, 1]], "the batch redone from its first record by the same member"
    assert letters(broker) == [] and committed(broker) == {0: 2}
    assert len(made) == 1 and loop.stats.troubles == 1 and outages[:2] == [True, False]


def test_a_retry_outcome_commits_up_to_it_rewinds_there_and_is_never_dead_lettered():
    broker, events = setup()
    fill(broker, b"a", b"needs the engine", b"c")
    handle = ByValue(down_once={b"needs the engine"})
    loop, _ = run(broker, handle, events)
    assert letters(broker) == []
    assert handle.calls == [[(0, 0), (0, 1), (0, 2)], [(0, 1)]]
    assert events == [("commit", {0: 1}), ("commit", {0: 3})]
    assert loop.stats.troubles == 1


def test_a_bug_in_handle_is_not_retried():
    broker = FakeBroker()
    fill(broker, b"a")

    def handle(batch: Batch):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run(broker, handle)
    assert committed(broker) == {}


# -- contiguous commits ------------------------------------------------------------------------------
def test_a_gap_holds_the_commit_and_its_redo_skips_what_was_finished_behind_it():
    broker, events = setup(2)
    fill(broker, b"0", b"1", b"down", b"3", b"4", partition=0)
    fill(broker, b"x", b"y", partition=1)
    handle = ByValue(down_once={b"down"})
    run(broker, handle, events)
    assert events == [("commit", {0: 2, 1: 2}), ("commit", {0: 5})]
    assert handle.calls[1] == [(0, 2)], "records 3 and 4 were finished: not handled twice"
    assert committed(broker) == {0: 5, 1: 2}


# -- rebalances -------------------------------------------------------------------------------------
def test_a_partition_revoked_while_its_batch_is_handled_is_not_committed():
    broker, events = setup(2)
    fill(broker, b"a", b"b", partition=0)
    fill(broker, b"c", b"d", partition=1)
    consumers: list = []

    def handle(batch: Batch):
        if len(consumers) == 1:
            consumers.pop().revoke(P0)  # the rebalance listener fires on the client's IO thread meanwhile
        return [DONE] * len(batch.records)

    run(broker, handle, events, on_poll=lambda consumer: consumers.append(consumer) if consumer.polls == 1 else None)
    assert committed(broker) == {1: 2}, "partition 0's results belong to its new owner to redo"


def test_records_read_before_a_revocation_are_dropped_from_the_batch():
    broker = FakeBroker(partitions=2)
    fill(broker, b"a", partition=0)
    fill(broker, b"b", partition=1)

    def on_poll(consumer):
        if consumer.polls == 2:  # the second poll of the batch's fill window joins a rebalance
            consumer.revoke(P0)

    handle = ByValue()
    run(broker, handle, on_poll=on_poll, max_poll_records=1, fill_s=0.5, max_records=10)
    assert handle.calls == [[(1, 0)]], "partition 0's record was read before it was revoked"
    assert committed(broker) == {1: 1}


def test_commits_a_rebalance_keeps_refusing_replace_the_consumer_and_nothing_is_handled_twice_meanwhile():
    broker = FakeBroker()
    fill(broker, b"a", b"b")

    stuck: list = []

    def on_poll(consumer):
        if not stuck:  # the first member only
            stuck.append(consumer)
            consumer.fail_commits(GROUP_REFUSALS_BEFORE_NEW_CONSUMER, RebalanceInProgressError("rebalancing"))
            consumer.empty_after_seek = 1  # an empty poll then is the rebalance, not an idle topic

    handle = ByValue()
    _, made = run(broker, handle, on_poll=on_poll)
    assert len(made) == 2, "replaced after GROUP_REFUSALS_BEFORE_NEW_CONSUMER refusals in a row"
    assert handle.calls == [[(0, 0), (0, 1)]] * 2, "redone by the old member without handling; then by the new one"
    assert committed(broker) == {0: 2}


# -- covered ranges, stop ----------------------------------------------------------------------------
def test_a_range_an_earlier_attempt_covered_is_committed_and_skipped():
    broker = FakeBroker()
    fill(broker, *[bytes([i]) for i in range(6)])
    calls: list[list[int]] = []

    def handle(batch: Batch):
        calls.append([r.offset for r in batch.records])
        if batch.records[0].offset == 0:
            batch.cover(P0, 4)  # an object holding offsets 0..3 exists already
            return [DONE] * len(batch.records)
        return [DONE] * len(batch.records)

    run(broker, handle, max_poll_records=2, max_records=2)
    assert calls == [[0, 1], [4, 5]] and committed(broker) == {0: 6}


def test_stop_finishes_and_commits_the_batch_in_hand_then_polls_no_more():
    broker = FakeBroker()
    fill(broker, b"a", b"b", b"c")
    stop = threading.Event()
    made: list[GroupConsumer] = []

    def handle(batch: Batch):
        stop.set()
        return [DONE] * len(batch.records)

    def new_consumer(listener):
        made.append(GroupConsumer(broker, [], listener, max_poll_records=2))
        return made[-1]

    ConsumeLoop(KAFKA, new_consumer, handle, LoopSettings("test loop", max_records=2)).run(stop)
    assert committed(broker) == {0: 2} and made[0].polls == 1 and made[0].closed


def test_outcomes_are_typed():
    with pytest.raises(TypeError):
        DeadLetter(errors.Unavailable("down"))
    with pytest.raises(TypeError):
        Retry(errors.RecordError("bad"))
