"""The stream worker's micro-batching with in-memory Kafka and S3 (tests/fakes.py) and a fake engine
whose log-probs are a known function of the tokens: what is scored, where it is written, what is
announced and dead-lettered, and that the commit comes last."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
from kafka.structs import TopicPartition

from offdpo import records
from offdpo.config import KafkaConfig, S3Config
from offdpo.kafka import DeadLetterSink
from offdpo.v1 import records_pb2
from services.refscore import worker as worker_mod
from services.refscore.config import RefscoreConfig
from services.refscore.engines import Generated
from services.refscore.scorer import Scorer
from tests.fakes import FakeBroker, FakeConsumer, FakeObjectStore, FakeProducer
from tests.pairs import make_pairs

WAIT_S = 30
MAX_MODEL_LEN = 128
BREAKS_ENGINE = "the engine cannot score this answer"


def expected_logprobs(prompt_ids, answer_ids) -> list[float]:
    """The fake engine's log-prob of answer token i: a function of every token up to and including it."""
    full = list(prompt_ids) + list(answer_ids)
    return [-((sum(full[: len(prompt_ids) + i + 1]) % 97) + 1) / 100 for i in range(len(answer_ids))]


class FakeEngine:
    """The Engine protocol with deterministic log-probs; refuses a batch holding `poison` token ids."""

    name, version, dtype, max_model_len = "fake", "0", "float32", MAX_MODEL_LEN

    def __init__(self, poison: list[int] | None = None):
        self.poison = poison
        self.calls: list[int] = []  # sequences per engine call

    def score(self, seqs):
        self.calls.append(len(seqs))
        if self.poison and any(a == self.poison for _, a in seqs):
            raise RuntimeError("injected: the engine fails on this sequence")
        return [expected_logprobs(p, a) for p, a in seqs]

    def generate(self, prompt_ids, *, n, max_tokens, temperature, top_p, seed, stop_token_ids):
        return [Generated([], [], "length")] * n

    def shutdown(self) -> None:
        pass

    def effective_settings(self) -> dict[str, str]:
        return {"engine": "fake"}


class Timeline:
    """One ordered log of what reached S3, the shard-ready topic and the consumer group."""

    def __init__(self):
        self.entries: list[tuple[str, str]] = []


class RecordingStore(FakeObjectStore):
    def __init__(self, timeline: Timeline):
        super().__init__()
        self.timeline = timeline

    def put_bytes(self, key, data, content_type="application/octet-stream", metadata=None):
        super().put_bytes(key, data, content_type, metadata)
        self.timeline.entries.append(("shard", key))


class RecordingProducer(FakeProducer):
    def __init__(self, broker: FakeBroker, timeline: Timeline):
        super().__init__(broker)
        self.timeline = timeline

    def send(self, topic, value=None, key=None, partition=None, **kw):
        future = super().send(topic, value=value, key=key, partition=partition, **kw)
        self.timeline.entries.append(("send", topic))
        return future


class FakeCluster:
    """kafka-python's cluster metadata, as far as `offdpo.kafka.topic_id` reads it."""

    def __init__(self, topic_ids: dict[str, uuid.UUID]):
        self.topic_ids = topic_ids

    def topic_id(self, topic: str) -> uuid.UUID | None:
        return self.topic_ids.get(topic)


class FakeClient:
    def __init__(self, topic_ids: dict[str, uuid.UUID]):
        self.cluster = FakeCluster(topic_ids)


class PollingConsumer(FakeConsumer):
    """Waits out `timeout_ms` when there is nothing to return, as kafka-python does (no busy loop),
    and knows the topics' ids (`topic_ids`, shared with the test: it recreates topics by changing one)."""

    def __init__(self, *args, timeline: Timeline, topic_ids: dict[str, uuid.UUID] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeline = timeline
        self._client = FakeClient(topic_ids if topic_ids is not None else {})

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
        out = super().poll(timeout_ms, max_records, update_offsets)
        if not out:
            time.sleep(min(timeout_ms, 50) / 1000)
        return out

    def commit(self, offsets=None):
        super().commit(offsets)
        self.timeline.entries.append(("commit", repr(sorted(self.commits[-1].items()))))


@pytest.fixture
def harness(tiny_model):
    """A StreamWorker on fakes: (broker, store, timeline, kafka settings, run) where `run(engine,
    until)` runs the worker in a thread until `until()` holds, then stops it."""
    kafka = dataclasses.replace(KafkaConfig(), pairs_topic="pairs", shards_topic="shards", deadletter_topic="dead")
    cfg = RefscoreConfig(model_dir=str(tiny_model), batch_pairs=64, batch_wait_s=0.05, group_id="g")
    broker, timeline = FakeBroker(partitions=2), Timeline()
    store = RecordingStore(timeline)
    for topic in (kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic):
        broker.create_topic(topic)
    scorers: list[Scorer] = []
    broker.topic_ids = {}  # topic -> id (a test sets one to give the topic an incarnation)

    def run(engine: FakeEngine, until, worker_cfg: RefscoreConfig | None = None) -> worker_mod.StreamWorker:
        scorer = Scorer(worker_cfg or cfg)
        scorer.load(engine)
        scorers.append(scorer)
        worker = worker_mod.StreamWorker(scorer, worker_cfg or cfg, kafka, S3Config(), store=store)
        worker.consumer = PollingConsumer(
            broker, kafka.pairs_topic, group=cfg.group_id, timeline=timeline, topic_ids=broker.topic_ids
        )
        worker.producer = RecordingProducer(broker, timeline)
        worker.dlq = DeadLetterSink(worker.producer, kafka, "refscore")
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while not until():
                assert thread.is_alive(), "the worker thread died"
                assert time.monotonic() < deadline, f"not done within {WAIT_S} s: {timeline.entries}"
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(timeout=WAIT_S)
        assert not thread.is_alive()
        return worker

    yield broker, store, timeline, kafka, run
    for scorer in scorers:
        scorer.shutdown()


def _produce(broker, topic, pairs, partition_of=lambda i: i % 2):
    for i, pair in enumerate(pairs):
        broker.append(topic, pair.SerializeToString(), pair.pair_id.encode(), partition=partition_of(i))


def _committed(broker, group="g", topic="pairs") -> dict[int, int]:
    return {tp.partition: off for (g, tp), off in broker.committed.items() if g == group and tp.topic == topic}


def _shards(store) -> dict[str, records.Shard]:
    return {k: records.read_shard(v, k) for k, v in store.objects.items()}


def test_pairs_are_scored_into_one_shard_per_partition_then_announced_then_committed(harness):
    broker, store, timeline, kafka, run = harness
    pairs = make_pairs(10, "batch")
    _produce(broker, kafka.pairs_topic, pairs)  # 5 on each of the 2 partitions
    worker = run(FakeEngine(), until=lambda: _committed(broker) == {0: 5, 1: 5})

    shards = _shards(store)
    assert len(shards) == 2, sorted(shards)
    fp_id = worker.scorer.model().fingerprint.fingerprint_id
    assert sorted(shards) == [
        records.shard_key(fp_id, kafka.pairs_topic, 0, 0, 4),
        records.shard_key(fp_id, kafka.pairs_topic, 1, 0, 4),
    ]
    by_id = {p.pair_id: p for p in pairs}
    rows = [row for shard in shards.values() for row in shard.rows()]
    assert sorted(r.pair.pair_id for r in rows) == sorted(by_id), "every pair exactly once"
    for row in rows:
        assert row.pair == by_id[row.pair.pair_id]
        # Each answer's log-probs are those of its own token ids (chosen and rejected not swapped).
        assert list(row.chosen_logprobs) == pytest.approx(expected_logprobs(row.prompt_token_ids, row.chosen_token_ids))
        assert list(row.rejected_logprobs) == pytest.approx(
            expected_logprobs(row.prompt_token_ids, row.rejected_token_ids)
        )
        assert row.chosen_logprob_sum == pytest.approx(sum(row.chosen_logprobs))
        assert list(row.chosen_token_ids) != list(row.rejected_token_ids)

    events = [records_pb2.ShardReady.FromString(v) for v in broker.values(kafka.shards_topic)]
    assert sorted(e.object_key for e in events) == sorted(shards), "one event per shard"
    for e in events:
        assert e.sha256 == records.sha256_hex(store.objects[e.object_key])
        assert sorted(e.pair_ids) == sorted(shards[e.object_key].pair_ids) and e.row_count == len(e.pair_ids)
        (rng,) = e.source_ranges
        assert (rng.first_offset, rng.last_offset) == (0, 4)

    # The fence (a commit of the offsets the batch starts at: no change), then the shards, their
    # events, and only then the commit that moves the offsets.
    assert [e for e in timeline.entries if e[0] == "commit"] == [
        ("commit", repr([(TopicPartition("pairs", 0), 0), (TopicPartition("pairs", 1), 0)])),
        ("commit", repr([(TopicPartition("pairs", 0), 5), (TopicPartition("pairs", 1), 5)])),
    ], timeline.entries
    kinds = [kind for kind, _ in timeline.entries]
    fence, moved = (i for i, k in enumerate(kinds) if k == "commit")
    assert kinds[fence:moved].count("shard") == 2 and kinds[fence:moved].count("send") == 2, timeline.entries
    assert broker.values(kafka.deadletter_topic) == []


def test_undecodable_and_too_long_pairs_are_dead_lettered_with_their_type(harness):
    broker, store, timeline, kafka, run = harness
    good = make_pairs(3, "good")
    too_long = records.make_pair(records.text_prompt("q"), "number " * 300, "short")
    inputs = [
        (b"garbage", b"\x00\x01 not protobuf \xff\xfe", "invalid_pair"),
        (b"wrong-type", records_pb2.DeadLetter(reason="x", offset=3).SerializeToString(), "invalid_pair"),
        (too_long.pair_id.encode(), too_long.SerializeToString(), "too_long"),
    ]
    for pair in good:
        broker.append(kafka.pairs_topic, pair.SerializeToString(), pair.pair_id.encode(), partition=0)
    for key, value, _ in inputs:
        broker.append(kafka.pairs_topic, value, key, partition=0)
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 6})

    letters = [records_pb2.DeadLetter.FromString(v) for v in broker.values(kafka.deadletter_topic)]
    assert {dl.original_key: dl.error_type for dl in letters} == {k: t for k, _, t in inputs}
    assert all(dl.reason and dl.service == "refscore" and dl.topic == kafka.pairs_topic for dl in letters)
    too_long_letter = next(dl for dl in letters if dl.error_type == "too_long")
    assert "exceeds the model's context" in too_long_letter.reason and too_long.pair_id in too_long_letter.reason
    (shard,) = _shards(store).values()
    assert sorted(shard.pair_ids) == sorted(p.pair_id for p in good)


def test_a_pair_that_breaks_the_engine_is_dead_lettered_and_the_rest_scored(harness, tiny_model):
    broker, store, timeline, kafka, run = harness
    pairs = make_pairs(4, "poison")
    scorer = Scorer(RefscoreConfig(model_dir=str(tiny_model)))
    scorer.load(FakeEngine())
    try:
        poison = scorer.prepare_pair(pairs[2]).chosen_ids
    finally:
        scorer.shutdown()
    _produce(broker, kafka.pairs_topic, pairs, partition_of=lambda i: 0)
    engine = FakeEngine(poison=poison)
    run(engine, until=lambda: _committed(broker) == {0: 4})

    (letter,) = [records_pb2.DeadLetter.FromString(v) for v in broker.values(kafka.deadletter_topic)]
    assert letter.error_type == "engine_error" and letter.offset == 2 and pairs[2].pair_id in letter.reason
    (shard,) = _shards(store).values()
    assert sorted(shard.pair_ids) == sorted(p.pair_id for i, p in enumerate(pairs) if i != 2)
    assert engine.calls[0] == 8, "the batch's 4 pairs went to the engine as one call of 8 answers"


def test_a_redo_after_a_crash_reannounces_the_written_shard_and_writes_no_row_twice(harness):
    broker, store, timeline, kafka, run = harness
    pairs = make_pairs(4, "redo")
    _produce(broker, kafka.pairs_topic, pairs, partition_of=lambda i: 0)
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 4})
    (key,) = store.objects
    broker.committed.clear()  # the commit was lost: the next worker redoes the batch
    puts_before = [c for c in store.calls if c[0] == "put"]
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 4})

    assert [c for c in store.calls if c[0] == "put"] == puts_before, "the shard was written again"
    events = [records_pb2.ShardReady.FromString(v) for v in broker.values(kafka.shards_topic)]
    assert [e.object_key for e in events] == [key, key], "announced once per attempt, same key"


def test_a_record_over_the_limits_is_dead_lettered_by_reference_and_the_partition_moves_on(harness):
    """12 MiB on the pairs topic (the broker takes up to 16 MiB), then good pairs on the same partition:
    the big one becomes a dead letter small enough to produce, the good ones are scored and committed."""
    import hashlib

    broker, store, timeline, kafka, run = harness
    big = b"\x0a" + b"\xff" * (12 * 1024 * 1024)
    good = make_pairs(3, "after-big")
    broker.append(kafka.pairs_topic, big, b"big", partition=0)
    for pair in good:
        broker.append(kafka.pairs_topic, pair.SerializeToString(), pair.pair_id.encode(), partition=0)
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 4})

    (letter,) = [records_pb2.DeadLetter.FromString(v) for v in broker.values(kafka.deadletter_topic)]
    assert letter.error_type == "too_large" and letter.offset == 0 and letter.original_truncated
    assert letter.original_size == len(big) and letter.original_sha256 == hashlib.sha256(big).hexdigest()
    assert letter.original_value == big[:1024] and len(letter.SerializeToString()) < 64 * 1024
    (shard,) = _shards(store).values()
    assert sorted(shard.pair_ids) == sorted(p.pair_id for p in good)


def test_shard_keys_carry_the_topic_id_so_a_recreated_topic_is_scored_not_skipped(harness):
    """Offsets 0..3 scored in one incarnation of the topic; the topic deleted and created again (new
    id, offsets from 0, the group's offsets gone with it) while S3 keeps the old shard: the new
    incarnation's pairs at the same offsets are scored into a shard of their own."""
    broker, store, timeline, kafka, run = harness
    old_id, new_id = uuid.uuid4(), uuid.uuid4()
    broker.topic_ids[kafka.pairs_topic] = old_id
    old_pairs = make_pairs(4, "old-incarnation")
    _produce(broker, kafka.pairs_topic, old_pairs, partition_of=lambda i: 0)
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 4})
    (old_key,) = store.objects

    del broker.topics[kafka.pairs_topic]
    broker.committed.clear()
    broker.topic_ids[kafka.pairs_topic] = new_id
    broker.create_topic(kafka.pairs_topic)
    new_pairs = make_pairs(4, "new-incarnation")
    _produce(broker, kafka.pairs_topic, new_pairs, partition_of=lambda i: 0)
    run(FakeEngine(), until=lambda: _committed(broker) == {0: 4})

    shards = _shards(store)
    assert old_key in shards and len(shards) == 2, sorted(shards)
    (new_key,) = set(shards) - {old_key}
    assert records.parse_shard_key(old_key) == records.parse_shard_key(new_key) == (0, 0, 3)
    assert "/id-" in old_key and old_key.split("/")[3] != new_key.split("/")[3]
    assert sorted(shards[new_key].pair_ids) == sorted(p.pair_id for p in new_pairs)
    events = [records_pb2.ShardReady.FromString(v) for v in broker.values(kafka.shards_topic)]
    assert sorted(e.object_key for e in events) == sorted([old_key, new_key]), "the old shard is not re-announced"


def test_a_topic_recreated_under_a_running_worker_is_redone_with_a_new_consumer(harness, monkeypatch):
    """The id changes between two batches of one worker: it does not write under either incarnation with
    positions of the other; it replaces its consumer and scores the new incarnation from its start."""
    broker, store, timeline, kafka, run = harness
    broker.topic_ids[kafka.pairs_topic] = uuid.uuid4()
    _produce(broker, kafka.pairs_topic, make_pairs(4, "before"), partition_of=lambda i: 0)
    consumers = []

    def new_consumer(*args, **kwargs):
        consumers.append(
            PollingConsumer(broker, kafka.pairs_topic, group="g", timeline=timeline, topic_ids=broker.topic_ids)
        )
        return consumers[-1]

    monkeypatch.setattr(worker_mod, "make_consumer", new_consumer)
    state = {"recreated": False}
    after = make_pairs(6, "after")

    def until():
        if not state["recreated"] and _committed(broker) == {0: 4}:
            del broker.topics[kafka.pairs_topic]
            broker.committed.clear()
            broker.topic_ids[kafka.pairs_topic] = uuid.uuid4()
            broker.create_topic(kafka.pairs_topic)
            _produce(broker, kafka.pairs_topic, after, partition_of=lambda i: 0)
            state["recreated"] = True
        return state["recreated"] and _committed(broker) == {0: 6}

    run(FakeEngine(), until=until)
    assert consumers, "the worker replaced its consumer"
    scored = {pid for shard in _shards(store).values() for pid in shard.pair_ids}
    assert {p.pair_id for p in after} <= scored


def test_a_member_evicted_while_scoring_writes_nothing_and_redoes_the_batch(harness, monkeypatch):
    """The fence: the commit of the offsets the batch starts at is refused (the member was evicted
    while its batch was in the engine): no shard, no event; the redo writes the shard once."""
    from kafka.errors import CommitFailedError

    broker, store, timeline, kafka, run = harness
    _produce(broker, kafka.pairs_topic, make_pairs(4, "fenced"), partition_of=lambda i: 0)
    refused = []
    real_commit = PollingConsumer.commit

    def commit(self, offsets=None):
        if not refused:
            refused.append(offsets)
            raise CommitFailedError("injected: the group has rebalanced")
        return real_commit(self, offsets)

    monkeypatch.setattr(PollingConsumer, "commit", commit)
    engine = FakeEngine()
    run(engine, until=lambda: _committed(broker) == {0: 4})
    assert [o.offset for o in refused[0].values()] == [0], "the refused commit was the fence, at the batch's start"
    assert len([c for c in store.calls if c[0] == "put"]) == 1, store.calls
    assert len(broker.values(kafka.shards_topic)) == 1
    assert len(engine.calls) == 2, "the refused batch was scored, then redone"


def test_a_batch_whose_every_pair_breaks_a_working_engine_is_dead_lettered(harness, tiny_model):
    # Audit path 6 (issue 27): a batch the engine failed on every pair of was "an outage", redone
    # forever: one poison pair alone in its batch stalled the partition for good.
    broker, store, timeline, kafka, run = harness
    pairs = make_pairs(1, "alone")
    scorer = Scorer(RefscoreConfig(model_dir=str(tiny_model)))
    scorer.load(FakeEngine())
    try:
        poison = scorer.prepare_pair(pairs[0]).chosen_ids
    finally:
        scorer.shutdown()
    _produce(broker, kafka.pairs_topic, pairs, partition_of=lambda i: 0)
    engine = FakeEngine(poison=poison)
    worker = run(engine, until=lambda: _committed(broker) == {0: 1})
    (letter,) = [records_pb2.DeadLetter.FromString(v) for v in broker.values(kafka.deadletter_topic)]
    assert letter.error_type == "engine_error" and pairs[0].pair_id in letter.reason
    assert worker.heartbeat.failing_since is None


class BrokenEngine(FakeEngine):
    """An engine that fails on everything (a CUDA error, a corrupted state)."""

    def score(self, seqs):
        self.calls.append(len(seqs))
        raise RuntimeError("injected: the engine is broken")


def test_a_broken_engine_is_an_outage_nothing_dead_lettered_and_the_watchdog_told(harness):
    broker, store, timeline, kafka, run = harness
    pairs = make_pairs(3, "broken")
    _produce(broker, kafka.pairs_topic, pairs, partition_of=lambda i: 0)
    engine = BrokenEngine()
    # batch, each pair alone, the canary; then the same again after the retry's backoff
    worker = run(engine, until=lambda: len(engine.calls) >= 10)
    assert broker.values(kafka.deadletter_topic) == [] and _committed(broker) == {}
    assert worker.heartbeat.failing_since is not None and "engine is broken" in worker.heartbeat.failing_reason
