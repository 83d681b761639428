"""No secret ever reaches a log line, an S3 object or a Kafka record.

A reduced demo pipeline on the local stack (free ports), every process configured with distinctive
secret values where the services read them:
  labeler (rules, then the LLM judge against a fake OpenAI endpoint that demands the judge key)
  -> Kafka pairs -> refscore (transformers engine, gRPC with team tokens + stream worker) -> S3 shards
  -> trainer (replay of the shards, a few steps, a checkpoint);
  plus the labeler's gRPC `serve` over TLS with team tokens (a valid, a wrong and a missing token).
Then every log line of every process, every object in every bucket and every record of the run's
topics is searched for each secret value: zero hits. The Kafka SASL credentials are configured but
not used (the local broker is PLAINTEXT and OFFDPO_KAFKA_SASL_MECHANISM is unset); the S3 keys are the
local stack's dev placeholders, which the services do use.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml

from localdev.process import free_port, stop_process
from offdpo.kafka import ensure_topics, read_topic
from offdpo.refscore_client import RefscoreClient, score_item
from offdpo.s3 import ObjectStore
from offdpo.v1 import labeler_pb2, labeler_pb2_grpc
from services.refscore.security import token_hash

from .pki import make_cert
from .refscore.conftest import start_refscore

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "services" / "labeler" / "samples"
TIMEOUT_S = 240


class FakeJudge(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint that answers only with the right API key."""

    def __init__(self, api_key: str):
        self.api_key, self.authorized, self.refused = api_key, 0, 0
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep request lines out of pytest's output
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self.server.refused += 1
            self._reply(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return
        self.server.authorized += 1
        prompt = body["messages"][-1]["content"]
        answer = "Same"
        if "[Answer A]" in prompt and "[Answer B]" in prompt:  # GSB: the shorter answer wins, in both orders
            a = prompt.split("[Answer A]", 1)[1].split("[Answer B]", 1)[0]
            b = prompt.split("[Answer B]", 1)[1].rsplit("Is Answer A", 1)[0]
            answer = "Good" if len(a) < len(b) else "Bad" if len(b) < len(a) else "Same"
        self._reply(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "judge"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _reply(self, code: int, doc: dict):
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _run(cmd: list[str], env: dict, log_path: Path) -> None:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(
                f"{' '.join(cmd[:4])} did not finish within {TIMEOUT_S} s; log tail:\n"
                f"{log_path.read_text(errors='replace')[-3000:]}"
            )
    assert code == 0, f"{' '.join(cmd[:4])} exited {code}; log tail:\n{log_path.read_text(errors='replace')[-3000:]}"


def _all_objects(store: ObjectStore):
    for bucket in store.client.list_buckets():
        for obj in store.client.list_objects(bucket.name, recursive=True):
            resp = store.client.get_object(bucket.name, obj.object_name)
            try:
                yield f"s3://{bucket.name}/{obj.object_name}", resp.read()
            finally:
                resp.close()
                resp.release_conn()


def _labeler_grpc_with_tokens(env: dict, tmp_path: Path, log_path: Path, token: str, wrong_token: str) -> None:
    """`python -m services.labeler serve` over TLS with an auth file; a valid, a wrong and no token."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from offdpo import records

    ca, ca_key, ca_pem, _ = make_cert("secrets test CA", ca=True)
    _, _, cert_pem, key_pem = make_cert("labeler", ca, ca_key, server=True)
    (tmp_path / "labeler-tls.crt").write_bytes(cert_pem)
    (tmp_path / "labeler-tls.key").write_bytes(key_pem)
    auth = tmp_path / "labeler-teams.yaml"
    auth.write_text(
        yaml.safe_dump({"teams": {"annotators": {"token_sha256": [token_hash(token)], "methods": ["SubmitJudgement"]}}})
    )
    port = free_port()
    serve_env = {
        **env,
        "OFFDPO_LABELER_TLS_CERT": str(tmp_path / "labeler-tls.crt"),
        "OFFDPO_LABELER_TLS_KEY": str(tmp_path / "labeler-tls.key"),
        "OFFDPO_LABELER_AUTH_FILE": str(auth),
        "OFFDPO_LABELER_STATE_DIR": str(tmp_path / "labeler-serve"),
    }
    cmd = [sys.executable, "-m", "services.labeler", "serve", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=serve_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    creds = grpc.ssl_channel_credentials(ca_pem)
    try:
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                assert proc.poll() is None, f"labeler serve exited:\n{log_path.read_text(errors='replace')[-3000:]}"
                try:
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "labeler serve never answered"
                    time.sleep(0.5)
        judgement = labeler_pb2.HumanJudgement(
            prompt=records.text_prompt("Best fruit?"), answer_a="apple", answer_b="rock", verdict="Good", annotator="e"
        )
        for tok in (token, wrong_token, None):
            call_creds = creds
            if tok:
                call_creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(tok))
            with grpc.secure_channel(f"localhost:{port}", call_creds) as ch:
                submit = labeler_pb2_grpc.LabelerStub(ch).SubmitJudgement
                if tok == token:
                    assert submit(judgement, timeout=60).pair_id
                    continue
                with pytest.raises(grpc.RpcError) as info:
                    submit(judgement, timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_process(proc, 30)
    assert b"labeler gRPC server on" in log_path.read_bytes() and b"(TLS, team tokens)" in log_path.read_bytes()


def test_no_secret_in_any_log_object_or_record(stack, tiny_model, tmp_path):
    run = f"secrets-{uuid.uuid4().hex[:8]}"
    team_token = f"team-token-{secrets.token_urlsafe(24)}"
    secret_values = {
        "judge api key": f"sk-judge-{secrets.token_urlsafe(24)}",
        "kafka sasl password": f"kafka-pass-{secrets.token_urlsafe(24)}",
        "kafka sasl username": f"kafka-user-{secrets.token_urlsafe(12)}",
        "refscore team token": team_token,
        "refscore wrong token": f"wrong-token-{secrets.token_urlsafe(24)}",
        "labeler team token": f"labeler-token-{secrets.token_urlsafe(24)}",
        "labeler wrong token": f"labeler-wrong-{secrets.token_urlsafe(24)}",
        "s3 secret key": stack.s3.secret_key,
        "s3 access key": stack.s3.access_key,
    }
    topics = {
        "OFFDPO_TOPIC_PAIRS": f"{run}.pairs",
        "OFFDPO_TOPIC_SHARDS": f"{run}.shards",
        "OFFDPO_TOPIC_DEADLETTER": f"{run}.dead",
        "OFFDPO_TOPIC_CANDIDATES": f"{run}.candidates",
    }
    kafka = stack.kafka.from_env({**stack.env(), **topics})
    ensure_topics(kafka, list(topics.values()), partitions=2)
    auth = tmp_path / "teams.yaml"
    auth.write_text(yaml.safe_dump({"teams": {"secrets-test": {"token_sha256": [token_hash(team_token)]}}}))
    judge = FakeJudge(secret_values["judge api key"])
    env = {
        **os.environ,
        **stack.env(),
        **topics,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "OFFDPO_JUDGE_API_KEY": secret_values["judge api key"],
        "OFFDPO_KAFKA_SASL_USERNAME": secret_values["kafka sasl username"],
        "OFFDPO_KAFKA_SASL_PASSWORD": secret_values["kafka sasl password"],
        "OFFDPO_TRAINER_PROGRESS": "false",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    refscore = None
    try:
        # 1. refscore: gRPC with team tokens + the stream worker (the env of every process holds every secret).
        refscore = start_refscore(
            tiny_model,
            logs / "refscore.log",
            engine="transformers",
            stack=stack,
            worker=True,
            extra_env={
                **env,
                "OFFDPO_REFSCORE_GROUP": f"{run}-refscore",
                "OFFDPO_REFSCORE_PLAINTEXT": "true",
                "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "false",
                "OFFDPO_REFSCORE_AUTH_FILE": str(auth),
            },
        )
        # 2. labeler: rules, then the LLM judge (which must send the key to get verdicts).
        labeler = [
            sys.executable,
            "-m",
            "services.labeler",
            "label",
            str(SAMPLES / "candidates.jsonl"),
            "--state-dir",
            str(tmp_path / "labeler"),
            "--rules",
            str(SAMPLES / "rules.yaml"),
        ]
        _run(labeler + ["--strategy", "rules"], env, logs / "labeler-rules.log")
        _run(
            labeler + ["--strategy", "llm_judge", "--judge-base-url", judge.base_url, "--judge-model", "judge"],
            env,
            logs / "labeler-judge.log",
        )
        assert judge.authorized > 0 and judge.refused == 0, "the labeler did not use the configured judge key"
        assert (
            '"llm_judge": {' in (logs / "labeler-judge.log").read_text()
            and '"pairs": 0' not in (logs / "labeler-judge.log").read_text()
        ), "the judge strategy made no pairs"
        pairs = read_topic(kafka, kafka.pairs_topic)
        assert pairs, "the labeler published no pairs"

        # 3. gRPC callers: valid, wrong and missing tokens.
        with RefscoreClient(refscore.target, token=team_token) as client:
            try:
                client.wait_serving(timeout_s=TIMEOUT_S)
            except TimeoutError as exc:
                pytest.fail(f"{exc}\n{refscore.log_tail()}")
            fp = client.model_info(timeout=60).fingerprint
            assert client.score([score_item("q", "a")], timeout=60).items
        for token in (secret_values["refscore wrong token"], None):
            with RefscoreClient(refscore.target, token=token) as bad:
                with pytest.raises(grpc.RpcError) as info:
                    bad.score([score_item("q", "a")], timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # 3b. the labeler's gRPC API: TLS and team tokens.
        _labeler_grpc_with_tokens(
            env,
            tmp_path,
            logs / "labeler-serve.log",
            secret_values["labeler team token"],
            secret_values["labeler wrong token"],
        )

        # 4. the stream worker scores every pair into S3 (or dead-letters it).
        store = ObjectStore(stack.s3)
        prefix = f"scores/{fp.fingerprint_id}/{kafka.pairs_topic}/"
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            from offdpo import records

            scored = sum(len(records.read_shard(store.get_bytes(k), k).pair_ids) for k in store.list_keys(prefix))
            dead = len(read_topic(kafka, kafka.deadletter_topic, idle_s=0.5))
            if scored + dead >= len(pairs):
                break
            assert refscore.proc.poll() is None, f"refscore exited:\n{refscore.log_tail()}"
            assert time.monotonic() < deadline, f"refscore scored {scored}/{len(pairs)} pairs within {TIMEOUT_S} s"
            time.sleep(1.0)
        assert scored > 0

        # 5. a short trainer run replaying the shards, with a checkpoint.
        _run(
            [
                sys.executable,
                "-m",
                "services.trainer",
                "--model",
                str(tiny_model),
                "--run-name",
                run,
                "--prefix",
                prefix,
                "--log-dir",
                str(tmp_path / "runs"),
                "--epochs",
                "1",
                "--global-batch-size",
                "4",
                "--micro-batch-size",
                "2",
                "--warmup-steps",
                "1",
                "--save-every",
                "2",
            ],
            env,
            logs / "trainer.log",
        )
    finally:
        if refscore is not None:
            refscore.stop()
        judge.shutdown()

    # 6. search everything written for every secret value.
    texts = {p.name: p.read_bytes() for p in logs.iterdir()}
    texts.update({str(p): p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()})
    assert b"PLAINTEXT" in texts["refscore.log"], "the plaintext warning is missing"
    hits = []
    for name, data in texts.items():
        hits += [(what, name) for what, value in secret_values.items() if value.encode() in data]
    objects = 0
    for where, data in _all_objects(ObjectStore(stack.s3)):
        objects += 1
        hits += [(what, where) for what, value in secret_values.items() if value.encode() in data]
    assert any("runs/" in w for w, _ in _all_objects(ObjectStore(stack.s3)) if run in w), "no checkpoint was written"
    records_seen = 0
    for topic in topics.values():
        for rec in read_topic(kafka, topic, idle_s=1.0):
            records_seen += 1
            blob = (rec.value or b"") + (rec.key or b"") + b"".join(v or b"" for _, v in (rec.headers or []))
            hits += [
                (what, f"{topic}@{rec.partition}:{rec.offset}")
                for what, value in secret_values.items()
                if value.encode() in blob
            ]
    assert objects and records_seen
    assert not hits, f"secret values found: {hits}"
