"""The stream worker serving two references: each pair names the one it wants
(`PreferencePair.reference_fingerprint_id`; empty: the primary), is scored by that model into shards
under that model's fingerprint, and a pair naming one the worker does not serve is dead-lettered
(`unknown_reference`).

Reference A is the session's tiny model, B the same architecture and tokenizer with other random
weights (another fingerprint). The transformers engine throughout. The redo after a crash between
the shard-ready events and the commit runs `python -m services.refscore worker` (which loads the
extra models too) with the `before_commit` failpoint (SIGKILL), then again without it. The first test
does the partial redo on fakes: one reference's shard of a range written, the other's not, and the
redo's batch cut shorter than that range.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid

import pytest
from kafka.structs import TopicPartition

from localdev.process import wait_until
from offdpo import records
from offdpo.config import KafkaConfig, S3Config
from offdpo.kafka import DeadLetterSink, ensure_topics, make_producer, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from tests.fakes import FakeBroker, FakeConsumer, FakeObjectStore, FakeProducer
from tests.pairs import make_pairs
from tests.test_archive import _committed_all

from .conftest import load_scorer as _scorer
from .conftest import start_refscore
from .conftest import transformers_cfg as _cfg

TOLERANCE = 1e-5
UNKNOWN = "0123456789abcdef"  # a fingerprint id no model here has


@pytest.fixture(scope="module")
def scorers(tiny_model, model_b):
    a, b = _scorer(tiny_model), _scorer(model_b)
    assert a.fingerprint.fingerprint_id != b.fingerprint.fingerprint_id
    yield a, b
    a.shutdown()
    b.shutdown()


def _routed_pairs(tag, fp_a, fp_b, n=40):
    """n pairs: a quarter each naming A, naming B, naming nothing, naming an unknown reference."""
    pairs = make_pairs(n, tag)
    wants = {}
    for i, pair in enumerate(pairs):
        pair.reference_fingerprint_id = [fp_a, fp_b, "", UNKNOWN][i % 4]
        wants[pair.pair_id] = pair.reference_fingerprint_id
    return pairs, wants


def _topics(stack, tag):
    kafka = dataclasses.replace(
        stack.kafka,
        pairs_topic=f"route.pairs.{tag}",
        shards_topic=f"route.shards.{tag}",
        deadletter_topic=f"route.dead.{tag}",
    )
    ensure_topics(stack.kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], partitions=2)
    return kafka


def _produce(kafka, pairs):
    producer = make_producer(kafka, "test-routing")
    for pair in pairs:
        producer.send(kafka.pairs_topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
    producer.flush()
    producer.close()


def _rows(store, fp_id, topic):
    """{pair_id: ScoredPair} under one fingerprint's prefix, every row's pair id (duplicates kept), the keys."""
    keys = store.list_keys(f"scores/{fp_id}/{topic}/")
    rows, ids = {}, []
    for key in keys:
        for row in records.read_shard(store.get_bytes(key), key).rows():
            rows[row.pair.pair_id] = row
            ids.append(row.pair.pair_id)
    return rows, ids, keys


def _worst_difference(rows, pairs, scorer) -> float:
    """Largest per-token |log-prob| difference of the stored rows to scoring `pairs` fresh with `scorer`."""
    fresh = scorer.score_pairs([scorer.prepare_pair(p) for p in pairs], timeout=300)
    worst = 0.0
    for f in fresh:
        row = rows[f.prepared.pair.pair_id]
        assert row.fingerprint.fingerprint_id == scorer.fingerprint.fingerprint_id
        assert list(row.prompt_token_ids) == f.prepared.prompt_ids
        assert list(row.chosen_token_ids) == f.prepared.chosen_ids
        assert list(row.rejected_token_ids) == f.prepared.rejected_ids
        for got, want in ((row.chosen_logprobs, f.chosen_logprobs), (row.rejected_logprobs, f.rejected_logprobs)):
            assert len(got) == len(want)
            worst = max([worst] + [abs(a - b) for a, b in zip(got, want)])
    return worst


def _check_scored(stack, kafka, store, pairs, wants, a, b):
    """Every A/none pair once under A, every B pair once under B, equal to each model's own scoring;
    the unknown ones dead-lettered with unknown_reference; every shard announced with its fingerprint."""
    fp_a, fp_b = a.fingerprint.fingerprint_id, b.fingerprint.fingerprint_id
    want_a = [p for p in pairs if wants[p.pair_id] in ("", fp_a)]
    want_b = [p for p in pairs if wants[p.pair_id] == fp_b]
    unknown = {p.pair_id for p in pairs if wants[p.pair_id] == UNKNOWN}
    rows_a, ids_a, keys_a = _rows(store, fp_a, kafka.pairs_topic)
    rows_b, ids_b, keys_b = _rows(store, fp_b, kafka.pairs_topic)
    assert len(ids_a) == len(set(ids_a)) and set(ids_a) == {p.pair_id for p in want_a}, "each A/none pair once"
    assert len(ids_b) == len(set(ids_b)) and set(ids_b) == {p.pair_id for p in want_b}, "each B pair once"
    assert _worst_difference(rows_a, want_a, a) <= TOLERANCE
    assert _worst_difference(rows_b, want_b, b) <= TOLERANCE

    letters = [records_pb2.DeadLetter.FromString(r.value) for r in read_topic(stack.kafka, kafka.deadletter_topic)]
    # A redo may dead-letter a record again; by pair id the letters are exactly the unknown ones.
    assert {dl.original_key.decode() for dl in letters} == unknown
    for dl in letters:
        assert dl.error_type == "unknown_reference" and dl.service == "refscore"
        assert UNKNOWN in dl.reason and fp_a in dl.reason and fp_b in dl.reason, dl.reason
        assert a.fingerprint.model_id in dl.reason and b.fingerprint.model_id in dl.reason, dl.reason

    events = [records_pb2.ShardReady.FromString(r.value) for r in read_topic(stack.kafka, kafka.shards_topic)]
    assert {e.object_key for e in events} == set(keys_a) | set(keys_b), "every shard announced"
    for e in events:
        assert e.object_key.startswith(f"scores/{e.fingerprint.fingerprint_id}/"), e.object_key
        assert e.fingerprint.fingerprint_id in (fp_a, fp_b)
        assert e.sha256 == records.sha256_hex(store.get_bytes(e.object_key))
    # The references' shards of a partition never cut each other's ranges: two ranges are the same range
    # (both references had pairs there) or disjoint (only one had; e.g. a batch of B and unknown pairs
    # writes no A shard). The redo relies on it.
    ranges_a = {records.parse_shard_key(k) for k in keys_a}
    ranges_b = {records.parse_shard_key(k) for k in keys_b}
    for part, first, last in ranges_b:
        for part_a, first_a, last_a in ranges_a:
            if part_a == part and (first, last) != (first_a, last_a):
                assert last < first_a or last_a < first, f"B's range {first}-{last} cuts A's {first_a}-{last_a}"
    assert ranges_a & ranges_b, "the same ranges where both references had pairs"
    return events


def test_one_worker_routes_pairs_to_their_reference(stack, scorers, unique):
    from services.refscore.worker import StreamWorker

    a, b = scorers
    kafka = _topics(stack, unique)
    pairs, wants = _routed_pairs(unique, a.fingerprint.fingerprint_id, b.fingerprint.fingerprint_id)
    _produce(kafka, pairs)
    before = {fp: _worker_pairs(fp) for fp in (a.fingerprint.fingerprint_id, b.fingerprint.fingerprint_id)}
    cfg = _cfg(a.cfg.model_dir, group_id=f"route-{unique}", batch_pairs=16)
    worker = StreamWorker(a, cfg, kafka, stack.s3, extra_scorers=[b])
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: _committed_all(kafka, cfg.group_id), 180, "the worker committing every pair", every_s=1.0)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    store = ObjectStore(stack.s3)
    _check_scored(stack, kafka, store, pairs, wants, a, b)
    # The worker's pairs counter is kept per reference (metrics label `model`: its fingerprint id).
    for fp, named in (
        (a.fingerprint.fingerprint_id, ("", a.fingerprint.fingerprint_id)),
        (b.fingerprint.fingerprint_id, (b.fingerprint.fingerprint_id,)),
    ):
        assert _worker_pairs(fp) - before[fp] == sum(wants[p.pair_id] in named for p in pairs)


def _worker_pairs(fingerprint_id: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("refscore_worker_pairs_total", {"model": fingerprint_id}) or 0.0


def test_worker_killed_mid_batch_then_before_commit_and_restarted_writes_no_row_twice(
    stack, scorers, model_b, tmp_path, unique
):
    a, b = scorers
    kafka = _topics(stack, unique)
    pairs, wants = _routed_pairs(unique, a.fingerprint.fingerprint_id, b.fingerprint.fingerprint_id)
    _produce(kafka, pairs)
    group = f"route-kill-{unique}"
    env = {
        "OFFDPO_TOPIC_PAIRS": kafka.pairs_topic,
        "OFFDPO_TOPIC_SHARDS": kafka.shards_topic,
        "OFFDPO_TOPIC_DEADLETTER": kafka.deadletter_topic,
        "OFFDPO_REFSCORE_GROUP": group,
        "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
        "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "OFFDPO_REFSCORE_EXTRA_MODEL_DIRS": str(model_b),
    }
    store = ObjectStore(stack.s3)
    prefixes = [f"scores/{s.fingerprint.fingerprint_id}/{kafka.pairs_topic}/" for s in (a, b)]
    # 1: killed right after the batch's first shard (one reference's, of one partition): the other's of
    # that range is missing, which the redo must write under the same range without writing the first again.
    # 2: the redo killed after its events, before its commit. 3: a worker that finishes.
    before: dict[str, bytes] = {}
    for n, failpoint in enumerate(("after_shard_write", "before_commit"), 1):
        crashing = start_refscore(
            a.cfg.model_dir,
            tmp_path / f"crash{n}.log",
            engine="transformers",
            stack=stack,
            mode="worker",
            extra_env={**env, "OFFDPO_REFSCORE_FAILPOINT": failpoint},
        )
        try:
            code = crashing.proc.wait(timeout=240)
        finally:
            crashing.stop()
        assert code == -9, f"the {failpoint} failpoint should SIGKILL the worker; exit {code}\n{crashing.log_tail()}"
        written = {k: store.get_bytes(k) for prefix in prefixes for k in store.list_keys(prefix)}
        assert all(written[k] == data for k, data in before.items()), "a shard written before is kept as it was"
        if n == 1:
            assert len(written) == 1, f"exactly one shard was written before the first crash: {list(written)}"
        before = written
    assert not _committed_all(kafka, group)

    restarted = start_refscore(
        a.cfg.model_dir, tmp_path / "restart.log", engine="transformers", stack=stack, mode="worker", extra_env=env
    )
    try:
        wait_until(
            lambda: _committed_all(kafka, group),
            240,
            "the restarted worker committing every pair",
            every_s=1.0,
            diag=restarted.log_tail,
        )
        _check_scored(stack, kafka, store, pairs, wants, a, b)
        for key, data in before.items():
            assert store.get_bytes(key) == data, f"{key}, written before the crash, is kept as it was"
    finally:
        assert restarted.stop() == 0, restarted.log_tail()


# -- the partial redo, on fakes ----------------------------------------------------------------------
class PausingConsumer(FakeConsumer):
    """FakeConsumer with kafka-python's pause/resume: a paused partition returns nothing from poll."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paused: set[TopicPartition] = set()
        self.pauses = 0

    def pause(self, *tps):
        self.pauses += 1
        self.paused.update(tps)

    def resume(self, *tps):
        self.paused.difference_update(tps)

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
        hidden = {tp: self._positions.pop(tp) for tp in self.paused if tp in self._positions}
        try:
            return super().poll(timeout_ms, max_records, update_offsets)
        finally:
            self._positions.update(hidden)


class CountingStore(FakeObjectStore):
    def __init__(self):
        super().__init__()
        self.puts: list[str] = []

    def put_bytes(self, key, data, content_type="application/octet-stream", metadata=None):
        self.puts.append(key)
        super().put_bytes(key, data, content_type, metadata)


def test_a_redo_scores_only_the_reference_whose_shard_is_missing_under_the_same_range(scorers):
    """A crash after A's shard of a range and before B's: the redo (its batch cut shorter than the
    range) reads on to the range's end, writes B's shard under the same range, does not write A's
    again, announces both and commits past the range."""
    from services.refscore.worker import StreamWorker

    a, b = scorers
    fp_a, fp_b = a.fingerprint.fingerprint_id, b.fingerprint.fingerprint_id
    kafka = dataclasses.replace(KafkaConfig(), pairs_topic="pairs", shards_topic="shards", deadletter_topic="dead")
    broker, store = FakeBroker(partitions=2), CountingStore()  # the pairs in partition 0, 1 empty
    for topic in (kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic):
        broker.create_topic(topic)
    pairs, wants = _routed_pairs(uuid.uuid4().hex[:6], fp_a, fp_b, n=8)
    for pair in pairs:
        broker.append(kafka.pairs_topic, pair.SerializeToString(), pair.pair_id.encode(), partition=0)
    tp = TopicPartition(kafka.pairs_topic, 0)

    def worker():
        cfg = _cfg(a.cfg.model_dir, group_id="g", batch_pairs=16)
        w = StreamWorker(a, cfg, kafka, S3Config(), store=store, extra_scorers=[b])
        w.consumer = PausingConsumer(broker, kafka.pairs_topic, group="g")
        w.producer = FakeProducer(broker)
        w.dlq = DeadLetterSink(w.producer, kafka, "refscore")
        return w

    first = worker()
    first.process(first.consumer.poll(max_records=16)[tp])
    key_a = records.shard_key(fp_a, kafka.pairs_topic, 0, 0, 7)
    key_b = records.shard_key(fp_b, kafka.pairs_topic, 0, 0, 7)
    assert sorted(store.puts) == sorted([key_a, key_b])
    b_bytes = store.objects.pop(key_b)  # as if the crash came between A's write and B's
    broker.committed.clear()
    store.puts.clear()
    for part in broker.topics[kafka.shards_topic] + broker.topics[kafka.deadletter_topic]:
        part.clear()

    redo = worker()
    redo.process(redo.consumer.poll(max_records=3)[tp])  # the redo's poll returned fewer records
    assert store.puts == [key_b], "only B's shard is written again, under the range A's has"
    assert store.objects[key_b] == b_bytes, "same rows, same bytes"
    assert redo.consumer.pauses == 1 and not redo.consumer.paused
    events = [records_pb2.ShardReady.FromString(v) for v in broker.values(kafka.shards_topic)]
    assert sorted(e.object_key for e in events) == sorted([key_a, key_b])
    assert broker.committed[("g", tp)] == 8 and redo.consumer.position(tp) == 8
    letters = [records_pb2.DeadLetter.FromString(v) for v in broker.values(kafka.deadletter_topic)]
    assert sorted(dl.original_key.decode() for dl in letters) == sorted(
        p.pair_id for p in pairs if wants[p.pair_id] == UNKNOWN
    )
    assert all(dl.error_type == "unknown_reference" for dl in letters)
