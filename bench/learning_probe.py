"""Is the controlled-sentiment experiment's target reachable? A probe outside the pipeline.

    .venv/bin/python -m bench.learning_probe [--cache .cache/models] [--steps 200] [--beta 0.5]

1. Builds (or reuses) the cached review reference model and reward model (localdev.pretrain) and
   prints their build metrics.
2. Samples the reference at temperature 1 (no top-k/top-p) on held-out prompts: positive share
   with its standard error, mean ground-truth reward, sentiment consistency against the corpus's.
3. A DPO sanity probe in plain torch (no pipeline): k samples per held-in prompt from the reference,
   best against worst by the ground-truth rule (or the reward model, --label rm), reference
   log-probs computed once by scoring, sigmoid DPO at --beta for --steps steps; every --eval-every
   steps the policy is sampled on held-out prompts and judged by the ground truth, with the KL to the
   reference estimated as the mean over samples of the summed per-token log-ratio policy/reference.

Writes .cache/bench/learning_probe.json (--out). Single-threaded torch (a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from localdev import reviews
from localdev.pretrain import (
    ensure_reviews_model,
    ensure_reviews_reward_model,
    prompt_ids,
    sample_continuations,
)

REPO = Path(__file__).resolve().parents[1]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    if len(values) < 2:
        return (values[0] if values else 0.0), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def answer_logprobs(
    model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 64
) -> list[torch.Tensor]:
    """Per-token log-probs of each answer after its prompt (right padding; causal attention never sees
    the padding, so no mask is needed)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        width = max(map(len, seqs))
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = torch.tensor(s)
        logps = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        for i, (p, a) in enumerate(zip(prompts[start : start + batch_size], answers[start : start + batch_size])):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(a))
            out.append(logps[i, positions, torch.tensor(a)])
    return out


def evaluate(policy, reference, tokenizer, openings: list[str], seed: int) -> dict:
    """Ground-truth reward, positive share and KL(policy || reference) over one sample per opening."""
    samples = [s[0] for s in sample_continuations(policy, tokenizer, openings, k=1, seed=seed)]
    texts = [s["text"] for s in samples]
    prompts = [prompt_ids(tokenizer, o) for o in openings]
    with torch.inference_mode():
        ref = answer_logprobs(reference, prompts, [s["ids"] for s in samples])
    kl = [sum(s["logprobs"]) - float(r.sum()) for s, r in zip(samples, ref)]
    positive = [float(reviews.is_positive(t)) for t in texts]
    rewards = [reviews.reward(t) for t in texts]
    share, share_se = mean_se(positive)
    reward, reward_se = mean_se(rewards)
    kl_mean, kl_se = mean_se(kl)
    return {
        "samples": len(texts),
        "positive_share": round(share, 4),
        "positive_share_se": round(share_se, 4),
        "reward_mean": round(reward, 5),
        "reward_se": round(reward_se, 5),
        "kl": round(kl_mean, 4),
        "kl_se": round(kl_se, 4),
        "consistency": round(reviews.consistency(texts), 4),
        "mean_answer_tokens": round(statistics.fmean(len(s["ids"]) for s in samples), 2),
        "examples": texts[:3],
    }


def make_pairs(reference, tokenizer, openings: list[str], k: int, seed: int, scorer) -> list[dict]:
    """k reference samples per opening; best against worst by `scorer` (ties give no pair)."""
    pairs = []
    for opening, samples in zip(openings, sample_continuations(reference, tokenizer, openings, k=k, seed=seed)):
        scores = scorer([s["text"] for s in samples], opening)
        best = max(range(k), key=lambda i: (scores[i], -i))
        worst = min(range(k), key=lambda i: (scores[i], i))
        if scores[best] > scores[worst]:
            pairs.append(
                {"prompt": prompt_ids(tokenizer, opening), "chosen": samples[best], "rejected": samples[worst]}
            )
    return pairs


def dpo_probe(args, reference, tokenizer, reward_model_dir: Path) -> dict:
    held_in = reviews.review_prompts(args.pair_prompts, seed=args.seed, split="held_in")
    held_out = reviews.review_prompts(args.eval_samples, seed=args.seed, split="held_out")
    if args.label == "rm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
        rm_tok = AutoTokenizer.from_pretrained(reward_model_dir)

        def scorer(texts, opening):
            rendered = [
                rm_tok.apply_chat_template(
                    [{"role": "user", "content": opening}, {"role": "assistant", "content": t}], tokenize=False
                )
                for t in texts
            ]
            enc = rm_tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                return rm(**enc).logits[:, 0].tolist()
    else:

        def scorer(texts, opening):
            return [reviews.reward(t) for t in texts]

    started = time.monotonic()
    pairs = make_pairs(reference, tokenizer, held_in, args.k, args.seed + 1, scorer)
    prompts = [p["prompt"] for p in pairs] * 2
    answers = [p["chosen"]["ids"] for p in pairs] + [p["rejected"]["ids"] for p in pairs]
    with torch.inference_mode():
        ref = [float(x.sum()) for x in answer_logprobs(reference, prompts, answers)]
    for i, p in enumerate(pairs):
        p["ref_chosen"], p["ref_rejected"] = ref[i], ref[len(pairs) + i]
    truth_agree = statistics.fmean(
        float(reviews.reward(p["chosen"]["text"]) > reviews.reward(p["rejected"]["text"])) for p in pairs
    )
    print(
        f"{len(pairs)} pairs from {len(held_in)} prompts ({time.monotonic() - started:.0f}s); ground truth agrees with {truth_agree:.3f}"
    )

    runs = [train_dpo(args, lr, pairs, reference, tokenizer, held_out) for lr in args.lr]
    return {
        "label": args.label,
        "k": args.k,
        "pairs": len(pairs),
        "pair_prompts": len(held_in),
        "pairs_agree_with_ground_truth": round(truth_agree, 4),
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


def train_dpo(args, lr: float, pairs: list[dict], reference, tokenizer, held_out: list[str]) -> dict:
    """Sigmoid DPO from the reference on fixed pairs with precomputed reference log-probs."""
    started = time.monotonic()
    policy = copy.deepcopy(reference).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(1, args.steps + 1):
        picks = torch.randint(len(pairs), (args.batch_size,), generator=generator).tolist()
        batch = [pairs[i] for i in picks]
        logps = answer_logprobs(
            policy,
            [p["prompt"] for p in batch] * 2,
            [p["chosen"]["ids"] for p in batch] + [p["rejected"]["ids"] for p in batch],
            batch_size=2 * args.batch_size,
        )
        chosen = torch.stack([x.sum() for x in logps[: len(batch)]])
        rejected = torch.stack([x.sum() for x in logps[len(batch) :]])
        ref_chosen = torch.tensor([p["ref_chosen"] for p in batch])
        ref_rejected = torch.tensor([p["ref_rejected"] for p in batch])
        margin = args.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            policy.eval()
            row = {
                "step": step,
                "loss": round(loss.item(), 4),
                "batch_accuracy": round(float((margin > 0).float().mean()), 4),
                **evaluate(policy, reference, tokenizer, held_out, args.seed + 2),
            }
            policy.train()
            curve.append(row)
            print(f"lr {lr}: " + json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
    return {
        "beta": args.beta,
        "lr": lr,
        "batch_size": args.batch_size,
        "curve": curve,
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(REPO / ".cache" / "models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--pair-prompts", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--label", choices=["truth", "rm"], default="truth")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4], help="one DPO run per value, same pairs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--no-dpo", action="store_true", help="only build and measure the reference")
    parser.add_argument("--out", default=str(REPO / ".cache" / "bench" / "learning_probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    ref_dir = ensure_reviews_model(args.cache)
    rm_dir = ensure_reviews_reward_model(args.cache)
    result: dict = {
        "reference_dir": str(ref_dir),
        "reward_model_dir": str(rm_dir),
        "reference_build": json.loads((ref_dir / "metrics.json").read_text()),
        "reward_model_build": json.loads((rm_dir / "metrics.json").read_text()),
        "build_or_reuse_wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps({k: result[k] for k in ("reference_build", "reward_model_build")}, indent=1))
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    held_out = reviews.review_prompts(args.eval_samples, seed=args.seed, split="held_out")
    result["reference_heldout"] = evaluate(reference, reference, tokenizer, held_out, seed=args.seed + 2)
    result["reference_heldout"]["consistency_corpus"] = reviews.corpus_consistency()
    print(json.dumps(result["reference_heldout"], indent=1))
    if not args.no_dpo:
        result["dpo_probe"] = dpo_probe(args, reference, tokenizer, rm_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
