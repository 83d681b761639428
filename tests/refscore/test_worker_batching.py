"""The stream worker's micro-batching with in-memory Kafka and S3 (tests/fakes.py) and a fake engine
whose log-probs are a known function of the tokens: what is scored, where it is written, what is
announced and dead-lettered, and that the commit comes last."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

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


class PollingConsumer(FakeConsumer):
    """Waits out `timeout_ms` when there is nothing to return, as kafka-python does (no busy loop)."""

    def __init__(self, *args, timeline: Timeline, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeline = timeline

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
        out = super().poll(timeout_ms, max_records, update_offsets)
        if not out:
            time.sleep(min(timeout_ms, 50) / 1000)
        return out

    def commit(self, offsets=None):
        super().commit(offsets)
        self.timeline.entries.append(("commit", ""))


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

    def run(engine: FakeEngine, until) -> worker_mod.StreamWorker:
        scorer = Scorer(cfg)
        scorer.load(engine)
        scorers.append(scorer)
        worker = worker_mod.StreamWorker(scorer, cfg, kafka, S3Config(), store=store)
        worker.consumer = PollingConsumer(broker, kafka.pairs_topic, group=cfg.group_id, timeline=timeline)
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

    # Shards written, then their events sent, and only then the commit.
    kinds = [kind for kind, _ in timeline.entries]
    first_commit = kinds.index("commit")
    assert kinds[:first_commit].count("shard") == 2 and kinds[:first_commit].count("send") == 2, timeline.entries
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
