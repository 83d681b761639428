"""Fault cases on the shared session stack: refscore worker killed, trainer killed, duplicate
delivery, malformed input on every topic the services read. Each case counts pairs in -> trained."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from offdpo import records
from offdpo.kafka import read_topic
from offdpo.v1 import records_pb2
from tests.pairs import make_pairs

from .harness import REPO

pytestmark = [pytest.mark.faults, pytest.mark.stack]

SAMPLES = REPO / "services" / "labeler" / "samples"


def _wait_exit(proc, timeout_s: float, what: str) -> int:
    try:
        return proc.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise TimeoutError(f"{what} did not exit within {timeout_s} s\n{proc.tail()}") from None


def _shard_events(case) -> list[records_pb2.ShardReady]:
    out = []
    for r in read_topic(case.kafka, case.kafka.shards_topic, idle_s=1.0):
        try:
            out.append(records.decode(records_pb2.ShardReady, r.value, 1 << 23, "event"))
        except records.RecordError:
            pass
    return out


def test_refscore_worker_killed_between_s3_write_and_commit(stack, make_case, fault_results):
    """SIGKILL after the shard write (failpoint after_shard_write), then again on the redo between the
    shard-ready events and the commit (before_commit); a third worker finishes. No row is written twice,
    every shard is announced, every pair is trained once."""
    case = make_case("refscore_kill", stack)
    case.produce_pairs(make_pairs(48, case.run_name))
    first = case.start_worker({"OFFDPO_REFSCORE_FAILPOINT": "after_shard_write"}, name="refscore-crash1")
    assert _wait_exit(first, 120, "the after_shard_write failpoint") == -9, first.tail()
    pre_crash = case.shard_keys()
    assert len(pre_crash) == 1, f"one shard written before the first crash, got {pre_crash}"
    assert not case.committed_all(case.refscore_group, case.kafka.pairs_topic)
    second = case.start_worker({"OFFDPO_REFSCORE_FAILPOINT": "before_commit"}, name="refscore-crash2")
    assert _wait_exit(second, 120, "the before_commit failpoint") == -9, second.tail()
    case.events.append(
        "refscore SIGKILLed after S3 write (exit -9), restarted, SIGKILLed before commit (exit -9), restarted"
    )
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker)
    case.run_trainer()
    rc = worker.stop()
    assert "already written by an earlier attempt" in second.tail(10**6) + worker.tail(10**6), (
        "a redo re-announced a shard written before a crash instead of rewriting it"
    )
    case.events.append(f"final refscore stopped by SIGTERM with exit {rc}; trainer exit 0")
    events = _shard_events(case)
    keys = set(case.shard_keys())
    assert {e.object_key for e in events} == keys, "every shard announced, no event for a shard that does not exist"
    assert set(pre_crash) <= keys, "the pre-crash shard is kept under its key"
    row = case.verify(services_ok=rc == 0, extra={"shards": len(keys), "shard_events": len(events)})
    fault_results.add(row)


def test_trainer_killed_mid_epoch_resumes_from_checkpoint(stack, make_case, fault_results):
    case = make_case("trainer_kill", stack)
    case.produce_pairs(make_pairs(40, case.run_name))
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker)
    # 40 pairs / 8 per step = 5 steps; checkpoint every 2; SIGKILL right after step 3 (step 3 is lost).
    killed = case.run_trainer("--fault-kill-after-step", "3", expect_rc=-9)
    partial = [
        json.loads(line)["step"]
        for line in (case.trainer_log_dir / case.run_name / "trained_pairs.jsonl").read_text().splitlines()
    ]
    assert partial == [1, 2, 3], f"the killed run logged steps {partial}"
    case.events.append(f"trainer SIGKILLed after step 3 (exit {killed.proc.returncode}), resumed from step 2")
    resumed = case.run_trainer()
    assert "resumed from" in resumed.tail(200000), resumed.tail()
    rc = worker.stop()
    case.events.append(f"resumed trainer exit 0; refscore SIGTERM exit {rc}")
    row = case.verify(services_ok=rc == 0)
    fault_results.add(row)


def test_trainer_sigterm_checkpoints_where_it_stopped_and_resumes_there(stack, make_case, fault_results):
    """A preempted trainer (SIGTERM, as Kubernetes sends it) saves a checkpoint at the step it reached
    and exits 143; without that it would lose everything since the last periodic checkpoint (none
    here: --save-every 1000). The rerun resumes at that step and trains only what came after."""
    import signal

    from services.trainer import checkpoint as ckpt

    from .harness import wait_for

    case = make_case("trainer_sigterm", stack)
    case.produce_pairs(make_pairs(40, case.run_name + "-a"))
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker)
    trainer = case.start_trainer("--save-every", "1000", idle_s=300)
    # 40 pairs / 8 per step: 5 steps, then it waits for more shards (up to 300 s idle) when SIGTERM comes.
    wait_for(lambda: len(case.trained_ids()) == 40, 180, "the trainer training the first 40 pairs", trainer.tail)
    assert ckpt.latest_checkpoint(case.store, case.run_name) is None, "a periodic checkpoint was saved"
    trainer.proc.send_signal(signal.SIGTERM)
    try:
        rc = trainer.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the trainer did not stop within 60 s of SIGTERM\n{trainer.tail()}") from None
    assert rc == 128 + signal.SIGTERM, f"exit {rc}\n{trainer.tail()}"
    prefix = ckpt.latest_checkpoint(case.store, case.run_name)
    assert prefix and prefix.endswith("step-00000005"), f"checkpoint after SIGTERM: {prefix}\n{trainer.tail()}"
    assert case.committed_all(case.trainer_group, case.kafka.shards_topic), "SIGTERM's checkpoint did not commit"
    case.events.append(f"trainer SIGTERMed while waiting for shards after step 5: exit {rc}, checkpoint at step 5")

    case.produce_pairs(make_pairs(40, case.run_name + "-b"))
    case.wait_scored(worker)
    resumed = case.run_trainer()
    log_text = resumed.tail(200000)
    assert f"resumed from {prefix} at step 5" in log_text, log_text[-3000:]
    steps = [
        json.loads(line)["step"]
        for line in (case.trainer_log_dir / case.run_name / "trained_pairs.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 11)), f"steps logged: {steps}"
    rc = worker.stop()
    case.events.append(f"resumed trainer exit 0 after steps 6-10; refscore SIGTERM exit {rc}")
    fault_results.add(case.verify(services_ok=rc == 0))


def test_duplicate_delivery_trains_each_pair_once(stack, make_case, fault_results):
    """The same pair records produced twice (a producer retry / replay), and every shard-ready event
    re-delivered too: each pair trained exactly once."""
    case = make_case("duplicate_delivery", stack)
    pairs = make_pairs(30, case.run_name)
    case.produce_pairs(pairs)
    case.produce_pairs(pairs)  # the same records again
    # Same content, different provenance: the same pair id (identity by content).
    relabelled = [
        records.make_pair(
            p.prompt,
            p.chosen,
            p.rejected,
            records_pb2.Provenance(strategy=records_pb2.LABEL_STRATEGY_HUMAN, source="again"),
        )
        for p in pairs[:10]
    ]
    case.produce_pairs(relabelled)
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker)
    events = read_topic(case.kafka, case.kafka.shards_topic, idle_s=1.0)
    case.produce(case.kafka.shards_topic, [(r.key, r.value) for r in events])  # every event delivered twice
    case.run_trainer()
    rc = worker.stop()
    case.events.append(f"refscore SIGTERM exit {rc}; trainer exit 0")
    scored = case.scored_rows()
    row = case.verify(
        services_ok=rc == 0,
        extra={
            "scored_rows": len(scored),
            "shard_events": 2 * len(events),
            "note": "refscore scores each delivered copy (one row per record); the trainer dedups by pair_id",
        },
        check_scored_unique=False,
    )
    fault_results.add(row)


# -- malformed input on every topic ---------------------------------------------------------------
def _bad_pair_records(tag: str):
    rng = random.Random(tag)
    good = make_pairs(1, f"bad-{tag}")[0].SerializeToString()
    too_long = records.make_pair(records.text_prompt(f"q {tag}"), "number " * 3000, "short")
    wrong_id = records_pb2.PreferencePair()
    wrong_id.CopyFrom(make_pairs(1, f"wrongid-{tag}")[0])
    wrong_id.pair_id = "0" * 32
    same = records.make_pair(records.text_prompt(f"same {tag}"), "x", "x")
    return [
        (b"garbage", b"\x00\x01 not protobuf \xff\xfe"),
        (b"truncated", good[: len(good) // 2]),
        (b"empty", b""),
        (b"tombstone", None),  # a null value
        (b"wrong-type", records_pb2.DeadLetter(reason="x", offset=3).SerializeToString()),
        (b"random-1", bytes(rng.randrange(256) for _ in range(200))),
        (b"random-2", bytes(rng.randrange(256) for _ in range(3000))),
        (b"oversized", b"\x0a" + b"\xff" * (5 * 1024 * 1024)),
        (b"wrong-id", wrong_id.SerializeToString()),
        (b"identical-answers", same.SerializeToString()),
        (b"too-long", too_long.SerializeToString()),
    ]


def _bad_shard_events(case, tag: str, fp: records_pb2.ReferenceFingerprint):
    rng = random.Random(tag)
    missing = records_pb2.ShardReady(
        bucket=case.store.bucket, object_key=f"scores/none/{tag}/missing.parquet", row_count=1, pair_ids=["x"]
    )
    corrupt_key = f"scores/corrupt/{tag}/p0000-000000000000-000000000001.parquet"
    case.store.put_bytes(corrupt_key, b"PAR1 this is not parquet PAR1")
    corrupt = records_pb2.ShardReady(bucket=case.store.bucket, object_key=corrupt_key, row_count=2, pair_ids=["a", "b"])
    other_fp = records_pb2.ReferenceFingerprint()
    other_fp.CopyFrom(fp)
    other_fp.weights_hash = "someone-else's-weights"
    other_fp.fingerprint_id = records.fingerprint_id(other_fp)
    mismatch = records_pb2.ShardReady(
        bucket=case.store.bucket,
        object_key=f"scores/{other_fp.fingerprint_id}/x.parquet",
        row_count=1,
        pair_ids=["y"],
        fingerprint=other_fp,
    )
    good = missing.SerializeToString()
    return [
        (b"garbage", b"\xff\xfe\xfd not a ShardReady"),
        (b"truncated", good[: len(good) // 2]),
        (b"empty", b""),
        (b"random", bytes(rng.randrange(256) for _ in range(500))),
        (b"wrong-type", records_pb2.DeadLetter(reason="y", offset=9).SerializeToString()),
        (b"missing-object", missing.SerializeToString()),
        (b"corrupt-object", corrupt.SerializeToString()),
        (b"fingerprint-mismatch", mismatch.SerializeToString()),
    ]


def test_malformed_records_on_every_topic_are_dead_lettered_and_good_ones_trained(
    stack, make_case, fault_results, tmp_path
):
    from services.labeler import inputs
    from services.labeler.config import LabelerConfig
    from services.labeler.runner import build_labeler, close_labeler, run_kafka

    case = make_case("malformed_input", stack)
    tag = case.run_name
    # 1. candidates topic: the sample candidate sets that parse, plus garbage; the labeler (in-process) reads it.
    good_sets, bad_sets = [], []
    for line in (SAMPLES / "candidates.jsonl").read_text().splitlines():
        try:
            cs = inputs.candidate_set_from_json(json.loads(line))
        except (ValueError, records.RecordError):
            continue  # not JSON / not a candidate set: the file path is covered by the labeler's own tests
        try:
            inputs.validate_candidate_set(cs, max_answers=16)
            good_sets.append(cs.SerializeToString())
        except records.RecordError:
            bad_sets.append(cs.SerializeToString())
    rng = random.Random(tag)
    garbage = [
        b"\xff\xff\xff garbage",
        good_sets[0][: len(good_sets[0]) // 2],
        b"",
        bytes(rng.randrange(256) for _ in range(400)),
        records_pb2.DeadLetter(reason="z").SerializeToString(),
    ] + bad_sets
    case.produce(case.kafka.candidates_topic, [(b"set", v) for v in good_sets])
    case.produce(case.kafka.candidates_topic, [(b"bad", v) for v in garbage], invalid=True)
    lcfg = LabelerConfig.from_env(
        case.env,
        state_dir=str(tmp_path / "labeler"),
        rules_file=str(SAMPLES / "rules.yaml"),
        group_id=f"f-{tag}-labeler",
        ledger=False,
    )
    labeler = build_labeler(lcfg, case.kafka)
    try:
        summary = run_kafka(labeler, case.kafka, "rules", idle_exit_s=4)
    finally:
        close_labeler(labeler)
    labelled = [records.decode_pair(r.value) for r in read_topic(case.kafka, case.kafka.pairs_topic, idle_s=1.0)]
    assert labelled, f"the labeler published no pairs: {summary}"
    case.valid_ids |= {p.pair_id for p in labelled}
    case.events.append(f"labeler run_kafka returned ({sum(v['pairs'] for v in summary.values())} pairs)")

    # 2. pairs topic: good pairs and every kind of bad record.
    case.produce_pairs(make_pairs(24, tag))
    case.produce(case.kafka.pairs_topic, _bad_pair_records(tag), invalid=True)
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker)

    # 3. shard-ready topic: garbage next to refscore's real events; the trainer reads it.
    from services.trainer.train import TrainerConfig, expected_fingerprint

    fp = expected_fingerprint(TrainerConfig(model=str(case.model_dir)))
    case.produce(case.kafka.shards_topic, _bad_shard_events(case, tag, fp), invalid=True)
    case.run_trainer()
    rc = worker.stop()
    case.events.append(f"refscore SIGTERM exit {rc}; trainer exit 0")
    row = case.verify(services_ok=rc == 0)
    by_service = {k.split("/")[0] for k in row["dead_letters"]}
    assert by_service == {"labeler", "refscore", "trainer"}, row["dead_letters"]
    fault_results.add(row)
