"""`offdpo eval`: how good is a policy at what the preferences asked for, and how far has it moved?

Samples one continuation per held-out review opening (`localdev.reviews.review_prompts(split=
"held_out")`, never used to make pairs) from the policy at temperature 1 with no top-k/top-p (the
policy's own distribution: transformers' default top-k 50 would bias the KL estimate), then reports,
each as a mean with its standard error over the samples:

- the ground-truth reward (`localdev.reviews.reward`: positive minus negative adjectives per word)
  and the share of positive samples;
- KL(policy || reference), estimated as the mean over samples of the summed per-token log-ratio
  log pi(y|x) - log ref(y|x), the policy's log-probs taken while sampling (log-softmax of the raw
  logits), the reference's from refscore `Score` on the exact prompt and answer token ids
  (`--refscore HOST:PORT`) or from a local transformers copy of the reference (`--reference DIR`).

    offdpo eval CHECKPOINT_DIR --reference REF_DIR [--refscore 127.0.0.1:50051] [--samples 400]
    offdpo eval --run RUN_NAME ...     # the run's latest checkpoint, downloaded from S3 (OFFDPO_S3_*)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from localdev.experiment import evaluate_policy, format_result, mean_se

__all__ = ["evaluate_policy", "format_result", "mean_se", "main", "add_parser"]


def download_run_checkpoint(run_name: str, dest: Path) -> Path:
    """The latest checkpoint of a trainer run, from S3 (OFFDPO_S3_* settings), through the trainer's
    own checkpoint helpers (the same pointer and path checks as a resume)."""
    import os

    from offdpo.config import S3Config
    from offdpo.s3 import ObjectStore
    from services.trainer.checkpoint import download_model, latest_checkpoint

    store = ObjectStore(S3Config.from_env(os.environ))
    prefix = latest_checkpoint(store, run_name)
    if prefix is None:
        raise FileNotFoundError(f"run {run_name!r} has no checkpoint in s3://{store.bucket}/")
    return download_model(store, prefix, dest)


def main(args) -> int:
    if bool(args.checkpoint) == bool(args.run):
        print("offdpo eval: give a checkpoint directory or --run NAME (one of them)", file=sys.stderr)
        return 2
    policy_dir = Path(args.checkpoint) if args.checkpoint else None
    if args.run:
        policy_dir = download_run_checkpoint(args.run, Path(args.download_dir) / args.run)
    reference = args.reference
    if reference is None and not args.refscore:
        from localdev.pretrain import ensure_reviews_model

        reference = str(ensure_reviews_model(args.cache))
    result = evaluate_policy(
        policy_dir, reference, args.refscore, samples=args.samples, seed=args.seed, max_new_tokens=args.max_new_tokens
    )
    print(format_result(result))
    for ex in result["examples"]:
        print(f"  {ex['prompt']!r} -> {ex['continuation']!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="sample a policy on held-out prompts: ground-truth reward and KL(policy || reference)",
        description=__doc__,
    )
    p.add_argument("checkpoint", nargs="?", help="a Hugging Face model directory (a downloaded checkpoint)")
    p.add_argument("--run", help="instead: the latest checkpoint of this trainer run, from S3")
    p.add_argument("--download-dir", default=".cache/eval", help="where --run downloads the checkpoint")
    p.add_argument("--reference", help="reference model directory (default: the review-language reference)")
    p.add_argument(
        "--refscore",
        help="HOST:PORT of a plaintext refscore serving the reference: its Score gives the reference log-probs",
    )
    p.add_argument("--cache", default=".cache/models", help="model cache for the default reference")
    p.add_argument("--samples", type=int, default=400, help="held-out prompts, one sample each (>= 400 for the report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(fn=main)
