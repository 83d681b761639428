"""`make demo`: the whole pipeline end to end on the local stack with the local test model.

  1. start the local stack (SeaweedFS S3 + Tansu Kafka) and build the test models (policy + reward model)
  2. start refscore (vLLM engine, gRPC API + stream worker) and vLLM's OpenAI server (the LLM judge)
  3. label the shipped candidates with rules, the reward model and the LLM judge -> pairs topic
  4. refscore's worker scores every pair into Parquet shards in S3 and announces them
  5. the trainer follows the shard-ready topic (continuous mode) until the stream is drained
  6. report what Kafka and S3 hold, and load the final checkpoint with transformers

Each run uses its own topics, consumer groups and run name (demo-<id>), so reruns do not mix.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from localdev.process import free_port, stop_process, wait_until
from localdev.stack import LocalStack
from localdev.testmodel import ensure_test_model
from offdpo import records
from offdpo.kafka import ensure_topics, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "services" / "labeler" / "samples"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _start(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def main(args) -> int:
    from localdev.openai_server import OpenAIServer
    from offdpo.refscore_client import RefscoreClient
    from services.labeler.config import JudgeConfig, LabelerConfig
    from services.labeler.runner import build_labeler, close_labeler, run_file

    started = time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    run_name = f"demo-{run_id}"
    workdir = (Path(args.workdir) / run_name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    models = Path(args.workdir).resolve() / "models"

    stack = LocalStack()
    _say(f"[1/6] local stack (S3 {stack.s3.endpoint}, Kafka {stack.kafka.bootstrap_servers}) and test models")
    stack.up()
    refscore = trainer = None
    try:
        policy = ensure_test_model(models / "tiny", size="tiny")
        reward = ensure_test_model(models / "tiny-reward", size="tiny", kind="reward")
        topics = {
            "OFFDPO_TOPIC_PAIRS": f"{run_name}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"{run_name}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"{run_name}.deadletter",
            "OFFDPO_TOPIC_CANDIDATES": f"{run_name}.candidates",
        }
        env = {
            **os.environ,
            **stack.env(),
            **topics,
            "PYTHONPATH": str(REPO),
            # the local broker joins a group in ~3 s with these, ~23 s with kafka-python's defaults
            "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "OFFDPO_KAFKA_HEARTBEAT_MS": "1000",
            "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "120000",
        }
        kafka = stack.kafka.from_env(env)
        ensure_topics(kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], stack.stack.partitions)
        store = ObjectStore(stack.s3)

        _say("[2/6] starting refscore (vLLM engine, gRPC + stream worker) and the LLM judge (vLLM OpenAI server)")
        refscore_port = free_port()
        refscore = _start(
            [sys.executable, "-m", "services.refscore", "serve", "--worker"],
            {
                **env,
                "OFFDPO_REFSCORE_MODEL_DIR": str(policy),
                "OFFDPO_REFSCORE_PORT": str(refscore_port),
                "OFFDPO_REFSCORE_METRICS_PORT": "0",
                "OFFDPO_REFSCORE_GROUP": f"{run_name}-refscore",
                "OFFDPO_REFSCORE_MAX_MODEL_LEN": "1024",
                "OFFDPO_REFSCORE_BATCH_WAIT_S": "1.0",
                # local development on loopback: explicitly plaintext and without team tokens
                "OFFDPO_REFSCORE_PLAINTEXT": "true",
                "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
            },
            workdir / "refscore.log",
        )
        with OpenAIServer(
            policy, served_model_name="judge", max_model_len=1024, log_path=workdir / "judge-server.log"
        ) as judge_server:
            _say(f"      judge at {judge_server.base_url}; refscore on 127.0.0.1:{refscore_port} (logs in {workdir})")

            _say("[3/6] labelling the shipped candidates: rules, reward model, LLM judge (GSB, both orders)")
            labeler_cfg = LabelerConfig.from_env(
                env,
                state_dir=str(workdir / "labeler"),
                rules_file=str(SAMPLES / "rules.yaml"),
                reward_model=str(reward),
            )
            judge_cfg = JudgeConfig.from_env(env, base_url=judge_server.base_url, model="judge")
            summaries = {}
            labeler = build_labeler(labeler_cfg, kafka, judge_cfg, progress=lambda m: _say(f"      {m}"))
            try:
                for strategy in ("rules", "reward_model", "llm_judge"):
                    summaries = run_file(
                        labeler,
                        SAMPLES / "candidates.jsonl",
                        "candidates",
                        strategy,
                        progress=lambda m, s=strategy: _say(f"      {s}: {m}"),
                    )
            finally:
                close_labeler(labeler)
        _say("      " + json.dumps(summaries))

        pair_records = read_topic(kafka, kafka.pairs_topic)
        labelled = {records.PreferencePair.FromString(r.value).pair_id for r in pair_records}
        _say(f"      {len(labelled)} distinct pairs on {kafka.pairs_topic}")

        _say("[4/6] refscore scoring the stream into S3")
        with RefscoreClient(f"127.0.0.1:{refscore_port}") as client:
            client.wait_serving(timeout_s=300)
            fp = client.model_info().fingerprint
        shard_prefix = f"scores/{fp.fingerprint_id}/{kafka.pairs_topic}/"

        def scored_ids():
            ids = []
            for key in store.list_keys(shard_prefix):
                ids += records.read_shard(store.get_bytes(key), key).pair_ids
            return ids

        def refscore_dead_letters():
            return [
                dl
                for dl in (
                    records_pb2.DeadLetter.FromString(r.value)
                    for r in read_topic(kafka, kafka.deadletter_topic, idle_s=1.0)
                )
                if dl.service == "refscore"
            ]

        wait_until(
            lambda: (
                len(set(scored_ids())) + len({(d.partition, d.offset) for d in refscore_dead_letters()})
                >= len(pair_records)
            ),
            600,
            "scoring every pair",
            every_s=2.0,
            progress=lambda: _check_alive(refscore, workdir / "refscore.log"),
        )
        scored = scored_ids()
        _say(f"      {len(scored)} scored rows in s3://{store.bucket}/{shard_prefix}")

        _say("[5/6] training (continuous mode on the shard-ready topic, until the stream is drained)")
        trainer_cmd = [
            sys.executable,
            "-m",
            "services.trainer",
            "--model",
            str(policy),
            "--run-name",
            run_name,
            "--mode",
            "continuous",
            "--stop-when-idle-s",
            "15",
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "4",
            "--lr",
            "5e-4",
            "--warmup-steps",
            "2",
            "--beta",
            "0.1",
            "--save-every",
            "5",
            "--log-dir",
            str(workdir / "trainer"),
            "--consumer-group",
            f"{run_name}-trainer",
        ]
        trainer = subprocess.Popen(trainer_cmd, env=env, cwd=REPO)
        code = trainer.wait(timeout=900)
        if code != 0:
            raise RuntimeError(f"the trainer exited with {code}")

        _say("[6/6] report")
        report = _report(store, kafka, run_name, workdir, summaries, labelled, scored, fp)
        (workdir / "report.json").write_text(json.dumps(report, indent=2))
        _print_report(report, time.monotonic() - started)
        return 0
    finally:
        stop_process(trainer)
        stop_process(refscore)
        if not args.keep_stack:
            stack.down()


def _check_alive(proc: subprocess.Popen, log_path: Path) -> None:
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"refscore exited with {proc.returncode}; log tail:\n{tail}")


def _report(store, kafka, run_name, workdir, summaries, labelled, scored, fp) -> dict:
    from services.trainer.checkpoint import download_model, latest_checkpoint

    trained = []
    pairs_log = workdir / "trainer" / run_name / "trained_pairs.jsonl"
    metrics_log = workdir / "trainer" / run_name / "metrics.jsonl"
    for line in pairs_log.read_text().splitlines():
        trained += json.loads(line)["pair_ids"]
    metrics = [json.loads(line) for line in metrics_log.read_text().splitlines()]
    letters = [records_pb2.DeadLetter.FromString(r.value) for r in read_topic(kafka, kafka.deadletter_topic)]
    by_reason = collections.Counter((dl.service, dl.error_type) for dl in letters)
    examples = {}
    for dl in letters:
        examples.setdefault(f"{dl.service}/{dl.error_type}", dl.reason[:160])
    prefix = latest_checkpoint(store, run_name)
    final_dir = download_model(store, prefix, workdir / "final-model")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final_dir)
    return {
        "run_name": run_name,
        "labelled": {"distinct_pairs_on_topic": len(labelled), "summary": summaries},
        "scored": {"rows": len(scored), "distinct": len(set(scored)), "fingerprint": fp.fingerprint_id},
        "trained": {
            "pairs": len(trained),
            "distinct": len(set(trained)),
            "steps": len(metrics),
            "final_rewards_accuracy": metrics[-1].get("rewards/accuracies") if metrics else None,
            "mean_rewards_accuracy": (
                sum(m.get("rewards/accuracies", 0.0) for m in metrics) / len(metrics) if metrics else None
            ),
            "final_loss": metrics[-1].get("loss") if metrics else None,
        },
        "consistency": {
            "scored_equals_labelled_minus_refscore_dead_letters": set(scored)
            == labelled - _dead_pair_ids(letters, "refscore")
            and len(scored) == len(set(scored)),
            "trained_equals_scored": set(trained) == set(scored) and len(trained) == len(set(trained)),
        },
        "dead_letters": {f"{s}/{t}": n for (s, t), n in sorted(by_reason.items())},
        "dead_letter_examples": examples,
        "checkpoint": f"s3://{store.bucket}/{prefix}/model/",
        "checkpoint_loaded_by_transformers": type(model).__name__,
        "plot": str(workdir / "trainer" / run_name / "curves.png"),
        "metrics_log": str(metrics_log),
    }


def _dead_pair_ids(letters, service: str) -> set[str]:
    ids = set()
    for dl in letters:
        if dl.service == service:
            try:
                ids.add(records.PreferencePair.FromString(dl.original_value).pair_id)
            except Exception:  # noqa: BLE001 - undecodable records have no pair id
                pass
    return ids


def _print_report(report: dict, elapsed_s: float) -> None:
    t, s = report["trained"], report["scored"]
    _say("=" * 72)
    _say(f"pairs labelled   {report['labelled']['distinct_pairs_on_topic']}")
    _say(f"pairs scored     {s['distinct']} (fingerprint {s['fingerprint']})")
    _say(
        f"pairs trained    {t['distinct']} in {t['steps']} steps; rewards/accuracies final step "
        f"{t['final_rewards_accuracy']:.2f} (mean over steps {t['mean_rewards_accuracy']:.2f}), "
        f"final loss {t['final_loss']:.4f}"
    )
    _say(f"dead-lettered    {sum(report['dead_letters'].values())}: {report['dead_letters']}")
    for kind, reason in report["dead_letter_examples"].items():
        _say(f"                 {kind}: {reason}")
    _say(f"checkpoint       {report['checkpoint']} (loads as {report['checkpoint_loaded_by_transformers']})")
    _say(f"plot             {report['plot']}")
    _say(f"consistent       {report['consistency']}")
    _say(f"done in {elapsed_s / 60:.1f} min")
