"""The trainer's data sources over in-memory fakes: no broker, no S3, no model.

Shards are built with offdpo.records from hand-made token ids and log-probs; ShardReady events go
through a FakeBroker to a FakeConsumer; dead letters land on a FakeProducer's topic."""

from __future__ import annotations

import threading
import types
import uuid

import pytest
from kafka.errors import KafkaTimeoutError, RebalanceInProgressError
from kafka.structs import TopicPartition

from offdpo import errors
from offdpo.broker_profile import AssignmentWatch
from offdpo.config import KafkaConfig
from offdpo.kafka import DeadLetterSink
from offdpo.records import (
    DeadLetter,
    ReferenceFingerprint,
    ScoredPair,
    ShardReady,
    make_pair,
    scored_pairs_to_parquet,
    shard_key,
    text_prompt,
    with_fingerprint_id,
)
from services.trainer import stream as stream_mod
from services.trainer.examples import Example
from services.trainer.replay import ReplaySource
from services.trainer.shards import DataError, examples_from_shard
from services.trainer.stream import StreamSource
from tests.fakes import FakeBroker, FakeConsumer, FakeObjectStore, FakeProducer

SHARDS, DEADLETTERS = "shards", "deadletters"
FP = with_fingerprint_id(ReferenceFingerprint(model_id="tiny", weights_hash="w1", tokenizer_hash="t", dtype="float32"))
OTHER_FP = with_fingerprint_id(
    ReferenceFingerprint(model_id="tiny", weights_hash="w2", tokenizer_hash="t", dtype="float32")
)


def row(name: str, fp: ReferenceFingerprint = FP, chosen_len: int = 2) -> ScoredPair:
    chosen, rejected = [100 + i for i in range(chosen_len)], [300, 301]
    lc, lr = [-1.0] * chosen_len, [-2.0, -2.0]
    out = ScoredPair(
        prompt_token_ids=[1, 500],
        chosen_token_ids=chosen,
        rejected_token_ids=rejected,
        chosen_logprobs=lc,
        rejected_logprobs=lr,
        chosen_logprob_sum=sum(lc),
        rejected_logprob_sum=sum(lr),
    )
    out.pair.CopyFrom(make_pair(text_prompt(f"prompt {name}"), f"chosen {name}", f"rejected {name}"))
    out.fingerprint.CopyFrom(fp)
    return out


def put_shard(store: FakeObjectStore, rows: list[ScoredPair], first: int, fp: ReferenceFingerprint = FP) -> str:
    key = shard_key(fp.fingerprint_id, "pairs", 0, first, first + len(rows) - 1)
    store.put_bytes(key, scored_pairs_to_parquet(rows, fp))
    return key


def ids(examples: list[Example] | None) -> list[str]:
    assert examples is not None
    return [e.pair_id for e in examples]


# -- shards --------------------------------------------------------------------------------------
def test_examples_carry_the_stored_tokens_and_logprobs():
    r = row("a")
    examples, refusals = examples_from_shard(scored_pairs_to_parquet([r], FP), "k", FP, set(), 64, "refuse")
    assert refusals == []
    (e,) = examples
    assert (e.pair_id, e.prompt, e.chosen, e.rejected) == (r.pair.pair_id, [1, 500], [100, 101], [300, 301])
    assert (e.ref_chosen, e.ref_rejected, e.shard) == ([-1.0, -1.0], [-2.0, -2.0], "k")


def test_shard_faults_raise_typed_errors_that_carry_their_deadletter_type():
    data = scored_pairs_to_parquet([row("a", OTHER_FP)], OTHER_FP)
    with pytest.raises(errors.FingerprintMismatch) as err:
        examples_from_shard(data, "k", FP, set(), 64, "refuse")
    assert err.value.error_type == "fingerprint_mismatch" and "weights_hash" in str(err.value)
    examples, _ = examples_from_shard(data, "k", FP, {OTHER_FP.fingerprint_id}, 64, "refuse")  # allowed deliberately
    assert len(examples) == 1
    with pytest.raises(errors.CorruptShard) as err2:
        examples_from_shard(data[:-50], "k", FP, set(), 64, "refuse")
    assert err2.value.error_type == "corrupt_shard"


def test_over_long_records_are_refused_or_their_answers_cut():
    long = row("long", chosen_len=6)  # prompt 2 + longest answer 6 = 8 tokens
    data = scored_pairs_to_parquet([long, row("short")], FP)
    examples, refusals = examples_from_shard(data, "k", FP, set(), 5, "refuse")
    assert ids(examples) == [row("short").pair.pair_id]
    assert len(refusals) == 1 and long.pair.pair_id in refusals[0] and "--max-length 5" in refusals[0]
    examples, refusals = examples_from_shard(data, "k", FP, set(), 5, "truncate_answers")
    assert refusals == [] and examples[0].chosen == [100, 101, 102] and examples[0].ref_chosen == [-1.0] * 3


# -- replay --------------------------------------------------------------------------------------
def test_replay_trains_each_unique_pair_once_per_epoch_and_resumes_at_its_position():
    store = FakeObjectStore()
    rows = [row(str(i)) for i in range(5)]
    put_shard(store, rows[:3], 0)
    put_shard(store, rows[2:], 3)  # rows[2] is in both shards: identity by pair_id
    source = ReplaySource(store, "scores/", 2, 7, FP, set(), 64, "refuse")
    assert source.total_steps(2, 0) == 6 and source.total_steps(2, 4) == 4
    taken = [source.next_batch(2) for _ in range(6)]
    assert [len(ids(b)) for b in taken] == [2, 2, 1, 2, 2, 1]  # an epoch's last batch may be short
    unique = sorted(r.pair.pair_id for r in rows)
    assert sorted(ids(taken[0]) + ids(taken[1]) + ids(taken[2])) == unique
    assert sorted(ids(taken[3]) + ids(taken[4]) + ids(taken[5])) == unique
    assert source.next_batch(2) is None

    again = ReplaySource(store, "scores/", 2, 7, FP, set(), 64, "refuse")
    resumed = ReplaySource(store, "scores/", 2, 7, FP, set(), 64, "refuse")
    for _ in range(4):
        again.next_batch(2)
    resumed.load_state(again.state())
    assert [ids(resumed.next_batch(2)) for _ in range(2)] == [ids(taken[4]), ids(taken[5])]


def test_replay_refuses_before_training():
    store = FakeObjectStore()
    with pytest.raises(DataError, match="no \\*.parquet shards"):
        ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "refuse")
    put_shard(store, [row("long", chosen_len=9)], 0)
    with pytest.raises(DataError, match="1 record\\(s\\) refused, nothing trained"):
        ReplaySource(store, "scores/", 1, 0, FP, set(), 5, "refuse")
    assert issubclass(DataError, errors.BadInput)
    other = FakeObjectStore()
    bad = put_shard(other, [row("a")], 0)
    other.objects[bad] = other.objects[bad][:-50]
    with pytest.raises(errors.CorruptShard, match=bad):
        ReplaySource(other, "scores/", 1, 0, FP, set(), 64, "refuse")
    source = ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "truncate_answers")
    put_shard(store, [row("b")], 1)
    with pytest.raises(DataError, match="shards under the prefix changed"):
        ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "truncate_answers").load_state(source.state())


# -- continuous ----------------------------------------------------------------------------------
class Stream:
    """A StreamSource over a FakeBroker, with its consumer, store and dead-letter topic at hand."""

    def __init__(self, group: str = "trainer"):
        self.broker, self.store = FakeBroker(), FakeObjectStore()
        self.broker.create_topic(SHARDS)
        self.group = group
        self.source = self.open()

    def open(self) -> StreamSource:
        self.consumer = FakeConsumer(self.broker, SHARDS, group=self.group)
        sink = DeadLetterSink(FakeProducer(self.broker), KafkaConfig(deadletter_topic=DEADLETTERS), "trainer")
        return StreamSource(self.store, self.consumer, sink, FP, set(), 64, "refuse", 0, 0.05, SHARDS)

    def announce(self, key: str, rows: list[ScoredPair], fp: ReferenceFingerprint = FP) -> None:
        event = ShardReady(bucket=self.store.bucket, object_key=key, row_count=len(rows))
        event.pair_ids.extend(r.pair.pair_id for r in rows)
        event.fingerprint.CopyFrom(fp)
        self.broker.append(SHARDS, event.SerializeToString(), key.encode(), partition=0)

    def deadletters(self) -> dict[str, DeadLetter]:
        letters = [DeadLetter.FromString(v or b"") for v in self.broker.values(DEADLETTERS)]
        return {letter.error_type: letter for letter in letters}

    def committed(self) -> int | None:
        return self.broker.committed.get((self.group, TopicPartition(SHARDS, 0)))


def test_stream_takes_each_pair_once_and_deadletters_what_it_cannot_train():
    s = Stream()
    rows = [row(str(i)) for i in range(6)]
    good1, good2 = put_shard(s.store, rows[:4], 0), put_shard(s.store, rows[2:], 4)  # 2 pairs in both
    mismatched = put_shard(s.store, [row("x", OTHER_FP)], 0, OTHER_FP)
    corrupt = shard_key(FP.fingerprint_id, "pairs", 1, 0, 1)
    s.store.put_bytes(corrupt, b"not a parquet file")
    s.announce(good1, rows[:4])  # offset 0
    s.announce(mismatched, [row("x", OTHER_FP)], OTHER_FP)  # 1
    s.announce(good1, rows[:4])  # 2: announced twice
    s.broker.append(SHARDS, b"\xff garbage", partition=0)  # 3
    s.announce(corrupt, rows[:1])  # 4
    s.announce("scores/none/missing.parquet", rows[:1])  # 5
    s.announce(good2, rows[2:])  # 6

    taken = [s.source.next_batch(4), s.source.next_batch(4)]
    assert s.source.next_batch(4) is None  # idle: nothing left
    assert sorted(ids(taken[0]) + ids(taken[1])) == sorted(r.pair.pair_id for r in rows)
    letters = s.deadletters()
    assert set(letters) == {"fingerprint_mismatch", "decode_error", "corrupt_shard", "shard_unreadable"}
    assert (
        mismatched in letters["fingerprint_mismatch"].reason
        and "weights_hash" in letters["fingerprint_mismatch"].reason
    )
    assert corrupt in letters["corrupt_shard"].reason
    assert letters["decode_error"].offset == 3 and letters["decode_error"].original_value == b"\xff garbage"
    assert "missing.parquet" in letters["shard_unreadable"].reason
    assert all(letter.service == "trainer" and letter.topic == SHARDS for letter in letters.values())


def test_stream_deadletters_over_long_records_and_trains_the_rest():
    s = Stream()
    rows = [row("ok"), row("long", chosen_len=70)]
    s.announce(put_shard(s.store, rows, 0), rows)
    assert ids(s.source.next_batch(4)) == [rows[0].pair.pair_id]
    letter = s.deadletters()["record_too_long"]
    assert rows[1].pair.pair_id in letter.reason and "the rest trained" in letter.reason


def test_stream_commit_covers_only_what_the_checkpoint_holds():
    s = Stream()
    rows = [row(str(i)) for i in range(6)]
    first, second = put_shard(s.store, rows[:4], 0), put_shard(s.store, rows[4:], 4)
    s.announce(first, rows[:4])  # offset 0
    s.announce(second, rows[4:])  # offset 1
    batch = s.source.next_batch(4)
    s.source.mark_trained(batch or [])
    s.source.commit()  # the first event's pairs are all trained; the second's are not
    assert s.committed() == 1
    assert first in s.source.done_shards and s.source.state()["offsets"] == {"0": 1}

    # A restart from that checkpoint gets the second event again and trains only its pairs.
    state = s.source.state()
    s.source.close()
    assert s.consumer.closed
    restarted = s.open()
    restarted.load_state(state)
    rest = restarted.next_batch(4)
    assert ids(rest) == [r.pair.pair_id for r in rows[4:]]
    restarted.mark_trained(rest or [])
    restarted.commit()
    assert s.committed() == 2


def test_stream_pairs_announced_again_after_a_restart_are_not_trained_twice():
    s = Stream()
    rows = [row(str(i)) for i in range(4)]
    key = put_shard(s.store, rows, 0)
    s.announce(key, rows[:2])
    s.source.mark_trained(s.source.next_batch(4) or [])  # trained, but the checkpoint was not committed
    state = s.source.state()
    restarted = s.open()  # the group never committed: the event comes back
    restarted.load_state(state)
    assert restarted.next_batch(4) is None


def test_a_commit_that_keeps_failing_is_deferred_and_a_group_change_is_not_retried(caplog):
    s = Stream()
    s.source.COMMIT_ATTEMPTS = 2
    s.announce(put_shard(s.store, [row("a")], 0), [row("a")])
    s.source.mark_trained(s.source.next_batch(1) or [])
    s.consumer.fail_commits(1, KafkaTimeoutError("broker unreachable"))
    s.source.commit()  # retried once, then committed
    assert s.committed() == 1 and any("retrying in" in r.getMessage() for r in caplog.records)

    s.consumer.fail_commits(1, RebalanceInProgressError("rebalancing"))
    s.consumer.commits.clear()
    s.source.commit()
    assert s.consumer.commits == [], "a group change is answered by the next poll, not by a retry"
    assert any("deferred to the next checkpoint" in r.getMessage() for r in caplog.records)

    s.consumer.fail_commits(2, KafkaTimeoutError("broker unreachable"))
    s.source.commit()  # two attempts, both fail: deferred, no exception
    assert s.consumer.commits == []


def test_stream_stops_waiting_when_asked():
    s = Stream()
    stop = threading.Event()
    s.source.stop_when_idle_s = 0  # would wait for ever
    s.source.stop = stop
    stop.set()
    assert s.source.next_batch(4) is None


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_assignment_watch_replaces_the_only_member_missing_partitions_once_per_period():
    broker = FakeBroker()
    broker.create_topic(SHARDS, partitions=3)
    consumer, clock = FakeConsumer(broker, SHARDS), _Clock()
    watch = AssignmentWatch([SHARDS], after_s=60, check_every_s=0, clock=clock)
    assert not watch.missing(consumer) and not watch.needs_new_consumer(consumer), "holds every partition"
    for held in ([], [TopicPartition(SHARDS, 0), TopicPartition(SHARDS, 2)]):  # none, or some (a stale rejoin)
        consumer.assign(held)
        clock.now += 1000
        assert watch.missing(consumer) == {TopicPartition(SHARDS, p) for p in range(3)} - set(held)
        start = clock.now
        assert not watch.needs_new_consumer(consumer)
        clock.now = start + 59
        assert not watch.needs_new_consumer(consumer), "still within the period: the join may be in progress"
        clock.now = start + 60
        assert watch.needs_new_consumer(consumer)
        clock.now = start + 61
        assert not watch.needs_new_consumer(consumer), "the new member gets a period of its own"
        consumer.assign([TopicPartition(SHARDS, p) for p in range(3)])
        assert not watch.needs_new_consumer(consumer)


def test_assignment_watch_waits_while_the_topic_has_no_partition_or_no_metadata():
    class NoMetadata(FakeConsumer):
        def partitions_for_topic(self, topic):
            raise KafkaTimeoutError("metadata")

    broker = FakeBroker()
    clock = _Clock()
    empty_topic = FakeConsumer(broker)  # subscribed to nothing: the topic has no partitions in its metadata
    watch = AssignmentWatch(["nothing.here"], after_s=10, check_every_s=0, clock=clock)
    assert not watch.needs_new_consumer(empty_topic)
    clock.now = 100
    assert not watch.needs_new_consumer(empty_topic), "no partition to hold: a new member would hold none either"
    broker.create_topic(SHARDS)
    down = NoMetadata(broker)
    watch = AssignmentWatch([SHARDS], after_s=10, check_every_s=0, clock=clock)
    watch.needs_new_consumer(down)
    clock.now = 200
    assert not watch.needs_new_consumer(down), "the broker cannot describe the topic: keep waiting"


def test_stream_replaces_a_consumer_that_holds_no_partition_and_trains_through_the_new_one():
    """CI failure of test_s3_unavailable_for_a_while: the trainer joined while Tansu could not describe
    the shards topic, was assigned nothing, and Tansu kept answering its rejoins with that empty
    assignment; the run trained nothing until it was stopped."""
    s = Stream()
    rows = [row(str(i)) for i in range(4)]
    s.announce(put_shard(s.store, rows, 0), rows)
    stuck = s.consumer
    stuck.assign([])
    built: list[FakeConsumer] = []

    def new_consumer() -> FakeConsumer:
        built.append(FakeConsumer(s.broker, SHARDS, group=s.group))
        return built[-1]

    s.source.new_consumer = new_consumer
    s.source.assignment_watch = AssignmentWatch([SHARDS], after_s=0.0, check_every_s=0)
    batch = s.source.next_batch(4)
    assert batch is not None and sorted(ids(batch)) == sorted(r.pair.pair_id for r in rows)
    assert stuck.closed and len(built) == 1 and s.source.consumer is built[0]


def test_stream_skips_events_of_a_listed_other_reference_and_deadletters_an_unlisted_one(caplog):
    """OFFDPO_TRAINER_OTHER_REFERENCES: refscore serving several references announces every one's
    shards on the same topic; a trainer follows one. Events of a listed other reference are done
    (skipped, committed past, one INFO line per shard), not dead-lettered; any other fingerprint that
    does not match is still a misconfiguration and dead-lettered."""
    third_fp = with_fingerprint_id(
        ReferenceFingerprint(model_id="tiny", weights_hash="w3", tokenizer_hash="t", dtype="float32")
    )
    s = Stream()
    s.source.other_references = frozenset({OTHER_FP.fingerprint_id})
    rows = [row(str(i)) for i in range(4)]
    good = put_shard(s.store, rows, 0)
    listed = put_shard(s.store, [row("o", OTHER_FP)], 0, OTHER_FP)
    unlisted = put_shard(s.store, [row("u", third_fp)], 0, third_fp)
    s.announce(listed, [row("o", OTHER_FP)], OTHER_FP)  # offset 0
    s.announce(good, rows)  # 1
    s.announce(listed, [row("o", OTHER_FP)], OTHER_FP)  # 2: announced again
    s.announce(unlisted, [row("u", third_fp)], third_fp)  # 3

    with caplog.at_level("INFO", logger="services.trainer.stream"):
        batch = s.source.next_batch(4)
        assert s.source.next_batch(4) is None  # idle: nothing left
    assert sorted(ids(batch)) == sorted(r.pair.pair_id for r in rows)
    letters = [DeadLetter.FromString(v or b"") for v in s.broker.values(DEADLETTERS)]
    assert [(dl.error_type, dl.offset) for dl in letters] == [("fingerprint_mismatch", 3)]
    assert unlisted in letters[0].reason
    skipped = [r.getMessage() for r in caplog.records if "OFFDPO_TRAINER_OTHER_REFERENCES" in r.getMessage()]
    assert len(skipped) == 1 and listed in skipped[0] and OTHER_FP.fingerprint_id in skipped[0], skipped
    assert s.source.skipped_other == 1
    s.source.mark_trained(batch or [])
    s.source.commit()
    assert s.committed() == 4, "committed past the skipped events and the dead-lettered one"


def test_a_broker_outage_is_reported_and_never_taken_for_an_idle_topic(monkeypatch):
    """kafka-python retries a lost broker inside poll(), which returns nothing, as for a quiet topic:
    the trainer asks for the end offsets to tell them apart, reports the outage to the readiness
    probe's InfraStatus and does not idle-stop on it; once the broker answers, idle time counts again."""
    monkeypatch.setattr(stream_mod, "KAFKA_PROBE_EVERY_S", 0.0)
    s = Stream()
    down = {"now": True}
    asked: list[int | None] = []

    def end_offsets(tps, timeout_ms=None):
        asked.append(timeout_ms)
        if down["now"]:
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 3000 ms")
        return dict.fromkeys(tps, 0)

    s.consumer.end_offsets = end_offsets
    result: list = []
    thread = threading.Thread(target=lambda: result.append(s.source.next_batch(4)), daemon=True)
    thread.start()
    thread.join(timeout=1.0)  # 20x the 0.05 s idle stop: it would have stopped long ago
    assert thread.is_alive(), "a broker outage was taken for an idle topic and the run stopped"
    assert s.source.infra.waiting_since is not None and "end offsets" in s.source.infra.what
    assert asked and asked[-1] == stream_mod.KAFKA_PROBE_TIMEOUT_MS, "the probe must be bounded"
    down["now"] = False
    thread.join(timeout=10)
    assert not thread.is_alive() and result == [None], "the broker answers: the quiet topic idles out"
    assert s.source.infra.waiting_since is None and s.source.infra.errors_total >= 1


def test_stream_holding_only_some_partitions_does_not_idle_out_and_replaces_its_consumer():
    """CI failure of test_broker_killed_and_restarted_mid_stream: after the broker restart the trainer's
    rejoin got a stale assignment without one partition; its pairs never trained and the idle clock
    (nothing new on the partitions it held) ended the run."""
    s = Stream()
    s.broker.topics[SHARDS].append([])  # a second partition of the shard-ready topic
    rows = [row(str(i)) for i in range(4)]
    key = put_shard(s.store, rows, 0)
    event = ShardReady(bucket=s.store.bucket, object_key=key, row_count=len(rows))
    event.pair_ids.extend(r.pair.pair_id for r in rows)
    event.fingerprint.CopyFrom(FP)
    s.broker.append(SHARDS, event.SerializeToString(), key.encode(), partition=1)
    stop = threading.Event()

    class Counting(FakeConsumer):
        polls = 0

        def poll(self, *args, **kwargs):
            Counting.polls += 1
            if Counting.polls == 20:
                stop.set()
            return super().poll(*args, **kwargs)

    partial = Counting(s.broker, SHARDS, group=s.group)
    partial.assign([TopicPartition(SHARDS, 0)])
    s.source.consumer, s.source.stop = partial, stop
    s.source.assignment_watch = AssignmentWatch([SHARDS], after_s=3600, check_every_s=0)
    assert s.source.next_batch(4) is None and Counting.polls == 20, "stopped, not idled out (idle is 0.05 s)"

    stop.clear()
    s.source.new_consumer = lambda: FakeConsumer(s.broker, SHARDS, group=s.group)
    s.source.assignment_watch = AssignmentWatch([SHARDS], after_s=0.0, check_every_s=0)
    batch = s.source.next_batch(4)
    assert batch is not None and sorted(ids(batch)) == sorted(r.pair.pair_id for r in rows)


class _Cluster:
    """kafka-python's cluster metadata, as far as `offdpo.kafka.topic_id` reads it."""

    def __init__(self, ids: dict[str, uuid.UUID]):
        self.ids = ids

    def topic_id(self, topic: str) -> uuid.UUID | None:
        return self.ids.get(topic)


def test_a_recreated_shards_topic_is_read_from_its_beginning():
    # Audit path 3 (issue 27): the checkpoint's watermark (offset 12 of the old topic) skipped every
    # event of the topic created again under the same name: a resumed run trained 0 of its pairs.
    s = Stream()
    s.consumer._client = types.SimpleNamespace(cluster=_Cluster({SHARDS: uuid.uuid4()}))
    old = [row(f"old{i}") for i in range(12)]
    for i in range(12):
        s.announce(put_shard(s.store, old[i : i + 1], i), old[i : i + 1])
    batch = s.source.next_batch(12)
    s.source.mark_trained(batch)
    state = s.source.state()
    assert len(batch) == 12 and state["offsets"] == {"0": 12} and state["topic_id"]

    s.broker = FakeBroker()  # the topic deleted and created again: offsets restart at 0
    s.broker.create_topic(SHARDS)
    new = [row(f"new{i}") for i in range(8)]
    for i in range(8):
        s.announce(put_shard(s.store, new[i : i + 1], 100 + i), new[i : i + 1])
    s.announce(put_shard(s.store, old[:1], 0), old[:1])  # an old shard announced again: trained once only
    resumed = s.open()
    s.consumer._client = types.SimpleNamespace(cluster=_Cluster({SHARDS: uuid.uuid4()}))
    resumed.load_state(state)
    taken: list = []
    while (batch := resumed.next_batch(4)) is not None:
        resumed.mark_trained(batch)
        taken += ids(batch)
    assert sorted(taken) == sorted(r.pair.pair_id for r in new)
    assert resumed.state()["offsets"] == {"0": 9}


def test_the_same_topic_keeps_the_checkpoint_watermark():
    s = Stream()
    tid = uuid.uuid4()
    s.consumer._client = types.SimpleNamespace(cluster=_Cluster({SHARDS: tid}))
    rows = [row(f"r{i}") for i in range(4)]
    for i in range(4):
        s.announce(put_shard(s.store, rows[i : i + 1], i), rows[i : i + 1])
    batch = s.source.next_batch(4)
    s.source.mark_trained(batch)
    state = s.source.state()
    assert len(batch) == 4 and state["offsets"] == {"0": 4}
    resumed = Stream.open(s)  # the same topic, read again from offset 0 (no commit happened)
    s.consumer._client = types.SimpleNamespace(cluster=_Cluster({SHARDS: tid}))
    resumed.load_state(state)
    assert resumed.next_batch(4) is None  # every event below the watermark: none trained twice


def test_trained_shards_are_exact_and_compact():
    from services.trainer.stream import TrainedShards

    def key(first, last, part=0, fp="fpA", tid="id-x"):
        return shard_key(fp, "pairs", part, first, last, topic_id=tid[3:])

    done = TrainedShards()
    for i in range(5000):  # a long run trains its stream in order: one range, however long
        done.add(key(10 * i, 10 * i + 9))
    assert done.state()["ranges"] == {key(0, 0).rsplit("/", 1)[0] + "/p0000": [[0, 49999]]}
    assert key(0, 9) in done and key(120, 129) in done and key(0, 49999) in done  # never forgotten
    assert key(49990, 50000) not in done and key(0, 9, part=1) not in done and key(0, 9, fp="fpB") not in done
    done.add(key(60000, 60009))  # a gap: a range of its own until it is filled
    assert key(50000, 50009) not in done
    done.add(key(50000, 59999))
    assert len(done.state()["ranges"][key(0, 0).rsplit("/", 1)[0] + "/p0000"]) == 1
    done.add("uploads/someone-elses.parquet")  # not a refscore key: kept as it is
    again = TrainedShards()
    again.load(done.state())
    assert again.state() == done.state() and "uploads/someone-elses.parquet" in again


def test_a_shard_announced_again_after_thousands_of_others_is_not_trained_twice():
    # Audit path 4 (issue 27): only the last 1,024 shard keys were kept, so a re-announcement after a
    # long freeze (a replica redoing another's range, `offdpo deadletter replay`) trained its pairs again.
    s = Stream()
    first = [row("early")]
    early = put_shard(s.store, first, 0)
    s.announce(early, first)
    s.source.mark_trained(s.source.next_batch(1))
    for i in range(1, 1500):
        s.source.done_shards.add(shard_key(FP.fingerprint_id, "pairs", 0, i, i))
    s.source.recent = stream_mod._Recent(1)  # the pair-id window long past it too
    s.announce(early, first)
    assert s.source.next_batch(1) is None
