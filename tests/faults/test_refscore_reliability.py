"""Fault cases of refscore's reliability, each counting pairs in -> scored -> trained from Kafka and S3:

- oversized_record: a 12 MiB record (the broker takes up to 16 MiB) followed by good records on the same
  partition, on the pairs topic (refscore's worker) and on the candidates topic (the labeler's consume):
  the big ones are dead-lettered by reference, the partition moves on, the good ones are scored;
- topic_recreated: the pairs topic deleted and created again while S3 keeps the old incarnation's
  shards: new pairs at the same offsets are scored, not skipped;
- engine_thread_killed: the engine thread dies in `serve --worker`, then (a second process) hangs in an
  engine call; the watchdog ends each process with exit 1, and a restarted one completes the work;
- replica_paused: two refscore replicas in one consumer group, one SIGSTOPped past max.poll.interval and
  then resumed: every pair trained once, overlapping rows in S3 counted.
Plus a check that the size limits of the deploy manifests and of the Kafka clients agree.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from kafka import KafkaAdminClient

from localdev.process import free_port
from offdpo import kafka as okafka
from offdpo import records
from offdpo.kafka import ensure_topics, make_producer, read_topic
from tests.pairs import make_pairs

from .harness import REPO, wait_for

BIG = 12 * 1024 * 1024
SAMPLES = REPO / "services" / "labeler" / "samples"


def _produce_on(case, topic: str, items: list[tuple[bytes | None, bytes]], partition: int, valid_ids=(), invalid=()):
    """Produce `items` in order onto one partition with a producer allowed the broker's largest record;
    `invalid` holds the indexes of the items that must be dead-lettered."""
    producer = make_producer(case.kafka, f"faults-{case.name}", max_request_size=okafka.BROKER_MAX_MESSAGE_BYTES)
    try:
        futures = [producer.send(topic, key=k, value=v, partition=partition) for k, v in items]
        producer.flush(timeout=120)
        metas = [f.get(timeout=120) for f in futures]
    finally:
        producer.close(timeout=10)
    case.produced += len(items)
    case.valid_ids |= set(valid_ids)
    case.invalid += [(m.topic, m.partition, m.offset) for i, m in enumerate(metas) if i in set(invalid)]
    return metas


def _big_value(tag: str) -> bytes:
    return b"\x0a" + hashlib.sha256(tag.encode()).digest() * (BIG // 32)


def _wait_exit(proc, timeout_s: float, what: str) -> int:
    try:
        return proc.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise TimeoutError(f"{what} did not exit within {timeout_s} s\n{proc.tail()}") from None


# -- size limits ------------------------------------------------------------------------------------
def test_size_limits_of_the_broker_the_topics_and_the_clients_agree():
    """The broker's largest record (deploy: message.max.bytes), the topics' (max.message.bytes) and
    what a consumer fetches from one partition are the same size, so any record the broker accepts
    reaches the services (which dead-letter it by reference when it is over their own limits); our
    producers send at most MAX_RECORD_BYTES, under it, and a dead letter always fits that."""
    strimzi = REPO / "deploy/components/kafka-strimzi"
    kafka = [d for d in yaml.safe_load_all((strimzi / "kafka.yaml").read_text()) if d]
    broker = next(d for d in kafka if d["kind"] == "Kafka")["spec"]["kafka"]["config"]["message.max.bytes"]
    topics = [d for d in yaml.safe_load_all((strimzi / "generated/kafka-topics.yaml").read_text()) if d]
    assert topics and {int(t["spec"]["config"]["max.message.bytes"]) for t in topics} == {int(broker)}
    assert int(broker) == okafka.BROKER_MAX_MESSAGE_BYTES
    consumer = okafka.consumer_size_settings()
    assert consumer["max_partition_fetch_bytes"] == okafka.BROKER_MAX_MESSAGE_BYTES
    assert consumer["fetch_max_bytes"] >= okafka.BROKER_MAX_MESSAGE_BYTES
    assert okafka.MAX_RECORD_BYTES <= okafka.BROKER_MAX_MESSAGE_BYTES
    assert okafka.DEAD_LETTER_INLINE_BYTES < okafka.MAX_RECORD_BYTES
    docs = (REPO / "deploy/README.md").read_text()
    assert "## Record size limits" in docs and "16 MiB" in docs


# -- 12 MiB records -----------------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.stack
def test_a_12_mib_record_is_dead_lettered_by_reference_and_its_partition_moves_on(
    stack, make_case, fault_results, tmp_path
):
    from services.labeler import inputs
    from services.labeler.config import LabelerConfig
    from services.labeler.runner import build_labeler, close_labeler, run_kafka

    case = make_case("oversized_record", stack)
    tag = case.run_name

    # 1. candidates topic, one partition: good sets, a 12 MiB record, more good sets; the labeler reads it.
    good_sets = []
    for line in (SAMPLES / "candidates.jsonl").read_text().splitlines():
        try:
            cs = inputs.candidate_set_from_json(json.loads(line))
            inputs.validate_candidate_set(cs, max_answers=16)
        except (ValueError, records.RecordError):
            continue
        good_sets.append(cs.SerializeToString())
    half = len(good_sets) // 2
    big_cands = _big_value(tag + "-cands")
    items = [(b"set", v) for v in good_sets[:half]] + [(b"big", big_cands)] + [(b"set", v) for v in good_sets[half:]]
    _produce_on(case, case.kafka.candidates_topic, items, partition=0, invalid=[half])
    group = f"f-{tag}-labeler"
    lcfg = LabelerConfig.from_env(
        case.env,
        state_dir=str(tmp_path / "labeler"),
        rules_file=str(SAMPLES / "rules.yaml"),
        group_id=group,
        ledger=False,
    )
    labeler = build_labeler(lcfg, case.kafka)
    try:
        summary = run_kafka(labeler, case.kafka, "rules", idle_exit_s=6)
    finally:
        close_labeler(labeler)
    assert case.committed(group, case.kafka.candidates_topic)[0] == len(items), "the labeler moved past the big record"
    assert summary["total"]["inputs"] == len(items), summary
    labelled = [records.decode_pair(r.value) for r in read_topic(case.kafka, case.kafka.pairs_topic, idle_s=1.0)]
    assert labelled, summary
    case.valid_ids |= {p.pair_id for p in labelled}
    case.events.append(f"labeler consume: {len(items)} candidate records incl. 12 MiB, committed all")

    # 2. pairs topic, one partition: good pairs, a 12 MiB record, more good pairs; refscore's worker reads it.
    before, after = make_pairs(8, tag + "-before"), make_pairs(8, tag + "-after")
    big_pair = _big_value(tag + "-pairs")
    pair_items = (
        [(p.pair_id.encode(), p.SerializeToString()) for p in before]
        + [(b"big", big_pair)]
        + [(p.pair_id.encode(), p.SerializeToString()) for p in after]
    )
    _produce_on(
        case,
        case.kafka.pairs_topic,
        pair_items,
        partition=1,
        valid_ids=[p.pair_id for p in before + after],
        invalid=[len(before)],
    )
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker, timeout_s=240)
    case.run_trainer()
    rc = worker.stop()
    case.events.append(f"refscore scored past the 12 MiB record, SIGTERM exit {rc}; trainer exit 0")

    letters = {(dl.topic, dl.offset): dl for dl in case.dead_letters()}
    for topic, big in ((case.kafka.candidates_topic, big_cands), (case.kafka.pairs_topic, big_pair)):
        (dl,) = [d for (t, _), d in letters.items() if t == topic and d.original_truncated]
        assert dl.original_size == len(big) and dl.original_sha256 == hashlib.sha256(big).hexdigest()
        assert dl.original_value == big[:1024] and dl.error_type == "too_large", dl.error_type
    row = case.verify(services_ok=rc == 0, extra={"big_record_bytes": BIG})
    fault_results.add(row)


# -- a recreated topic ----------------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.stack
def test_a_recreated_pairs_topic_is_scored_not_skipped(stack, make_case, fault_results):
    case = make_case("topic_recreated", stack)
    old = make_pairs(24, case.run_name + "-old")
    case.produce_pairs(old)
    worker = case.start_worker(name="refscore-old")
    case.wait_scored(worker)
    rc_old = worker.stop()
    old_keys = set(case.shard_keys())
    assert old_keys and all("/id-" in k for k in old_keys), old_keys

    admin = KafkaAdminClient(**case.kafka.client_kwargs(), client_id="faults-admin")
    try:
        admin.delete_topics([case.kafka.pairs_topic])
    finally:
        admin.close()
    wait_for(
        lambda: case.kafka.pairs_topic not in set(KafkaAdminClient(**case.kafka.client_kwargs()).list_topics()),
        60,
        "the pairs topic deleted",
    )
    ensure_topics(case.kafka, [case.kafka.pairs_topic], 3)
    case.events.append(f"refscore stopped (exit {rc_old}); pairs topic deleted and created again, old shards kept")

    new = make_pairs(24, case.run_name + "-new")  # same offsets 0..N as the old incarnation's
    case.produce_pairs(new)
    worker = case.start_worker(name="refscore-new")
    case.wait_scored(worker)
    case.run_trainer()
    rc = worker.stop()
    new_keys = set(case.shard_keys()) - old_keys
    old_ids = {k.split("/")[3] for k in old_keys}
    assert new_keys and not {k.split("/")[3] for k in new_keys} & old_ids, "the new incarnation has its own keys"
    assert "already written by an earlier attempt" not in worker.tail(10**6), "a new pair was skipped as written"
    scored_new = {pid for k in new_keys for pid in records.read_shard(case.store.get_bytes(k), k).pair_ids}
    assert scored_new == {p.pair_id for p in new}
    case.events.append(f"new incarnation scored into {len(new_keys)} new shards; refscore exit {rc}; trainer exit 0")
    fault_results.add(case.verify(services_ok=rc == 0 and rc_old == 0, extra={"old_shards": len(old_keys)}))


# -- the engine thread dies ---------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.stack
def test_engine_thread_killed_exits_non_zero_and_a_restart_completes_the_work(stack, make_case, fault_results):
    case = make_case("engine_thread_killed", stack)
    case.produce_pairs(make_pairs(32, case.run_name))
    env = {
        **case.env,
        "OFFDPO_REFSCORE_MODEL_DIR": str(case.model_dir),
        "OFFDPO_REFSCORE_ENGINE": "transformers",
        "OFFDPO_REFSCORE_METRICS_PORT": "0",
        "OFFDPO_REFSCORE_PORT": str(free_port()),
        "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
        "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.3",
        "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
        "OFFDPO_REFSCORE_GRACE_S": "10",
        "OFFDPO_REFSCORE_PLAINTEXT": "true",
        "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
        "OFFDPO_REFSCORE_FAILPOINT": "engine_thread_dies",
    }
    dying = case._spawn("refscore-serve", [sys.executable, "-m", "services.refscore", "serve", "--worker"], env)
    rc_dead = _wait_exit(dying, 180, "refscore serve --worker after its engine thread died")
    log_text = dying.tail(10**6)
    assert rc_dead == 1, log_text[-3000:]
    assert "the engine thread died" in log_text and "stopping with exit 1" in log_text, log_text[-3000:]
    assert not case.shard_keys(), "nothing was scored by the process whose engine died"
    case.events.append("engine thread killed in serve --worker: watchdog, NOT_SERVING, exit 1")

    # The engine stops making progress (one call never returns): the watchdog ends it the same way.
    hung_env = {**env, "OFFDPO_REFSCORE_FAILPOINT": "engine_hangs", "OFFDPO_REFSCORE_STALL_S": "8"}
    hung_env["OFFDPO_REFSCORE_PORT"] = str(free_port())
    hung = case._spawn(
        "refscore-serve-hung", [sys.executable, "-m", "services.refscore", "serve", "--worker"], hung_env
    )
    rc_hung = _wait_exit(hung, 180, "refscore serve --worker with a hung engine")
    log_text = hung.tail(10**6)
    assert rc_hung == 1, log_text[-3000:]
    assert "inside one call for" in log_text and "without an orderly stop" in log_text, log_text[-3000:]
    assert not case.shard_keys()
    case.events.append("engine hung in serve --worker: watchdog after 8 s, exit 1")

    worker = case.start_worker(name="refscore-restarted")
    case.wait_scored(worker)
    case.run_trainer()
    rc = worker.stop()
    case.events.append(f"restarted refscore completed the work, SIGTERM exit {rc}; trainer exit 0")
    fault_results.add(
        case.verify(services_ok=rc == 0 and rc_dead == 1 and rc_hung == 1, extra={"exits": [rc_dead, rc_hung]})
    )


# -- two replicas, one paused -------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.stack
def test_two_replicas_one_paused_past_max_poll_interval_train_every_pair_once(stack, make_case, fault_results):
    case = make_case("replica_paused", stack)
    replica_env = {
        "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "8000",
        "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "OFFDPO_REFSCORE_BATCH_PAIRS": "8",
    }
    case.produce_pairs(make_pairs(48, case.run_name + "-a"))
    replicas = [case.start_worker(replica_env, name=f"refscore-{n}") for n in ("a", "b")]
    paused_s = 15.0  # past max.poll.interval (8 s) and the session timeout (6 s)
    # Pause a replica that is working (it has written a shard), so it is likely mid-batch when stopped.
    a = wait_for(
        lambda: next((r for r in replicas if "wrote scores/" in r.tail(10**6)), None),
        180,
        "a replica writing its first shard",
        case.diag,
    )
    b = next(r for r in replicas if r is not a)
    try:
        a.proc.send_signal(signal.SIGSTOP)
        case.produce_pairs(make_pairs(48, case.run_name + "-b"))
        time.sleep(paused_s)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    case.events.append(
        f"two replicas in one group; {a.name} SIGSTOPped {paused_s:.0f} s (max.poll.interval 8 s), resumed"
    )
    case.produce_pairs(make_pairs(24, case.run_name + "-c"))
    case.wait_scored(b, timeout_s=300)
    assert a.alive, f"the paused replica survived its eviction\n{a.tail()}"
    case.run_trainer()
    rc_a, rc_b = a.stop(), b.stop()
    scored = case.scored_rows()
    overlapping = len(scored) - len(set(scored))
    fenced = a.tail(10**6).count("commit refused by a group rebalance")
    case.events.append(
        f"replicas SIGTERM exit {rc_a}/{rc_b}; {overlapping} overlapping rows in S3; "
        f"{fenced} commits of the resumed replica refused; trainer exit 0"
    )
    row = case.verify(
        services_ok=rc_a == 0 and rc_b == 0,
        extra={"overlapping_rows": overlapping, "resumed_replica_refusals": fenced},
        check_scored_unique=False,
    )
    fault_results.add(row)
