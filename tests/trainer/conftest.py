"""Helpers for the trainer tests: synthetic scored shards whose reference log-probs come from an
independent transformers float32 forward of the initial policy (the tiny test model)."""

from __future__ import annotations

import random

import pytest
import torch

from offdpo.fingerprint import model_fingerprint
from offdpo.records import ScoredPair, make_pair, scored_pairs_to_parquet, shard_key, text_prompt


def reference_fingerprint(model_dir, **kw):
    import transformers

    return model_fingerprint(
        model_dir, dtype="float32", engine="transformers", engine_version=transformers.__version__, **kw
    )


def synthetic_tokens(n: int, seed: int = 0, min_len: int = 3, max_len: int = 9):
    """Pairs where chosen answers use tokens 100-119 and rejected ones 300-319: learnable by the policy."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [1] + [rng.randrange(400, 900) for _ in range(rng.randint(2, 6))]  # 1 = BOS of the tiny model
        chosen = [rng.randrange(100, 120) for _ in range(rng.randint(min_len, max_len))]
        rejected = [rng.randrange(300, 320) for _ in range(rng.randint(min_len, max_len))]
        out.append((f"{seed}-{i}", prompt, chosen, rejected))
    return out


@torch.no_grad()
def reference_logprobs(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    start = len(prompt)
    return [logp[start - 1 + j, t].item() for j, t in enumerate(answer)]


def scored_pairs(model_dir, tokens, fingerprint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for name, prompt, chosen, rejected in tokens:
        pair = make_pair(text_prompt(f"prompt {name}"), f"chosen {name}", f"rejected {name}")
        lc, lr = reference_logprobs(model, prompt, chosen), reference_logprobs(model, prompt, rejected)
        row = ScoredPair(
            prompt_token_ids=prompt,
            chosen_token_ids=chosen,
            rejected_token_ids=rejected,
            chosen_logprobs=lc,
            rejected_logprobs=lr,
            chosen_logprob_sum=sum(lc),
            rejected_logprob_sum=sum(lr),
        )
        row.pair.CopyFrom(pair)
        row.fingerprint.CopyFrom(fingerprint)
        rows.append(row)
    return rows


def upload_shards(store, rows, fingerprint, topic: str, per_shard: int) -> list[str]:
    keys = []
    for _n, start in enumerate(range(0, len(rows), per_shard)):
        chunk = rows[start : start + per_shard]
        key = shard_key(fingerprint.fingerprint_id, topic, 0, start, start + len(chunk) - 1)
        store.put_bytes(key, scored_pairs_to_parquet(chunk, fingerprint))
        keys.append(key)
    return keys


@pytest.fixture(scope="session")
def ref_fp(tiny_model):
    return reference_fingerprint(tiny_model)


@pytest.fixture(scope="session")
def store(stack):
    from offdpo.s3 import ObjectStore

    s = ObjectStore(stack.s3)
    s.ensure_bucket()
    return s
