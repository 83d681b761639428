"""LLM-judge strategy against a real OpenAI-compatible server (vLLM on the tiny local model), and
through the real broker with a fake judge where the exact verdicts matter."""

from __future__ import annotations

import dataclasses
import json

import pytest

from offdpo.v1 import records_pb2
from services.labeler.config import JudgeConfig
from services.labeler.judge import GSB_LABELS, LLMJudgeStrategy, OpenAIJudgeClient, VerdictCache
from services.labeler.runner import build_labeler, close_labeler, run_file

from .conftest import judge_config, read_deadletters, read_pairs

SETS = [
    {
        "id": "j1",
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "answers": ["4", "5", "four"],
        "reference": "4",
    },
    {
        "id": "j2",
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "answers": ["Paris", "Berlin"],
        "reference": "Paris",
    },
    {
        "id": "j3",
        "prompt": "Complete: the quick brown fox",
        "answers": [" jumps over the lazy dog", " sleeps"],
        "reference": " jumps over the lazy dog",
    },
]


def write_sets(path, sets=SETS, extra_lines=()):
    path.write_text("\n".join([json.dumps(s) for s in sets] + list(extra_lines)) + "\n")
    return path


@pytest.mark.vllm
def test_structured_output_constrains_the_verdict(vllm_server):
    client = OpenAIJudgeClient(judge_config(vllm_server))
    for q in ("Is A better than B?", "Compare the answers.", "2+2=4 or 5?", "Good, Same or Bad:"):
        assert client.complete(q, GSB_LABELS) in GSB_LABELS
    # The constraint really took effect (the old `guided_choice` key is silently ignored): a random
    # model never writes this token sequence on its own.
    assert client.complete("Say something.", ("zebra-42",)) == "zebra-42"


@pytest.mark.vllm
@pytest.mark.stack
def test_llm_judge_gsb_end_to_end_and_cached_rerun(vllm_server, kcfg, lcfg, tmp_path):
    cfg = dataclasses.replace(lcfg, strategy="llm_judge", ledger=False)
    path = write_sets(tmp_path / "judge.jsonl", extra_lines=['{"prompt": "x", "answers": ["same", "same"]}'])
    lab = build_labeler(cfg, kcfg, judge_config(vllm_server))
    try:
        summary = run_file(lab, path)["llm_judge"]
        calls = lab.strategies.get("llm_judge").client.calls
    finally:
        close_labeler(lab)
    comparisons = 3 + 1 + 1
    assert calls == 2 * comparisons  # both orders, no retries needed
    assert summary["inputs"] == 4 and summary["rejects"] == 1 and summary["unparseable"] == 0
    assert summary["pairs"] + summary["ties"] + summary["inconsistent"] == comparisons
    pairs = read_pairs(kcfg)
    assert len(pairs) == summary["pairs"]
    for p in pairs:  # whatever the random model prefers, a published pair had consistent verdicts
        assert p.provenance.strategy == records_pb2.LABEL_STRATEGY_LLM_JUDGE
        assert p.provenance.judge_model == "tiny-judge"
        assert [(v.order, v.verdict) for v in p.provenance.verdicts] == [
            ("chosen_first", "Good"),
            ("rejected_first", "Bad"),
        ]
    (letter,) = read_deadletters(kcfg)
    assert "duplicates" in letter.reason and letter.offset == 4

    # Rerun on the same state dir: every verdict comes from the cache, zero endpoint calls.
    lab = build_labeler(cfg, kcfg, judge_config(vllm_server))
    try:
        again = run_file(lab, path)["llm_judge"]
        strategy = lab.strategies.get("llm_judge")
        assert strategy.client.calls == 0 and strategy.cache.hits == 2 * comparisons
    finally:
        close_labeler(lab)
    assert again["pairs"] == 0 and again["duplicates"] == summary["pairs"]
    assert {k: again[k] for k in ("ties", "inconsistent")} == {k: summary[k] for k in ("ties", "inconsistent")}


@pytest.mark.vllm
def test_llm_judge_reference_mode_real_server(vllm_server, tmp_path):
    from services.labeler.inputs import candidate_set_from_json

    jcfg = judge_config(vllm_server, mode="reference")
    strat = LLMJudgeStrategy(OpenAIJudgeClient(jcfg), jcfg, VerdictCache(tmp_path / "v.sqlite"))
    results = strat.label_batch([candidate_set_from_json(s) for s in SETS], "test")
    assert strat.client.calls == 7
    for out in results:
        assert out.unparseable == 0  # structured output forces a number on the scale
        for p in out.pairs:
            assert 1 <= p.provenance.rejected_score < p.provenance.chosen_score <= 10
            assert [v.order for v in p.provenance.verdicts] == ["chosen", "rejected"]


class ScriptedJudge:
    """Judges by a fixed quality per answer ("4" and "four" equally good: Same), except on the fox
    prompt where it always prefers the answer shown first (position bias)."""

    model = "scripted"
    quality = {"4": 3, "four": 3, "5": 1, "Paris": 2, "Berlin": 1}

    def __init__(self):
        self.calls = 0

    def complete(self, prompt, choices):
        self.calls += 1
        if "quick brown fox" in prompt:
            return "Good"
        a = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = prompt.split("[Answer B]\n")[1].split("\n\n")[0]
        qa, qb = self.quality[a], self.quality[b]
        return "Good" if qa > qb else "Bad" if qa < qb else "Same"


@pytest.mark.stack
def test_llm_judge_through_broker_with_scripted_verdicts(kcfg, lcfg, tmp_path):
    fake = ScriptedJudge()
    jcfg = JudgeConfig(model="scripted")
    strategy = LLMJudgeStrategy(fake, jcfg, VerdictCache(tmp_path / "v.sqlite"))
    cfg = dataclasses.replace(lcfg, strategy="llm_judge")
    lab = build_labeler(cfg, kcfg, jcfg, strategy_overrides={"llm_judge": strategy})
    try:
        summary = run_file(lab, write_sets(tmp_path / "s.jsonl", SETS + SETS[:1]))["llm_judge"]
    finally:
        close_labeler(lab)
    assert fake.calls == 10  # the repeated set was served from the cache
    pairs = {(p.chosen, p.rejected) for p in read_pairs(kcfg)}
    assert pairs == {("4", "5"), ("four", "5"), ("Paris", "Berlin")}
    assert summary["pairs"] == 3 and summary["duplicates"] == 2 and summary["inconsistent"] == 1
    assert summary["ties"] == 2


@pytest.mark.stack
def test_unreachable_judge_is_an_outage_not_a_dead_letter(kcfg, lcfg, tmp_path):
    from localdev.process import free_port
    from services.labeler.pipeline import Outage

    jcfg = JudgeConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        model="nobody",
        max_retries=1,
        backoff_s=0.05,
        timeout_s=2,
        cache=False,
    )
    lab = build_labeler(dataclasses.replace(lcfg, strategy="llm_judge"), kcfg, jcfg)
    try:
        with pytest.raises(Outage, match="failed after 2 attempt") as info:
            run_file(lab, write_sets(tmp_path / "s.jsonl", SETS[1:2]))
    finally:
        close_labeler(lab)
    assert info.value.retryable
    # The set is not lost as bad data: nothing is dead-lettered, nothing published.
    assert read_deadletters(kcfg) == [] and read_pairs(kcfg) == []
