"""The stream worker on the local stack: pairs in Kafka -> shards in S3 -> shard-ready events."""

import contextlib
import dataclasses
import threading
import uuid

import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer

from localdev.process import wait_until
from offdpo import records
from offdpo.kafka import GROUP_REFUSALS_BEFORE_NEW_CONSUMER, ensure_topics, make_producer, next_offsets, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from tests.pairs import make_pairs
from tests.stuck_consumer import FirstConsumerStuck

from .conftest import start_refscore


def _bad_records():
    good = make_pairs(1, "bad")[0].SerializeToString()
    too_long = records.make_pair(records.text_prompt("q"), "number " * 3000, "short")
    return [
        (b"garbage", b"\x00\x01 not protobuf \xff\xfe", "invalid_pair"),
        (b"truncated", good[: len(good) // 2], "invalid_pair"),
        (b"empty", b"", "invalid_pair"),
        (b"wrong-type", records_pb2.DeadLetter(reason="x", offset=3).SerializeToString(), "invalid_pair"),
        (too_long.pair_id.encode(), too_long.SerializeToString(), "too_long"),
    ]


def _produce(kafka, topic, pairs, extra=()):
    producer = make_producer(kafka, "test")
    for pair in pairs:
        producer.send(topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
    for key, value, _ in extra:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


@contextlib.contextmanager
def _worker_thread(stack, tiny_model, unique: str, tag: str, pairs):
    """Topics of the test's own holding `pairs`, and a StreamWorker (transformers engine) in a thread;
    yields (kafka settings, group id, thread). Patch make_consumer/make_producer before entering."""
    from services.refscore import worker as worker_mod
    from services.refscore.config import RefscoreConfig
    from services.refscore.scorer import Scorer

    kafka = dataclasses.replace(
        stack.kafka,
        pairs_topic=f"{tag}.pairs.{unique}",
        shards_topic=f"{tag}.shards.{unique}",
        deadletter_topic=f"{tag}.dead.{unique}",
    )
    ensure_topics(stack.kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], partitions=1)
    _produce(kafka, kafka.pairs_topic, pairs)
    cfg = RefscoreConfig(
        model_dir=str(tiny_model),
        engine="transformers",
        max_model_len=512,
        batch_wait_s=0.3,
        group_id=f"{tag}-{unique}",
    )
    scorer = Scorer(cfg)
    scorer.load()
    stop = threading.Event()
    thread = threading.Thread(
        target=worker_mod.StreamWorker(scorer, cfg, kafka, stack.s3).run, args=(stop,), daemon=True
    )
    thread.start()
    try:
        yield kafka, cfg.group_id, thread
    finally:
        stop.set()
        thread.join(timeout=60)
        scorer.shutdown()


def _wait(predicate, timeout_s, what, log_tail=None):
    wait_until(predicate, timeout_s, what, every_s=1.0, diag=log_tail)


def _rows_in_s3(store, fp_id, topic):
    keys = store.list_keys(f"scores/{fp_id}/{topic}/")
    rows = []
    for key in keys:
        shard = records.read_shard(store.get_bytes(key), key)
        rows += shard.pair_ids
    return keys, rows


def _committed_all(kafka, group, topic) -> bool:
    ends = next_offsets(read_topic(kafka, topic, idle_s=1.0))
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return all((consumer.committed(tp) or 0) == end for tp, end in ends.items())
    finally:
        consumer.close()


@pytest.mark.vllm
def test_stream_scores_every_pair_once_and_dead_letters_bad_records(stack, vllm_server, vllm_topics, vllm_client):
    topic, shards_topic = vllm_topics["OFFDPO_TOPIC_PAIRS"], vllm_topics["OFFDPO_TOPIC_SHARDS"]
    fp = vllm_client.model_info().fingerprint
    pairs = make_pairs(40, uuid.uuid4().hex[:6])
    bad = _bad_records()
    _produce(stack.kafka, topic, pairs, bad)
    store = ObjectStore(stack.s3)
    _wait(
        lambda: (
            len(_rows_in_s3(store, fp.fingerprint_id, topic)[1]) >= 40
            and _committed_all(stack.kafka, vllm_topics["OFFDPO_REFSCORE_GROUP"], topic)
        ),
        180,
        "scoring all 40 pairs and committing",
        vllm_server.log_tail,
    )

    keys, rows = _rows_in_s3(store, fp.fingerprint_id, topic)
    assert sorted(rows) == sorted(p.pair_id for p in pairs), "each pair exactly once"
    # Readable with plain pyarrow, and the rows carry what the trainer needs.
    table = pq.read_table(__import__("io").BytesIO(store.get_bytes(keys[0])))
    assert {"prompt_token_ids", "chosen_token_ids", "chosen_logprobs", "rejected_logprob_sum"} <= set(
        table.column_names
    )
    shard = records.read_shard(store.get_bytes(keys[0]))
    assert shard.fingerprint.fingerprint_id == fp.fingerprint_id
    row = next(iter(shard.rows()))
    assert len(row.chosen_logprobs) == len(row.chosen_token_ids) and row.chosen_logprob_sum < 0

    events = [records_pb2.ShardReady.FromString(r.value) for r in read_topic(stack.kafka, shards_topic)]
    assert sorted(e.object_key for e in events) == keys, "one shard-ready event per shard"
    for e in events:
        assert e.row_count == len(e.pair_ids) and e.fingerprint.fingerprint_id == fp.fingerprint_id
        assert e.sha256 == records.sha256_hex(store.get_bytes(e.object_key))

    letters = [
        records_pb2.DeadLetter.FromString(r.value)
        for r in read_topic(stack.kafka, vllm_topics["OFFDPO_TOPIC_DEADLETTER"])
    ]
    assert sorted(dl.original_key for dl in letters) == sorted(k for k, _, _ in bad)
    for dl in letters:
        expected_type = next(t for k, _, t in bad if k == dl.original_key)
        assert dl.error_type == expected_type and dl.reason and dl.topic == topic and dl.service == "refscore"


def test_worker_killed_between_shard_write_and_commit_loses_and_duplicates_nothing(stack, tiny_model, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "OFFDPO_TOPIC_PAIRS": f"kill.pairs.{suffix}",
        "OFFDPO_TOPIC_SHARDS": f"kill.shards.{suffix}",
        "OFFDPO_TOPIC_DEADLETTER": f"kill.dead.{suffix}",
        "OFFDPO_REFSCORE_GROUP": f"kill-{suffix}",
        "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
        "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
    }
    ensure_topics(stack.kafka, [v for k, v in topics.items() if k.startswith("OFFDPO_TOPIC")], partitions=3)
    pairs = make_pairs(60, suffix)
    _produce(stack.kafka, topics["OFFDPO_TOPIC_PAIRS"], pairs, _bad_records()[:2])

    crashing = start_refscore(
        tiny_model,
        tmp_path / "crash.log",
        engine="transformers",
        stack=stack,
        mode="worker",
        extra_env={**topics, "OFFDPO_REFSCORE_FAILPOINT": "after_shard_write"},
    )
    try:
        code = crashing.proc.wait(timeout=180)
    finally:
        crashing.stop()
    assert code == -9, f"the failpoint should SIGKILL the worker; exit {code}\n{crashing.log_tail()}"
    store = ObjectStore(stack.s3)
    fp_prefix = "scores/"
    written = [k for k in store.list_keys(fp_prefix) if f"/{topics['OFFDPO_TOPIC_PAIRS']}/" in k]
    assert len(written) == 1, "exactly one shard was written before the crash"
    assert not _committed_all(stack.kafka, topics["OFFDPO_REFSCORE_GROUP"], topics["OFFDPO_TOPIC_PAIRS"])

    restarted = start_refscore(
        tiny_model, tmp_path / "restart.log", engine="transformers", stack=stack, mode="worker", extra_env=topics
    )
    try:
        fp_id = written[0].split("/")[1]
        _wait(
            lambda: _committed_all(stack.kafka, topics["OFFDPO_REFSCORE_GROUP"], topics["OFFDPO_TOPIC_PAIRS"]),
            180,
            "the restarted worker committing everything",
            restarted.log_tail,
        )
        keys, rows = _rows_in_s3(store, fp_id, topics["OFFDPO_TOPIC_PAIRS"])
        assert len(rows) == len(set(rows)) == 60, f"{len(rows)} rows, {len(set(rows))} distinct"
        assert set(rows) == {p.pair_id for p in pairs}
        assert written[0] in keys, "the pre-crash shard is kept, not rewritten under another key"
        events = [
            records_pb2.ShardReady.FromString(r.value) for r in read_topic(stack.kafka, topics["OFFDPO_TOPIC_SHARDS"])
        ]
        assert {e.object_key for e in events} == set(keys), "every shard announced (the first one after the restart)"
        letters = read_topic(stack.kafka, topics["OFFDPO_TOPIC_DEADLETTER"])
        # A redo may dead-letter a record again; keyed by origin, the distinct bad records are exactly 2.
        assert len({r.key for r in letters}) == 2
    finally:
        assert restarted.stop() == 0, restarted.log_tail()


def test_worker_replaces_a_producer_that_hit_a_fatal_error(stack, tiny_model, unique, monkeypatch):
    """After the broker loses its storage, an idempotent producer can fail fatally and refuse every
    later send. The worker must start a new producer and go on."""
    from kafka.errors import UnknownError

    from services.refscore import worker as worker_mod

    class FatallyBroken:
        """A producer in kafka-python's fatal-error state: every send fails."""

        def __init__(self, inner):
            self.inner = inner

        def send(self, *args, **kwargs):
            raise UnknownError("injected: Aborting producer batches due to fatal error")

        def flush(self, *args, **kwargs):
            return self.inner.flush(*args, **kwargs)

        def close(self, *args, **kwargs):
            return self.inner.close(*args, **kwargs)

    made = []
    real = worker_mod.make_producer

    def make(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return FatallyBroken(made[-1]) if len(made) == 1 else made[-1]

    monkeypatch.setattr(worker_mod, "make_producer", make)
    pairs = make_pairs(6, unique)
    with _worker_thread(stack, tiny_model, unique, "fatal", pairs) as (kafka, group, _):

        def announced():
            events = [
                records_pb2.ShardReady.FromString(r.value) for r in read_topic(kafka, kafka.shards_topic, idle_s=0.5)
            ]
            return sorted({pid for e in events for pid in e.pair_ids}) == sorted(p.pair_id for p in pairs)

        _wait(announced, 120, "the worker announcing every pair after replacing its producer")
        assert len(made) >= 2, "the broken producer was never replaced"
        assert _committed_all(kafka, group, kafka.pairs_topic)


def test_worker_redoes_a_batch_at_once_when_a_rebalance_refuses_its_commit(
    stack, tiny_model, unique, monkeypatch, caplog
):
    """A commit refused by a group rebalance is not an outage: no backoff, the batch is redone at once
    (its shards are already written). A consumer whose every commit is refused (kafka-python stuck in
    its client-side rebalancing state) is replaced by a new one after
    GROUP_REFUSALS_BEFORE_NEW_CONSUMER refusals in a row, and the new member commits."""
    import logging

    from services.refscore import worker as worker_mod

    make = FirstConsumerStuck(worker_mod.make_consumer)
    monkeypatch.setattr(worker_mod, "make_consumer", make)
    caplog.set_level(logging.INFO, logger="services.refscore.worker")
    pairs = make_pairs(6, unique)
    with _worker_thread(stack, tiny_model, unique, "rebal", pairs) as (kafka, group, _):
        _wait(
            lambda: _committed_all(kafka, group, kafka.pairs_topic),
            120,
            "the worker committing every pair after its first consumer refused every commit",
        )
    messages = [r.getMessage() for r in caplog.records]
    assert make.refusals == GROUP_REFUSALS_BEFORE_NEW_CONSUMER
    assert len(make.consumers) == 2, "the stuck consumer was not replaced exactly once"
    assert sum(m.startswith("offset commit refused by a group rebalance") for m in messages) == make.refusals, messages
    assert any("replacing the Kafka consumer" in m for m in messages), messages
    assert not any("batch failed" in m for m in messages), "a rebalance was treated as an outage (backoff)"
    events = [records_pb2.ShardReady.FromString(r.value) for r in read_topic(kafka, kafka.shards_topic, idle_s=0.5)]
    assert sorted({pid for e in events for pid in e.pair_ids}) == sorted(p.pair_id for p in pairs)


def test_worker_keeps_trying_when_kafka_is_unreachable_at_start(stack, tiny_model, unique, monkeypatch):
    """A consumer that cannot be made (broker not up yet: kafka-python raises KafkaTimeoutError after
    30 s) is retried with backoff; the worker thread does not die and then scores everything."""
    from kafka.errors import KafkaTimeoutError

    from services.refscore import worker as worker_mod

    attempts = []
    real = worker_mod.make_consumer

    def make(*args, **kwargs):
        attempts.append(1)
        if len(attempts) <= 2:
            raise KafkaTimeoutError("injected: Failed to update metadata after 30.0 secs")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_mod, "make_consumer", make)
    with _worker_thread(stack, tiny_model, unique, "late", make_pairs(4, unique)) as (kafka, group, thread):
        _wait(
            lambda: _committed_all(kafka, group, kafka.pairs_topic),
            120,
            "the worker scoring every pair after two failed starts",
        )
        assert thread.is_alive()
    assert len(attempts) == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_serve_exits_1_when_its_stream_worker_thread_dies(tiny_model, monkeypatch, caplog):
    """`serve --worker` must not go on serving gRPC with its stream dead: Kubernetes restarts a
    container that exits, not one that stays up (the worker retries outages itself; this is the net
    for anything else)."""
    import asyncio

    from services.refscore import __main__ as entry
    from services.refscore.config import RefscoreConfig

    class DyingWorker:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, stop):
            raise RuntimeError("injected: the stream worker crashed")

    monkeypatch.setattr(entry, "StreamWorker", DyingWorker)
    cfg = RefscoreConfig(
        model_dir=str(tiny_model),
        engine="transformers",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_model_len=512,
        plaintext=True,
        allow_anonymous=True,
        grace_s=2,
    )
    assert asyncio.run(asyncio.wait_for(entry._serve(cfg, with_worker=True), 60)) == 1
    assert any("stream worker stopped unexpectedly" in r.getMessage() for r in caplog.records)
