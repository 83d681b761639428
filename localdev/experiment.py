"""Shared pieces of the learning experiment (`offdpo demo`, `offdpo eval`, `make bench-learning`,
tests/test_learning.py), kept here because cli/ and bench/ are independent top layers: policy
evaluation against the ground truth with KL to the reference, quiet third-party logs, candidate
files for on-policy labelling, labelers fanned out over threads, and the test-only pair swap.

Policy evaluation (`evaluate_policy`): one continuation per held-out review opening
(`localdev.reviews.review_prompts(split="held_out")`, never used to make pairs), sampled from the
policy at temperature 1 with no top-k/top-p (the policy's own distribution: transformers' default
top-k 50 would bias the KL estimate); reported as means with standard errors over the samples: the
ground-truth reward (`localdev.reviews.reward`) and the share of positive samples, and
KL(policy || reference) estimated as the mean over samples of the summed per-token log-ratio, the
policy's log-probs taken while sampling, the reference's from refscore `Score` on the exact prompt and
answer token ids or from a local transformers copy of the reference.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from offdpo import errors


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    if len(values) < 2:
        return (float(values[0]) if values else 0.0), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def local_reference_logprobs(reference, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 64):
    """Summed log-probs of each answer after its prompt under a transformers model (right padding:
    causal attention never lets a real token see the padding after it)."""
    import torch

    sums: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ps, ans = prompts[start : start + batch_size], answers[start : start + batch_size]
            seqs = [p + a for p, a in zip(ps, ans)]
            batch = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
            for i, s in enumerate(seqs):
                batch[i, : len(s)] = torch.tensor(s)
            logps = torch.log_softmax(reference(input_ids=batch).logits.float(), -1)
            for i, (p, a) in enumerate(zip(ps, ans)):
                positions = torch.arange(len(p) - 1, len(p) - 1 + len(a))
                sums.append(float(logps[i, positions, torch.tensor(a)].sum()))
    return sums


def refscore_reference_logprobs(address: str, prompts: list[list[int]], answers: list[list[int]], chunk: int = 64):
    """Summed log-probs from refscore's Score RPC, given the exact prompt and answer token ids (no
    re-tokenisation on either side); checks that the ids it scored are the ids sent."""
    from offdpo.refscore_client import RefscoreClient
    from offdpo.v1 import records_pb2, refscore_pb2

    sums: list[float] = []
    with RefscoreClient(address) as client:
        client.wait_serving(timeout_s=300)
        for start in range(0, len(prompts), chunk):
            items = []
            for p, a in zip(prompts[start : start + chunk], answers[start : start + chunk]):
                item = refscore_pb2.ScoreItem(prompt=records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=p)))
                item.answer_token_ids.ids.extend(a)
                items.append(item)
            resp = client.score(items)
            for item, a in zip(resp.items, answers[start : start + chunk]):
                if list(item.answer_token_ids) != list(a):
                    raise RuntimeError("refscore scored other answer ids than the ones sent")
                sums.append(float(item.logprob_sum))
    return sums


class IncompleteModel(errors.OffdpoError, RuntimeError):
    """A causal LM that loaded with weights missing (e.g. an untied lm_head): sampling from it would
    draw from uninitialised weights, so evaluation refuses it."""

    error_type = "incomplete_model"


def load_causal_lm(model_dir: str | Path):
    """A causal LM in float32 for sampling and scoring, refused (IncompleteModel) when any weight did
    not come from the checkpoint. transformers only warns and leaves such weights uninitialised: with
    weight tying switched off process-wide by loads overlapping in threads (see
    services/labeler/reward.py), the tied lm_head stayed uninitialised and sampling raised
    "probability tensor contains inf/nan" far from the cause."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise IncompleteModel(
            f"{model_dir}: weights missing after loading: {sorted(info['missing_keys'])} (a tied lm_head missing "
            f"means weight tying was off in this process: transformers models loaded concurrently in threads?)"
        )
    return model.eval()


def evaluate_policy(
    policy_dir: str | Path,
    reference_dir: str | Path | None = None,
    refscore: str | None = None,
    samples: int = 400,
    seed: int = 0,
    max_new_tokens: int = 96,
    examples: int = 3,
) -> dict:
    """Sample `samples` held-out continuations from the policy; ground-truth reward and KL to the reference."""
    from transformers import AutoTokenizer

    from localdev import reviews
    from localdev.pretrain import prompt_ids, sample_continuations

    if refscore is None and reference_dir is None:
        raise ValueError("KL needs the reference: give a reference directory or a refscore address")
    started = time.monotonic()
    policy = load_causal_lm(policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    openings = reviews.review_prompts(samples, seed=seed, split="held_out")
    drawn = [
        s[0] for s in sample_continuations(policy, tokenizer, openings, k=1, max_new_tokens=max_new_tokens, seed=seed)
    ]
    prompts = [prompt_ids(tokenizer, o) for o in openings]
    answers = [s["ids"] for s in drawn]
    if refscore:
        ref = refscore_reference_logprobs(refscore, prompts, answers)
        source = f"refscore {refscore}"
    else:
        reference = load_causal_lm(reference_dir)
        ref = local_reference_logprobs(reference, prompts, answers)
        source = f"transformers {reference_dir}"
    texts = [s["text"] for s in drawn]
    kl = [sum(s["logprobs"]) - r for s, r in zip(drawn, ref)]
    share, share_se = mean_se([float(reviews.is_positive(t)) for t in texts])
    reward, reward_se = mean_se([reviews.reward(t) for t in texts])
    kl_mean, kl_se = mean_se(kl)
    return {
        "policy": str(policy_dir),
        "reference_logprobs": source,
        "samples": len(texts),
        "seed": seed,
        "positive_share": round(share, 4),
        "positive_share_se": round(share_se, 4),
        "reward_mean": round(reward, 5),
        "reward_se": round(reward_se, 5),
        "kl": round(kl_mean, 4),
        "kl_se": round(kl_se, 4),
        "consistency": round(reviews.consistency(texts), 4),
        "stopped_share": round(statistics.fmean(float(a[-1] == tokenizer.eos_token_id) for a in answers), 4),
        "mean_answer_tokens": round(statistics.fmean(len(a) for a in answers), 2),
        "examples": [{"prompt": o, "continuation": t} for o, t in zip(openings[:examples], texts[:examples])],
        "wall_s": round(time.monotonic() - started, 1),
    }


def format_result(r: dict) -> str:
    return (
        f"positive share {r['positive_share']:.3f} +- {r['positive_share_se']:.3f}   "
        f"reward {r['reward_mean']:+.4f} +- {r['reward_se']:.4f}   "
        f"KL {r['kl']:.3f} +- {r['kl_se']:.3f} nats   ({r['samples']} samples)"
    )


def quiet_third_party_logs(verbose: bool) -> None:
    """kafka-python logs every connection at INFO (about 200 lines a run): WARNING unless asked.
    Also transformers' weight-loading progress bars."""
    if not verbose:
        for name in ("kafka", "urllib3", "botocore", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def stack_up_quietly(stack, verbose: bool) -> None:
    """Start the local stack; its readiness probe's refused connections are not errors worth showing."""
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    if not verbose:
        kafka_log.setLevel(logging.CRITICAL)
    try:
        stack.up()
    finally:
        kafka_log.setLevel(level)


def write_candidates(path: Path, openings: Sequence[str], k: int, strategy: str = "reward_model") -> None:
    """Candidate sets with a chat prompt (the opening) and no answers: the labeler generates k each."""
    with path.open("w") as f:
        for i, opening in enumerate(openings):
            obj = {
                "id": f"review-{i}",
                "prompt": [{"role": "user", "content": opening}],
                "answers": [],
                "generate_n": k,
                "strategy": strategy,
            }
            f.write(json.dumps(obj) + "\n")


class NegatedRewardModel:
    """A reward model that scores every answer with the opposite sign, so the labeler publishes the
    worst answer as chosen. Test-only (`swap=True` in the demo's and the bench's labelling): it shows
    that the learning checks fail when chosen and rejected are swapped."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def score_texts(self, texts):
        return [-s for s in self._model.score_texts(texts)]


def fan_out(work: Callable[[int, Path], dict], files: Sequence[Path]) -> dict:
    """work(i, file) for each file in its own thread (labelers wait on refscore's Generate most of the
    time); the per-strategy summaries they return, summed. The first error is re-raised."""
    results: list[dict] = []
    errors: list[BaseException] = []

    def run(i: int, path: Path) -> None:
        try:
            results.append(work(i, path))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    total: dict[str, dict[str, int]] = {}
    for summary in results:
        for strategy, counts in summary.items():
            for key, value in counts.items():
                total.setdefault(strategy, {}).setdefault(key, 0)
                total[strategy][key] += value
    return total
