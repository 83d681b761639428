"""The pairs archive (offdpo/archive.py) on the local stack: the pairs topic -> Parquet objects in S3 by
topic, partition and offset range; idempotent (a redo writes the same keys, never a second copy);
readable without Kafka."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from localdev.process import stop_process, wait_until
from offdpo import archive, records
from offdpo.kafka import ensure_topics, make_producer, next_offsets, read_topic
from offdpo.s3 import ObjectStore
from tests.pairs import make_pairs

REPO = Path(__file__).resolve().parents[1]
BAD = (b"garbage", b"\x00\x01 not a pair \xff")


def _topic(stack, unique, tag, pairs, partitions=2):
    kafka = dataclasses.replace(stack.kafka, pairs_topic=f"{tag}.pairs.{unique}")
    ensure_topics(stack.kafka, [kafka.pairs_topic], partitions=partitions)
    producer = make_producer(kafka, "test")
    for pair in pairs:
        producer.send(kafka.pairs_topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
    producer.send(kafka.pairs_topic, key=BAD[0], value=BAD[1])
    producer.flush()
    producer.close()
    return kafka


def _committed_all(kafka, group) -> bool:
    ends = next_offsets(read_topic(kafka, kafka.pairs_topic, idle_s=1.0))
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return bool(ends) and all((consumer.committed(tp) or 0) == end for tp, end in ends.items())
    finally:
        consumer.close()


def archive_topic(stack, kafka, group: str, batch_records: int = 8) -> archive.Archiver:
    """Run an Archiver in a thread until its group has committed the whole topic."""
    cfg = archive.ArchiveConfig(group_id=group, batch_records=batch_records, batch_wait_s=0.3)
    archiver = archive.Archiver(kafka, stack.s3, cfg)
    stop = threading.Event()
    thread = threading.Thread(target=archiver.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: _committed_all(kafka, group), 120, f"the archiver ({group}) committing every record")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the archiver did not stop"
    return archiver


def _archived(store, topic):
    keys = archive.list_archive(store, f"{archive.ARCHIVE_PREFIX}{topic}/")
    recs = [r for _, rs in archive.read_archive_keys(store, keys) for r in rs]
    return keys, recs


def test_archive_holds_every_record_once_by_partition_and_range_and_a_redo_writes_nothing_new(stack, unique):
    pairs = make_pairs(20, unique)
    kafka = _topic(stack, unique, "arch", pairs)
    store = ObjectStore(stack.s3)
    first = archive_topic(stack, kafka, f"arch-{unique}")
    keys, recs = _archived(store, kafka.pairs_topic)

    assert first.objects_written == len(keys) >= 2, "batches of 8 over 2 partitions: several objects"
    in_kafka = read_topic(kafka, kafka.pairs_topic, idle_s=1.0)
    assert sorted((r.partition, r.offset) for r in recs) == sorted((r.partition, r.offset) for r in in_kafka)
    assert sorted(r.pair_id for r in recs if r.pair_id) == sorted(p.pair_id for p in pairs)
    bad = [r for r in recs if not r.pair_id]
    assert [(r.key, r.value) for r in bad] == [BAD], "a record that is not a pair is archived as it was"
    with pytest.raises(records.RecordError):
        bad[0].pair()
    assert {r.pair().pair_id for r in recs if r.pair_id} == {p.pair_id for p in pairs}
    for k in keys:
        assert k.topic == kafka.pairs_topic and k.topic_id, "keys carry the topic's incarnation"
        assert k.key == archive.archive_key(k.topic, k.partition, k.first, k.last, topic_id=k.topic_id)
        offsets = [r.offset for r in archive.read_archive(store.get_bytes(k.key), k.key)]
        assert offsets == list(range(k.first, k.last + 1)), "one object covers one contiguous offset range"

    # A redo from offset 0 (a crash before any commit, or a new group): same keys, no new object.
    before = {k.key: store.get_bytes(k.key) for k in keys}
    redo = archive_topic(stack, kafka, f"arch-redo-{unique}", batch_records=5)
    assert redo.objects_written == 0
    keys_after, recs_after = _archived(store, kafka.pairs_topic)
    assert {k.key: store.get_bytes(k.key) for k in keys_after} == before
    assert len(recs_after) == len(recs)


def test_archiver_killed_between_write_and_commit_rewrites_nothing(stack, unique, tmp_path):
    """`python -m services.refscore archive` SIGKILLed after its first object, before the commit; the
    rerun (--until-idle) skips that object's range and archives the rest: every record exactly once."""
    pairs = make_pairs(12, unique)
    kafka = _topic(stack, unique, "archkill", pairs, partitions=1)
    env = {
        **__import__("os").environ,
        **stack.env(),
        "OFFDPO_TOPIC_PAIRS": kafka.pairs_topic,
        "OFFDPO_ARCHIVE_GROUP": f"archkill-{unique}",
        "OFFDPO_ARCHIVE_BATCH_RECORDS": "5",
        "OFFDPO_ARCHIVE_BATCH_WAIT_S": "0.5",
        "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "services.refscore", "archive", "--until-idle", "5"]
    log1 = tmp_path / "kill.log"
    proc = subprocess.Popen(
        cmd,
        env={**env, "OFFDPO_ARCHIVE_FAILPOINT": "after_write"},
        cwd=REPO,
        stdout=open(log1, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_process(proc)
    assert code == -9, f"the failpoint should SIGKILL the archiver; exit {code}\n{log1.read_text()[-3000:]}"
    store = ObjectStore(stack.s3)
    keys, _ = _archived(store, kafka.pairs_topic)
    assert len(keys) == 1 and not _committed_all(kafka, env["OFFDPO_ARCHIVE_GROUP"])
    first = store.get_bytes(keys[0].key)

    log2 = tmp_path / "rerun.log"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log2, "wb"), stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_process(proc)
    assert code == 0, log2.read_text()[-3000:]
    keys_after, recs = _archived(store, kafka.pairs_topic)
    assert keys[0] in keys_after and store.get_bytes(keys[0].key) == first, "the first object is kept as it was"
    assert sorted(r.offset for r in recs) == list(range(13)), "every record exactly once"
    assert _committed_all(kafka, env["OFFDPO_ARCHIVE_GROUP"])


def test_archive_object_is_deterministic_and_refuses_a_key_that_lies():
    class Rec:
        def __init__(self, offset, value):
            self.topic, self.partition, self.offset, self.timestamp = "t", 3, offset, 1000 + offset
            self.key, self.value = b"k", value

    pairs = make_pairs(3, "det")
    recs = [Rec(10 + i, p.SerializeToString()) for i, p in enumerate(pairs)]
    data = archive.records_to_parquet("t", "abc", recs)
    assert data == archive.records_to_parquet("t", "abc", recs), "the same records give the same bytes"
    key = archive.archive_key("t", 3, 10, 12, topic_id="abc")
    assert key == "archive/pairs/t/id-abc/p0003-000000000010-000000000012.parquet"
    assert [r.pair_id for r in archive.read_archive(data, key)] == [p.pair_id for p in pairs]
    with pytest.raises(archive.CorruptArchive, match="outside the range"):
        archive.read_archive(data, archive.archive_key("t", 3, 10, 11, topic_id="abc"))
    with pytest.raises(archive.CorruptArchive, match="not of the topic"):
        archive.read_archive(data, archive.archive_key("t", 3, 10, 12, topic_id="other"))
    with pytest.raises(archive.CorruptArchive, match="not a readable Parquet"):
        archive.read_archive(b"nope", key)
