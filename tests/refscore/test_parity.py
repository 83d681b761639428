"""Parity and batch invariance of both engines against a plain transformers float32 forward."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from offdpo.refscore_client import score_item
from services.refscore.config import RefscoreConfig
from services.refscore.scorer import Scorer

TOKEN_TOL = 1e-5
SUM_TOL = 1e-4
BATCH_TOL = 1e-6


def _items(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "answer",
        "question",
        "reason",
        "step",
        "compute",
        "value",
        "number",
        "list",
        "python",
        "code",
        "reward",
        "policy",
    ]
    items = []
    for i in range(n):
        prompt = [("user", " ".join(rng.choice(words) for _ in range(rng.randint(2, 40))))]
        if i % 3 == 0:
            prompt.insert(0, ("system", "Be brief."))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
        items.append(score_item(prompt if i % 4 else " ".join(w for _, w in prompt), answer, item_id=str(i)))
    return items


@pytest.fixture(scope="module")
def reference(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.eval()

    def logprobs(prompt_ids, answer_ids):
        ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(prompt_ids)
        return [logp[p - 1 + i, t].item() for i, t in enumerate(answer_ids)]

    return logprobs


def _check_parity(scored, reference):
    worst_token = worst_sum = 0.0
    for item in scored:
        expected = reference(item.prompt_token_ids, item.answer_token_ids)
        assert len(expected) == len(item.token_logprobs) > 0
        worst_token = max(worst_token, max(abs(a - b) for a, b in zip(item.token_logprobs, expected)))
        worst_sum = max(worst_sum, abs(item.logprob_sum - sum(expected)))
    assert worst_token < TOKEN_TOL, f"per-token difference {worst_token:.2e}"
    assert worst_sum < SUM_TOL, f"sum difference {worst_sum:.2e}"


@pytest.mark.vllm
def test_vllm_engine_matches_transformers_forward(vllm_client, reference):
    response = vllm_client.score(_items(24))
    assert response.fingerprint.engine == "vllm"
    _check_parity(response.items, reference)


@pytest.mark.vllm
def test_vllm_batch_invariance(vllm_client):
    batch = _items(32, seed=1)
    together = vllm_client.score(batch).items
    for i in (0, 7, 31):
        alone = vllm_client.score([batch[i]]).items[0]
        diff = max(abs(a - b) for a, b in zip(alone.token_logprobs, together[i].token_logprobs))
        assert list(alone.answer_token_ids) == list(together[i].answer_token_ids)
        assert diff <= BATCH_TOL, f"item {i}: alone vs in a batch of 32 differ by {diff:.2e}"


@pytest.fixture(scope="module")
def transformers_scorer(tiny_model):
    scorer = Scorer(RefscoreConfig(model_dir=str(tiny_model), engine="transformers", max_model_len=512))
    scorer.load()
    yield scorer
    scorer.shutdown()


def _score_in_process(scorer, items):
    prepared = scorer.prepare_items(items)
    logps = scorer.score(prepared, timeout=120)

    class Item:
        def __init__(self, p, lp):
            self.prompt_token_ids, self.answer_token_ids = p.prompt_ids, p.answer_ids
            self.token_logprobs, self.logprob_sum = lp, sum(lp)

    return [Item(p, lp) for p, lp in zip(prepared, logps)]


def test_transformers_engine_matches_plain_forward(transformers_scorer, reference):
    assert transformers_scorer.fingerprint.engine == "transformers"
    _check_parity(_score_in_process(transformers_scorer, _items(24)), reference)


def test_transformers_engine_batch_invariance(transformers_scorer):
    batch = _items(32, seed=1)
    together = _score_in_process(transformers_scorer, batch)
    for i in (0, 7, 31):
        alone = _score_in_process(transformers_scorer, [batch[i]])[0]
        diff = max(abs(a - b) for a, b in zip(alone.token_logprobs, together[i].token_logprobs))
        assert diff <= BATCH_TOL, f"item {i}: alone vs in a batch of 32 differ by {diff:.2e}"


@pytest.mark.vllm
def test_engines_share_a_fingerprint_identity(vllm_client, transformers_scorer):
    vllm_fp = vllm_client.model_info().fingerprint
    assert vllm_fp.fingerprint_id == transformers_scorer.fingerprint.fingerprint_id
    assert vllm_fp.engine != transformers_scorer.fingerprint.engine


def _counter(port: int, name: str, model: str) -> float:
    """Counter `name` of the reference whose fingerprint id is `model` (0 before its first sample)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert name.removesuffix("_total") in families, f"{name} not exported"
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and s.labels.get("model") == model
    )


@pytest.mark.vllm
def test_vllm_computes_a_pairs_shared_prompt_once_with_unchanged_logprobs(vllm_server, vllm_client, reference):
    """Pairs whose answers share a long prompt (and some share leading answer tokens, which the prefix
    cache then also covers): the second answer reads the prompt from the cache, and every answer's
    log-probs still equal a plain forward's."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "review", "movie", "plot", "actor", "scene", "great"]
    items = []
    for n in range(6):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(60, 90)))
        chosen = " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
        common = " ".join(chosen.split()[: rng.choice([0, 3, 20])])  # leading words the two answers share
        rejected = (common + " " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))).strip()
        items += [score_item(prompt, chosen, item_id=f"{n}c"), score_item(prompt, rejected, item_id=f"{n}r")]
    port = int(vllm_server.env["OFFDPO_REFSCORE_METRICS_PORT"])
    model = vllm_client.model_info().fingerprint.fingerprint_id  # the series of the model that scored
    before = _counter(port, "refscore_engine_shared_prompt_tokens_total", model)
    response = vllm_client.score(items)
    shared = _counter(port, "refscore_engine_shared_prompt_tokens_total", model) - before
    assert response.fingerprint.fingerprint_id == model
    _check_parity(response.items, reference)
    prompt_tokens = sum(len(i.prompt_token_ids) for i in response.items[1::2])
    # The cache works in whole blocks (128 tokens on CPU): with prompts of ~200-300 tokens at least a
    # third of the second answers' prompt tokens are read from it.
    assert shared >= prompt_tokens / 3, f"{shared} of {prompt_tokens} shared prompt tokens read from the cache"
