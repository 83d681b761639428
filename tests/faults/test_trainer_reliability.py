"""The trainer under infrastructure faults and bad data (issue 17): S3 down longer than its retry
window while shards are read, S3 answering AccessDenied for a while, poisoned shards, and a kill
between the checkpoint write and the offset commit. Shards are written to S3 and announced on the
shard-ready topic directly (what refscore's worker does), so each case counts: pairs in (rows in
the shards) -> trained, trained twice, dead letters; 0 lost and 0 trained twice in every case."""

from __future__ import annotations

import json
import math
import random
import subprocess
import time

import pytest
import torch
from safetensors.torch import load

from localdev.stack import LocalStack
from offdpo import records
from offdpo.kafka import make_producer
from offdpo.v1 import records_pb2
from tests.pairs import make_pairs

from .harness import Case, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]


def _fingerprint(case: Case) -> records_pb2.ReferenceFingerprint:
    from services.trainer.train import TrainerConfig, expected_fingerprint

    return expected_fingerprint(TrainerConfig(model=str(case.model_dir)))


def _vocab(case: Case) -> int:
    return json.loads((case.model_dir / "config.json").read_text())["vocab_size"]


def _rows(case: Case, tag: str, n: int, fp) -> list[records_pb2.ScoredPair]:
    rng = random.Random(tag)
    rows = []
    for pair in make_pairs(n, f"{case.run_name}-{tag}"):
        c, r = [rng.randrange(100, 120) for _ in range(4)], [rng.randrange(300, 320) for _ in range(4)]
        lc, lr = [-rng.random() - 1 for _ in c], [-rng.random() - 1 for _ in r]
        rows.append(
            records_pb2.ScoredPair(
                pair=pair,
                fingerprint=fp,
                prompt_token_ids=[1, 500, 501],
                chosen_token_ids=c,
                rejected_token_ids=r,
                chosen_logprobs=lc,
                rejected_logprobs=lr,
                chosen_logprob_sum=sum(lc),
                rejected_logprob_sum=sum(lr),
            )
        )
    return rows


def _publish(
    case: Case, fp, shards: list[list[records_pb2.ScoredPair]], poisoned: set[str] = frozenset(), part: int = 0
) -> list:
    """Write each shard under the case's pairs topic (as refscore keys them, from pairs-topic partition
    `part`), announce it, and count its rows in; returns the events' (topic, partition, offset)."""
    producer = make_producer(case.kafka, f"faults-{case.name}")
    metas = []
    try:
        first = 0
        for rows in shards:
            key = records.shard_key(fp.fingerprint_id, case.kafka.pairs_topic, part, first, first + len(rows) - 1)
            first += len(rows)
            data = records.scored_pairs_to_parquet(rows, fp)
            case.store.put_bytes(key, data)
            event = records_pb2.ShardReady(
                bucket=case.store.bucket,
                object_key=key,
                row_count=len(rows),
                pair_ids=[r.pair.pair_id for r in rows],
                fingerprint=fp,
                sha256=records.sha256_hex(data),
            )
            metas.append(producer.send(case.kafka.shards_topic, key=key.encode(), value=event.SerializeToString()))
        producer.flush(timeout=60)
        metas = [m.get(timeout=60) for m in metas]
    finally:
        producer.close(timeout=10)
    for rows in shards:
        case.produced += len(rows)
        case.valid_ids |= {r.pair.pair_id for r in rows} - poisoned
    return [(m.topic, m.partition, m.offset) for m in metas]


def _wait(proc, timeout_s: float, what: str) -> int:
    try:
        return proc.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise TimeoutError(f"{what} did not exit within {timeout_s} s\n{proc.tail()}") from None


def _backoffs(log_text: str) -> list[str]:
    return [ln for ln in log_text.splitlines() if "infrastructure, not bad data" in ln]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """A stack of this module's own: stopping its S3 must not touch the session stack."""
    with LocalStack.for_tests(tmp_path_factory.mktemp("trainer-fault-stack")) as local:
        yield local


def test_s3_down_longer_than_the_retry_window_while_the_trainer_reads_shards(own_stack, make_case, fault_results):
    """S3 (and Tansu, which stores its log there) stopped for 15 s while the trainer works through a
    backlog, with the S3 client's own retry window cut to 2 s: every shard fetch or checkpoint upload
    that fails is an outage, retried with backoff until S3 is back; none is dead-lettered, none is
    skipped, and the trainer finishes without a restart."""
    case = make_case("trainer_s3_down", own_stack)
    fp = _fingerprint(case)
    rows = _rows(case, "a", 8 * 120, fp)
    _publish(case, fp, [rows[i : i + 8] for i in range(0, len(rows), 8)])
    case.env["OFFDPO_S3_RETRY_MAX_S"] = "2"
    # One event per poll and eight micro-batches per step: the trainer spends its time reading
    # shards and training (no periodic checkpoint), so the outage lands on shard fetches.
    args = ("--max-poll-records", "1", "--micro-batch-size", "1", "--save-every", "1000")
    trainer = case.start_trainer(*args, idle_s=25)
    wait_for(lambda: len(case.trained_ids()) >= 16, 180, "the trainer's first steps", trainer.tail)
    own_stack.stop_s3()
    time.sleep(15)
    own_stack.start_s3()
    if not own_stack.status()["kafka"]:
        own_stack.start_broker()
    case.events.append("SeaweedFS stopped 15 s (S3 retry window 2 s) while the trainer read shards, restarted")
    rc = _wait(trainer, 400, "the trainer after the S3 outage")
    log_text = trainer.tail(10**7)
    backoffs = _backoffs(log_text)
    assert rc == 0, f"the trainer rode out the outage without a restart\n{trainer.tail()}"
    assert backoffs, f"the outage was retried with a log line per backoff step\n{trainer.tail()}"
    waited_on = sorted(
        {"shard fetch" if "fetch shard" in b else "checkpoint" if "checkpoint" in b else "other" for b in backoffs}
    )
    assert "shard fetch" in waited_on, f"the outage hit no shard read: {backoffs}"
    case.events.append(f"trainer backed off {len(backoffs)} times ({', '.join(waited_on)}), exit 0, no restart")
    row = case.verify(services_ok=rc == 0, extra={"trainer_backoff_steps": len(backoffs), "waited_on": waited_on})
    assert row["dead_letters"] == {}, f"an outage was dead-lettered: {row['dead_letters']}"
    fault_results.add(row)


def test_s3_answering_access_denied_for_a_while(stack, make_case, fault_results):
    """Every shard read answers AccessDenied for 10 s (a credential rotation; injected with the
    trainer's test-only --fault-deny-shard-reads-s): not one of the four codes the S3 client retries,
    and before issue 17 a dead letter per shard. Now: backoff until reads succeed, everything trained."""
    case = make_case("trainer_s3_access_denied", stack)
    fp = _fingerprint(case)
    rows = _rows(case, "a", 48, fp)
    _publish(case, fp, [rows[i : i + 8] for i in range(0, len(rows), 8)])
    trainer = case.run_trainer("--fault-deny-shard-reads-s", "10", timeout_s=300)
    backoffs = [b for b in _backoffs(trainer.tail(10**7)) if "AccessDenied" in b]
    assert backoffs, trainer.tail()
    case.events.append(f"shard reads denied 10 s: {len(backoffs)} backoff steps, then trained; trainer exit 0")
    row = case.verify(services_ok=True, extra={"trainer_backoff_steps": len(backoffs)})
    assert row["dead_letters"] == {}, f"AccessDenied was dead-lettered: {row['dead_letters']}"
    fault_results.add(row)


def test_poisoned_shards_are_deadlettered_and_the_weights_stay_finite(stack, make_case, fault_results):
    """Three shards each carry two poisoned rows among good ones: a token id outside the vocabulary, a
    NaN and a -inf reference log-prob. The poisoned rows are dead-lettered with their pair ids, the
    good rows of the same shards train, and every weight of the checkpoint is finite."""
    case = make_case("trainer_poisoned_shards", stack)
    fp = _fingerprint(case)
    vocab = _vocab(case)
    good = [_rows(case, f"good{i}", 8, fp) for i in range(3)]
    poisoned_shards, poisoned_ids = [], set()
    for kind in ("oov", "nan", "ninf"):
        rows = _rows(case, kind, 8, fp)
        for r in rows[:2]:
            if kind == "oov":
                r.chosen_token_ids[1] = vocab + 5
            else:
                r.rejected_logprobs[0] = math.nan if kind == "nan" else -math.inf
            poisoned_ids.add(r.pair.pair_id)
        poisoned_shards.append(rows)
    _publish(case, fp, good)
    case.invalid += _publish(case, fp, poisoned_shards, poisoned=poisoned_ids, part=1)
    trainer = case.run_trainer(timeout_s=300)
    prefix = json.loads(case.store.get_bytes(f"runs/{case.run_name}/latest"))["prefix"]
    weights = load(case.store.get_bytes(f"{prefix}/model/model.safetensors"))
    nonfinite = [k for k, t in weights.items() if not torch.isfinite(t).all()]
    assert not nonfinite, f"non-finite weights in the checkpoint: {nonfinite}\n{trainer.tail()}"
    case.events.append(
        f"{len(poisoned_ids)} poisoned rows dead-lettered with their pair ids; checkpoint weights all finite; exit 0"
    )
    row = case.verify(services_ok=True)
    letters = case.dead_letters()
    assert set(row["dead_letters"]) == {"trainer/token_out_of_vocab", "trainer/poisoned_values"}, row["dead_letters"]
    reasons = " ".join(dl.reason for dl in letters)
    assert all(pid in reasons for pid in poisoned_ids), "every poisoned row's pair id is in a dead letter"
    assert not poisoned_ids & set(case.trained_ids())
    fault_results.add({**row, "poisoned_rows": len(poisoned_ids), "checkpoint_weights_finite": True})


def test_trainer_killed_between_its_checkpoint_write_and_its_offset_commit(stack, make_case, fault_results):
    """SIGKILL right after the step-4 checkpoint is in S3 and before its offsets are committed (the
    trainer's test-only --fault-kill-after-checkpoint): the group still holds step 2's offsets, so
    the rerun gets events whose pairs step 4's checkpoint already covers. Its state (watermarks,
    in-flight events and what they still owe) filters them: steps 5-6 train the rest, nothing twice."""
    case = make_case("trainer_kill_before_commit", stack)
    fp = _fingerprint(case)
    rows = _rows(case, "a", 48, fp)
    _publish(case, fp, [rows[i : i + 8] for i in range(0, len(rows), 8)])
    killed = case.run_trainer("--fault-kill-after-checkpoint", "4", expect_rc=-9, timeout_s=300)
    latest = json.loads(case.store.get_bytes(f"runs/{case.run_name}/latest"))
    assert latest["step"] == 4, latest
    committed = case.committed(case.trainer_group, case.kafka.shards_topic)
    case.events.append(
        f"trainer SIGKILLed after the step-4 checkpoint, before its commit (exit {killed.proc.returncode}; "
        f"committed offsets {committed})"
    )
    resumed = case.run_trainer(timeout_s=300)
    assert "resumed from" in resumed.tail(10**6), resumed.tail()
    steps = [
        json.loads(line)["step"]
        for line in (case.trainer_log_dir / case.run_name / "trained_pairs.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7)), steps
    assert case.committed_all(case.trainer_group, case.kafka.shards_topic)
    case.events.append("rerun resumed at step 4, trained steps 5-6, committed everything; exit 0")
    fault_results.add(case.verify(services_ok=True))
