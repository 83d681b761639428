"""The local stack's real parts through the same clients the services use: kafka-python and minio."""

import dataclasses
import time

import pytest
from kafka import TopicPartition
from minio.error import S3Error

from offdpo.kafka import ensure_topics, make_consumer, make_producer, read_topic
from offdpo.s3 import ObjectStore, make_minio_client

pytestmark = pytest.mark.stack


def test_keyed_records_spread_across_partitions_and_keep_key_affinity(stack, unique):
    topic = f"test.keys.{unique}"
    ensure_topics(stack.kafka, [topic], partitions=3)
    producer = make_producer(stack.kafka, "test")
    sent = {}
    for i in range(60):
        key = f"key-{i % 12}".encode()
        meta = producer.send(topic, key=key, value=f"value-{i}".encode()).get(timeout=30)
        sent.setdefault(key, set()).add(meta.partition)
    producer.close()
    assert all(len(parts) == 1 for parts in sent.values()), "a key must always land on one partition"
    records = read_topic(stack.kafka, topic)
    assert len(records) == 60
    assert {r.partition for r in records} == {0, 1, 2}
    for key, parts in sent.items():
        assert {r.partition for r in records if r.key == key} == parts


def test_consumer_group_reads_everything_and_resumes_from_committed_offsets(stack, unique):
    topic = f"test.group.{unique}"
    ensure_topics(stack.kafka, [topic], partitions=3)
    producer = make_producer(stack.kafka, "test")
    for i in range(30):
        producer.send(topic, key=str(i).encode(), value=str(i).encode())
    producer.flush()

    def consume_some(limit):
        consumer = make_consumer(stack.kafka, f"group-{unique}", [topic])
        got = []
        deadline = time.monotonic() + 60
        while len(got) < limit and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500, max_records=limit - len(got)).values():
                got.extend(recs)
        consumer.commit()
        consumer.close()
        return got

    first = consume_some(30)
    assert sorted(int(r.value) for r in first) == list(range(30))
    for i in range(30, 40):
        producer.send(topic, key=str(i).encode(), value=str(i).encode())
    producer.close()
    second = consume_some(10)
    assert sorted(int(r.value) for r in second) == list(range(30, 40)), "committed offsets were not honoured"


def test_s3_put_get_list(stack, unique):
    store = ObjectStore(stack.s3)
    keys = [f"test/{unique}/obj-{i}.bin" for i in range(5)]
    for i, key in enumerate(keys):
        store.put_bytes(key, bytes([i]) * (1000 + i))
    assert store.list_keys(f"test/{unique}/") == sorted(keys)
    assert store.get_bytes(keys[3]) == bytes([3]) * 1003
    assert store.exists(keys[0]) and not store.exists(f"test/{unique}/missing")
    with pytest.raises(ValueError, match="over the limit"):
        store.get_bytes(keys[4], max_bytes=10)


def test_s3_rejects_wrong_credentials(stack):
    wrong = dataclasses.replace(stack.s3, secret_key="not-the-secret")
    with pytest.raises(S3Error) as info:
        make_minio_client(wrong).list_buckets()
    assert info.value.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")
    unknown = dataclasses.replace(stack.s3, access_key="nobody", secret_key="nothing")
    with pytest.raises(S3Error):
        make_minio_client(unknown).list_buckets()


def test_acknowledged_records_survive_a_broker_kill(stack, unique):
    topic = f"test.durable.{unique}"
    ensure_topics(stack.kafka, [topic], partitions=3)
    producer = make_producer(stack.kafka, "test")
    n = 300
    futures = [producer.send(topic, key=str(i).encode(), value=f"r{i}".encode()) for i in range(n)]
    producer.flush()
    # acks=all: each is acknowledged at its own offset (get() raises for one that was not)
    acked = {(meta.partition, meta.offset) for meta in (f.get(timeout=30) for f in futures)}
    assert len(acked) == n and all(offset >= 0 for _, offset in acked)
    producer.close()

    stack.kill_broker()  # SIGKILL: no clean shutdown
    assert not stack.status()["kafka"]
    stack.start_broker()

    records = read_topic(stack.kafka, topic, timeout_s=60)
    assert sorted(r.value.decode() for r in records) == sorted(f"r{i}" for i in range(n))
    assert {TopicPartition(topic, r.partition) for r in records} == {TopicPartition(topic, p) for p in range(3)}


def test_buckets_are_private_to_anonymous_requests(stack, unique):
    import urllib.error
    import urllib.request

    store = ObjectStore(stack.s3)
    key = f"test/{unique}/private.bin"
    store.put_bytes(key, b"secret shard")
    for url in (f"http://{stack.s3.endpoint}/{stack.s3.bucket}/{key}", f"http://{stack.s3.endpoint}/{stack.s3.bucket}"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)  # unsigned: no credentials
        assert info.value.code in (401, 403), f"{url} answered {info.value.code} to an anonymous request"
