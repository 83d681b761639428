"""refscore fixtures: one vLLM-backed refscore server per test session, in its own process.

The server process also runs the stream worker on topics of its own, so the stream tests share
the one engine. vLLM runs outside the pytest process, which loads transformers models too: a process
holding both can abort at interpreter exit (see VLLMEngine.shutdown), and the server's exit code is
part of what the tests check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from localdev.process import free_port, stop_process
from offdpo.kafka import ensure_topics
from offdpo.refscore_client import RefscoreClient

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RefscoreProcess:
    proc: subprocess.Popen
    target: str
    env: dict
    log_path: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout_s: float = 60) -> int:
        return stop_process(self.proc, timeout_s)


def start_refscore(
    model_dir,
    log_path: Path,
    *,
    engine: str,
    stack=None,
    worker: bool = False,
    extra_env: dict | None = None,
    mode: str = "serve",
) -> RefscoreProcess:
    port = free_port()
    env = dict(os.environ)
    if stack is not None:
        env.update(stack.env())
    env.update(
        {
            "OFFDPO_REFSCORE_MODEL_DIR": str(model_dir),
            "OFFDPO_REFSCORE_ENGINE": engine,
            "OFFDPO_REFSCORE_PORT": str(port),
            "OFFDPO_REFSCORE_METRICS_PORT": "0",
            "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
            "OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION": "0.08",  # of RAM on the CPU: ~2 GB is plenty here
            "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.5",
            "OFFDPO_REFSCORE_GRACE_S": "20",
            # Local test servers: plaintext and no tokens, both explicit (tests/refscore/test_security.py
            # covers TLS, mTLS and tokens; extra_env can switch them back).
            "OFFDPO_REFSCORE_PLAINTEXT": "true",
            "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra_env or {})
    args = [sys.executable, "-m", "services.refscore", mode] + (["--worker"] if worker and mode == "serve" else [])
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    return RefscoreProcess(proc, f"127.0.0.1:{port}", env, log_path)


# Non-default engine knobs for the shared server: test_engine_settings.py reads them back from the engine.
VLLM_ENGINE_SETTINGS = {
    "OFFDPO_REFSCORE_CPU_THREADS": str(min(2, len(os.sched_getaffinity(0)))),
    "OFFDPO_REFSCORE_MAX_BATCHED_TOKENS": "1536",
    "OFFDPO_REFSCORE_MAX_NUM_SEQS": "48",
}


@pytest.fixture(scope="package")
def vllm_topics(stack):
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "OFFDPO_TOPIC_PAIRS": f"vllm.pairs.{suffix}",
        "OFFDPO_TOPIC_SHARDS": f"vllm.shards.{suffix}",
        "OFFDPO_TOPIC_DEADLETTER": f"vllm.dead.{suffix}",
        "OFFDPO_REFSCORE_GROUP": f"vllm-{suffix}",
    }
    ensure_topics(stack.kafka, [v for k, v in topics.items() if k.startswith("OFFDPO_TOPIC")], partitions=3)
    return topics


@pytest.fixture(scope="package")  # tests/refscore only: the engine stops before other packages run
def vllm_server(tiny_model, stack, vllm_topics, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("refscore") / "vllm-server.log"
    metrics = {"OFFDPO_REFSCORE_METRICS_PORT": str(free_port())}  # tests read counters (test_parity.py)
    http = {"OFFDPO_REFSCORE_HTTP_PORT": str(free_port())}  # the OpenAI-compatible door (test_http_door.py)
    server = start_refscore(
        tiny_model,
        log_path,
        engine="vllm",
        stack=stack,
        worker=True,
        extra_env={**vllm_topics, **VLLM_ENGINE_SETTINGS, **metrics, **http},
    )
    client = RefscoreClient(server.target)
    try:
        try:
            client.wait_serving(timeout_s=300)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\nserver log tail:\n{server.log_tail()}") from None
        yield server
    finally:
        client.close()
        code = server.stop()
        assert code == 0, f"refscore exited with {code} on SIGTERM; log tail:\n{server.log_tail()}"


@pytest.fixture
def vllm_client(vllm_server):
    with RefscoreClient(vllm_server.target) as client:
        yield client


# -- the transformers engine in-process (no vLLM): helpers shared by the tests that run it ------------
def transformers_cfg(model_dir, **kw):
    """A refscore config on the transformers engine for `model_dir` (small limits, quick batching)."""
    from services.refscore.config import RefscoreConfig

    return RefscoreConfig(model_dir=str(model_dir), engine="transformers", max_model_len=512, batch_wait_s=0.3, **kw)


def load_scorer(model_dir, **kw):
    """A loaded Scorer on the transformers engine; the caller shuts it down."""
    from services.refscore.scorer import Scorer

    scorer = Scorer(transformers_cfg(model_dir, **kw))
    scorer.load()
    return scorer


@pytest.fixture(scope="session")
def model_b(tmp_path_factory):
    """A second tiny test model: the same architecture and tokenizer as `tiny_model`, other weights."""
    from localdev.testmodel import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "tiny-b", size="tiny", seed=1)
