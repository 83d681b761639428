"""The bfloat16 precision mode stays within its stated difference to float32 (PRECISION_BOUNDS), for
both engines, on the test model. Its own package: the vLLM bf16 server starts after tests/refscore's
float32 server has stopped (one vLLM engine at a time)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from localdev.testmodel import corpus
from offdpo.refscore_client import RefscoreClient, score_item
from services.refscore.engines import PRECISION_BOUNDS, TransformersEngine
from tests.refscore.conftest import start_refscore

BOUNDS = PRECISION_BOUNDS["bfloat16"]


@pytest.fixture(scope="module")
def items(tiny_model):
    """24 chat items: prompts from the test corpus, answers of 20-300 tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng, lines = random.Random(7), corpus(400, seed=99)
    out = []
    for _ in range(24):
        prompt = [("user", " ".join(rng.sample(lines, 2)))]
        words = " ".join(rng.choice(lines) for _ in range(60))
        answer = tok.decode(tok(words, add_special_tokens=False).input_ids[: rng.randint(20, 300)]).strip()
        out.append((prompt, answer))
    return out


def float32_reference(model_dir, scored) -> list[list[float]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt_ids, answer_ids in scored:
        ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(logps.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1 :, 0].tolist())
    return out


def assert_within_bounds(got: list[list[float]], reference: list[list[float]]) -> tuple[float, float]:
    worst_token = max(abs(a - b) for g, r in zip(got, reference) for a, b in zip(g, r))
    worst_sum = max(abs(sum(g) - sum(r)) for g, r in zip(got, reference))
    assert worst_token <= BOUNDS["token"], f"bf16 per-token difference {worst_token} > {BOUNDS['token']}"
    assert worst_sum <= BOUNDS["sum"], f"bf16 per-sum difference {worst_sum} > {BOUNDS['sum']}"
    # bf16 really ran (a float32 run would differ by ~1e-6): the check is not vacuous.
    assert worst_token > 1e-4, f"bf16 scores equal float32 ({worst_token}): was bf16 used?"
    print(f"bf16 vs float32: per token {worst_token:.4f}, per sum {worst_sum:.4f}")
    return worst_token, worst_sum


@pytest.mark.vllm
def test_vllm_bf16_within_stated_difference(tiny_model, items, tmp_path):
    server = start_refscore(
        tiny_model,
        tmp_path / "bf16.log",
        engine="vllm",
        extra_env={"OFFDPO_REFSCORE_DTYPE": "bfloat16", "OFFDPO_REFSCORE_MAX_MODEL_LEN": "1024"},
    )
    try:
        with RefscoreClient(server.target) as client:
            try:
                client.wait_serving(timeout_s=300)
            except TimeoutError as exc:
                raise RuntimeError(f"{exc}\nserver log tail:\n{server.log_tail()}") from None
            assert client.model_info().engine_settings["dtype"] == "bfloat16"
            response = client.score([score_item(p, a) for p, a in items])
    finally:
        code = server.stop()
    assert code == 0, f"refscore exited with {code}; log tail:\n{server.log_tail()}"
    assert response.fingerprint.dtype == "bfloat16"
    scored = [(it.prompt_token_ids, it.answer_token_ids) for it in response.items]
    assert_within_bounds([list(it.token_logprobs) for it in response.items], float32_reference(tiny_model, scored))


@pytest.mark.engine
def test_transformers_bf16_within_stated_difference(tiny_model, items):
    from offdpo.records import chat_prompt
    from services.refscore.tokenization import BoundaryTokenizer

    boundary = BoundaryTokenizer(AutoTokenizer.from_pretrained(tiny_model))
    scored = []
    for prompt, answer in items:
        enc = boundary.encode_prompt(chat_prompt(prompt))
        scored.append((enc.ids, boundary.encode_answer_text(answer, enc.is_chat)))
    engine = TransformersEngine(str(tiny_model), "bfloat16", 1024)
    assert engine.effective_settings()["dtype"] == "bfloat16"
    assert_within_bounds(engine.score(scored), float32_reference(tiny_model, scored))
