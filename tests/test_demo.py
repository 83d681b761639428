"""The README's main command (`make demo` = `offdpo demo`) end to end, on free ports in a temporary dir:
the review-language reference through labeler -> refscore -> trainer, and the model it makes is better.

It runs with distinctive secret values (S3 credentials, the LLM judge's API key), then searches
everything the run left behind (its output, every log and file, every S3 object, every Kafka record
of its topics) for them: zero hits.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from cli.demo import EVAL_FRACTION
from localdev.process import free_port, free_port_block
from localdev.stack import LocalStack, StackConfig
from offdpo import records
from offdpo.config import KafkaConfig, S3Config
from offdpo.kafka import read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1.records_pb2 import DeadLetter
from services.trainer.examples import is_heldout

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.vllm, pytest.mark.stack, pytest.mark.timeout(2400)]  # not timed; a hang guard


def test_demo_runs_the_whole_pipeline_reports_consistent_counts_and_leaks_no_secret(tmp_path):
    secret_values = {
        "OFFDPO_S3_ACCESS_KEY": "demo-access-" + secrets.token_hex(8),
        "OFFDPO_S3_SECRET_KEY": "demo-secret-" + secrets.token_hex(16),
        "OFFDPO_JUDGE_API_KEY": "sk-demo-" + secrets.token_hex(16),
    }
    env = dict(
        os.environ,
        OFFDPO_STACK_DIR=str(tmp_path / "stack"),
        OFFDPO_STACK_S3_PORT=str(free_port()),
        OFFDPO_STACK_KAFKA_PORT=str(free_port()),
        OFFDPO_STACK_WEED_PORT_BASE=str(free_port_block(11)),
        OFFDPO_TRAINER_PROGRESS="false",
        **secret_values,
    )
    stack = LocalStack(StackConfig.from_env(env), S3Config.from_env(env), KafkaConfig.from_env(env))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", "--workdir", str(tmp_path / "demo"), "--keep-stack"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=2100,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-5000:]
        for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
            assert step in proc.stdout, f"progress line {step} missing"
        reports = list((tmp_path / "demo").glob("demo-*/report.json"))
        assert len(reports) == 1
        report = json.loads(reports[0].read_text())
        run = report["run_name"]

        # The counts, read back by this test from Kafka, S3 and the trainer's log, not from the report.
        pair_ids = [records.PreferencePair.FromString(r.value).pair_id for r in read_topic(stack.kafka, f"{run}.pairs")]
        letters = [DeadLetter.FromString(r.value) for r in read_topic(stack.kafka, f"{run}.deadletter")]
        refscore_refused = {
            records.PreferencePair.FromString(dl.original_value).pair_id
            for dl in letters
            if dl.service == "refscore" and dl.original_value
        }
        store = ObjectStore(stack.s3)
        scored_ids = [
            pid
            for key in store.list_keys("scores/")
            if f"/{run}.pairs/" in key
            for pid in records.read_shard(store.get_bytes(key)).table.column("pair_id").to_pylist()
        ]
        trainer_log = reports[0].parent / "trainer" / run / "trained_pairs.jsonl"
        trained_ids = [pid for line in trainer_log.read_text().splitlines() for pid in json.loads(line)["pair_ids"]]
        assert len(set(pair_ids)) > 100
        assert sorted(scored_ids) == sorted(set(pair_ids) - refscore_refused), "every valid pair scored once"
        # The trainer holds out a share of the pairs (by pair-id hash) for its eval metrics, never trained.
        heldout = {pid for pid in scored_ids if is_heldout(pid, EVAL_FRACTION)}
        assert heldout, "no held-out pairs"
        assert sorted(trained_ids) == sorted(set(scored_ids) - heldout), "every scored pair not held out trained once"
        # The input holds malformed candidate sets: dead-lettered with reasons, not dropped.
        labeler_letters = sorted(dl.error_type for dl in letters if dl.service == "labeler" and dl.reason)
        assert labeler_letters == ["decode_error", "decode_error", "invalid_candidate_set"], labeler_letters
        # The report says what the test found.
        assert report["labelled"]["distinct_pairs_on_topic"] == len(set(pair_ids))
        assert report["scored"]["rows"] == len(scored_ids) and report["trained"]["pairs"] == len(trained_ids)
        assert report["checkpoint_loaded_by_transformers"] == "Qwen2ForCausalLM"
        assert Path(report["plot"]).stat().st_size > 10_000
        # And it shows learning (tests/test_learning.py holds the margins; here the direction, in SE).
        before, after, learning = report["before"], report["after"], report["learning"]
        assert before["samples"] == after["samples"] >= 400
        assert learning["reward_gain_se"] >= 3 and after["positive_share"] > before["positive_share"], learning
        assert 0 < after["kl"] < 5 and learning["heldout_accuracy"] is not None, learning
        for step in ("positive share", "mean reward", "KL(pol || ref)", "held-out reward accuracy", "learning.png"):
            assert step in proc.stdout, f"{step!r} missing from the demo's report"
        assert "INFO kafka" not in out, "kafka-python's INFO chatter in the demo's output"

        # Everything the run wrote, searched for every secret value.
        haystacks = {"demo output": out.encode()}
        for path in tmp_path.rglob("*"):
            if path.is_file() and "seaweedfs/" not in str(path.relative_to(tmp_path)):  # S3's own data files
                haystacks[str(path)] = path.read_bytes()
        for bucket in ("offdpo", "tansu"):
            bucket_store = ObjectStore(stack.s3, bucket)
            for key in bucket_store.list_keys(""):
                haystacks[f"s3://{bucket}/{key}"] = bucket_store.get_bytes(key)
        for topic in (f"{run}.pairs", f"{run}.shards", f"{run}.deadletter"):
            for rec in read_topic(stack.kafka, topic):
                haystacks[f"{topic}@{rec.partition}/{rec.offset}"] = (rec.key or b"") + (rec.value or b"")
        assert len(haystacks) > 50 and store.bucket == "offdpo"
        leaks = [
            (name, var)
            for name, data in haystacks.items()
            for var, value in secret_values.items()
            if value.encode() in data
        ]
        assert not leaks, f"secret values found in: {leaks[:10]}"
    finally:
        stack.down()
