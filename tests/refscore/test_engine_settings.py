"""Engine settings from the environment reach the engine: read back from it, not from the config."""

from __future__ import annotations

import os

import pytest

from offdpo.config import ConfigError
from services.refscore.config import RefscoreConfig
from services.refscore.engines import EngineSettings, TransformersEngine
from tests.refscore.conftest import VLLM_ENGINE_SETTINGS


def test_vllm_engine_runs_with_the_configured_settings(vllm_client):
    settings = dict(vllm_client.model_info().engine_settings)
    threads = int(VLLM_ENGINE_SETTINGS["OFFDPO_REFSCORE_CPU_THREADS"])
    expected_cores = EngineSettings(cpu_threads=threads).cpu_bind_list()
    # Scheduler knobs as the engine's config holds them...
    assert settings["max_batched_tokens"] == VLLM_ENGINE_SETTINGS["OFFDPO_REFSCORE_MAX_BATCHED_TOKENS"], settings
    assert settings["max_num_seqs"] == VLLM_ENGINE_SETTINGS["OFFDPO_REFSCORE_MAX_NUM_SEQS"], settings
    # On for sharing a pair's prompt (OFFDPO_REFSCORE_SHARE_PROMPTS, default true): only a pair's second
    # answer reads the cache (engines.VLLMEngine.score).
    assert settings["prefix_caching"] == "true" and settings["dtype"] == "float32", settings
    # ...and threads as the worker process that computes reports them (answered by that process).
    assert settings["cpu_threads_bind"] == expected_cores, settings
    assert settings["cpu_reserved_cores"] == "0", settings
    assert settings["torch_threads"] == str(threads), settings
    assert set(settings["cpu_cores_bound"].split(",")) <= set(expected_cores.split(",")), settings


def test_transformers_engine_runs_with_the_configured_settings(tiny_model):
    cfg = RefscoreConfig.from_env(
        {"OFFDPO_REFSCORE_TRANSFORMERS_BATCH_TOKENS": "3000", "OFFDPO_REFSCORE_LOGPROB_CHUNK_TOKENS": "17"}
    )
    engine = TransformersEngine(str(tiny_model), "float32", 256, settings=cfg.engine_settings())
    settings = engine.effective_settings()
    assert settings["transformers_batch_tokens"] == "3000" and settings["logprob_chunk_tokens"] == "17", settings
    assert settings["dtype"] == "float32" and settings["device"] == "cpu", settings
    # A chunk size that does not divide the sequence still gives every position (no off-by-one).
    ids = list(range(5, 60))
    assert len(engine.score([(ids[:7], ids[7:])])[0]) == len(ids) - 7


def test_transformers_engine_greedy_generation_with_several_samples_gives_copies(tiny_model):
    """Temperature 0 with n > 1: transformers refuses num_return_sequences > 1 without sampling; greedy is
    deterministic, so the engine answers n copies of the one greedy answer, as vLLM does."""
    engine = TransformersEngine(str(tiny_model), "float32", 256, settings=EngineSettings())
    ids = list(range(5, 20))
    args = dict(max_tokens=6, temperature=0.0, top_p=1.0, seed=None, stop_token_ids=[2])
    three = engine.generate(ids, n=3, **args)
    one = engine.generate(ids, n=1, **args)
    assert len(three) == 3 and all(g == one[0] for g in three)
    assert len(one[0].token_ids) >= 1


@pytest.mark.parametrize(
    "name,value,needle",
    [
        ("OFFDPO_REFSCORE_CPU_THREADS", "4096", "only"),
        ("OFFDPO_REFSCORE_CPU_THREADS", "-1", ">= 0"),
        ("OFFDPO_REFSCORE_CPU_RESERVED_CORES", str(len(os.sched_getaffinity(0))), "leaves none"),
        ("OFFDPO_REFSCORE_LOGPROB_CHUNK_TOKENS", "-1", ">= 0"),
        ("OFFDPO_REFSCORE_LOGITS_BUDGET_MB", "0", ">= 1"),
    ],
)
def test_bad_engine_settings_are_refused_with_the_variable_named(name, value, needle):
    cfg = RefscoreConfig.from_env({name: value})
    with pytest.raises(ConfigError) as err:
        cfg.engine_settings().cpu_bind_list()
    assert name in str(err.value) and needle in str(err.value)
