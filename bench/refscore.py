"""Benchmark: reference log-probs for the same (prompt, answer) items three ways, in one run.

  (a) refscore end to end over gRPC (vLLM engine; the client sends Score requests of 64 items, 4 in flight)
  (b) the original recipe: vLLM's OpenAI-compatible server, one chat request per item with
      max_tokens=1 and prompt_logprobs=1, through the `openai` client, one after another
  (c) a transformers forward pass in padded batches with a full log-softmax (what TRL's
      precompute_ref_log_probs does)

tokens/s counts prompt+answer tokens per second of wall time (the same tokens for all three).
Parity: per-token and per-answer-sum differences of (b) and (c) against (a). By default one run in
bfloat16 (the throughput keys: AMX on this CPU, bf16 on GPUs) and one in float32 (the parity keys).

    make bench-refscore          # writes bench/results/refscore.json
    python -m bench.refscore --items 256 --size bench [--dtypes bfloat16,float32] [--short]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "refscore.json"
WORDS = ("the model answer question reason step compute value number list sort python code function return "
         "reward policy reference prefer good bad better explain why how first second then finally sum").split()


def make_items(n: int, seed: int = 0, short: bool = False) -> list[tuple[list[tuple[str, str]], str]]:
    """Prompts of 20-120 words and answers of 60-360 words (short: 5-30 and 5-60)."""
    rng = random.Random(seed)
    prompt_words, answer_words = ((5, 30), (5, 60)) if short else ((20, 120), (60, 360))
    items = []
    for _ in range(n):
        prompt = [("system", "You are a helpful assistant."),
                  ("user", " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))))]
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*answer_words)))
        items.append((prompt, answer))
    return items


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_refscore(model_dir: Path, items, log_dir: Path, dtype: str) -> dict:
    from offdpo.stack import free_port
    from services.refscore.client import RefscoreClient, score_item

    port = free_port()
    env = {**os.environ, "OFFDPO_REFSCORE_MODEL_DIR": str(model_dir), "OFFDPO_REFSCORE_PORT": str(port),
           "OFFDPO_REFSCORE_METRICS_PORT": "0", "OFFDPO_REFSCORE_MAX_MODEL_LEN": "2048", "OFFDPO_REFSCORE_DTYPE": dtype, "PYTHONPATH": str(REPO),
           "OFFDPO_REFSCORE_PLAINTEXT": "true", "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true"}  # local benchmark
    proc = subprocess.Popen([sys.executable, "-m", "services.refscore", "serve"], env=env, cwd=REPO,
                            stdout=open(log_dir / "bench-refscore.log", "wb"), stderr=subprocess.STDOUT)
    try:
        with RefscoreClient(f"127.0.0.1:{port}") as client:
            client.wait_serving(timeout_s=600)
            client.score([score_item(p, a) for p, a in items[:8]])  # warm-up
            batches = [items[i:i + 64] for i in range(0, len(items), 64)]
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda b: client.score([score_item(p, a) for p, a in b], timeout=1200),
                                          batches))
            elapsed = time.perf_counter() - t0
            fingerprint = responses[0].fingerprint
        scored = [it for r in responses for it in r.items]
        tokens = sum(len(it.prompt_token_ids) + len(it.answer_token_ids) for it in scored)
        return {"elapsed_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed, "items": scored,
                "fingerprint": fingerprint}
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def bench_openai(model_dir: Path, items, reference_items, log_dir: Path, dtype: str) -> dict:
    from openai import OpenAI

    from offdpo.openai_server import OpenAIServer

    with OpenAIServer(model_dir, served_model_name="ref", max_model_len=2048, dtype=dtype,
                      log_path=log_dir / "bench-openai.log",
                      env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}) as server:
        client = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=600)

        def one(prompt, answer):
            messages = [{"role": r, "content": c} for r, c in prompt] + [{"role": "assistant", "content": answer}]
            # The recipe's second method: <x, y> as messages, max_tokens=1, prompt_logprobs=1.
            resp = client.chat.completions.create(model="ref", messages=messages, max_tokens=1, logprobs=True,
                                                  extra_body={"prompt_logprobs": 1, "add_generation_prompt": False,
                                                              "continue_final_message": False})
            return resp.model_extra["prompt_logprobs"]

        one(*items[0])  # warm-up
        t0 = time.perf_counter()
        results = [one(p, a) for p, a in items]
        elapsed = time.perf_counter() - t0
    # Read y's positions with refscore's token ids (the same chat template and tokenizer).
    per_item, missing = [], 0
    for ref, plps in zip(reference_items, results):
        start = len(ref.prompt_token_ids)
        lps = []
        for i, tok in enumerate(ref.answer_token_ids):
            entry = plps[start + i] if start + i < len(plps) and plps[start + i] else {}
            if str(tok) in entry:
                lps.append(entry[str(tok)]["logprob"])
            else:
                lps.append(None)
                missing += 1
        per_item.append(lps)
    tokens = sum(len(r.prompt_token_ids) + len(r.answer_token_ids) for r in reference_items)
    return {"elapsed_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed, "logprobs": per_item,
            "tokens_not_aligned": missing}


def bench_transformers(model_dir: Path, reference_items, dtype: str, batch_size: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    seqs = [(list(r.prompt_token_ids), list(r.answer_token_ids)) for r in reference_items]

    def run(batch):
        longest = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, a) in enumerate(batch):
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            mask[row, :len(p) + len(a)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return [logps[row, len(p) - 1:len(p) - 1 + len(a)].tolist() for row, (p, a) in enumerate(batch)]

    run(seqs[:batch_size])  # warm-up
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(seqs), batch_size):
        out += run(seqs[i:i + batch_size])
    elapsed = time.perf_counter() - t0
    tokens = sum(len(p) + len(a) for p, a in seqs)
    return {"elapsed_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed, "logprobs": out,
            "torch_threads": torch.get_num_threads()}


def parity(reference_items, other: list[list[float | None]]) -> tuple[float, float]:
    max_tok = max_sum = 0.0
    for ref, lps in zip(reference_items, other):
        pairs = [(a, b) for a, b in zip(ref.token_logprobs, lps) if b is not None]
        if pairs:
            max_tok = max(max_tok, max(abs(a - b) for a, b in pairs))
        if len(pairs) == len(ref.token_logprobs):
            max_sum = max(max_sum, abs(sum(a for a, _ in pairs) - sum(b for _, b in pairs)))
    return max_tok, max_sum


def run_once(model_dir: Path, items, log_dir: Path, dtype: str) -> dict:
    """(a), (b) and (c) on the same items in one dtype; parity of (b) and (c) against (a)."""
    a = bench_refscore(model_dir, items, log_dir, dtype)
    print(f"[{dtype}] (a) refscore over gRPC:            {a['tokens_per_s']:8.0f} tokens/s ({a['elapsed_s']:.1f} s)", flush=True)
    b = bench_openai(model_dir, items, a["items"], log_dir, dtype)
    print(f"[{dtype}] (b) OpenAI server, prompt_logprobs: {b['tokens_per_s']:8.0f} tokens/s ({b['elapsed_s']:.1f} s)", flush=True)
    c = bench_transformers(model_dir, a["items"], dtype)
    print(f"[{dtype}] (c) transformers batched forward:  {c['tokens_per_s']:8.0f} tokens/s ({c['elapsed_s']:.1f} s)", flush=True)
    tok_b, sum_b = parity(a["items"], b["logprobs"])
    tok_c, sum_c = parity(a["items"], c["logprobs"])
    return {
        "tokens_per_s": {"refscore": a["tokens_per_s"], "openai_prompt_logprobs": b["tokens_per_s"],
                         "transformers": c["tokens_per_s"]},
        "speedup_vs_openai": a["tokens_per_s"] / b["tokens_per_s"],
        "speedup_vs_transformers": a["tokens_per_s"] / c["tokens_per_s"],
        "max_abs_token_diff": max(tok_b, tok_c),
        "max_abs_sum_diff": max(sum_b, sum_c),
        "parity_detail": {"openai_vs_refscore": {"token": tok_b, "sum": sum_b,
                                                 "tokens_not_aligned": b["tokens_not_aligned"]},
                          "transformers_vs_refscore": {"token": tok_c, "sum": sum_c}},
        "tokens": a["tokens"], "torch_threads": c["torch_threads"], "fingerprint": a["fingerprint"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--size", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="one run per dtype; throughput keys from the first, parity keys from float32")
    parser.add_argument("--short", action="store_true", help="short items (chat-style answers of 5-60 words)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    from offdpo.testmodel import ensure_test_model

    model_dir = ensure_test_model(REPO / ".cache" / "models" / args.size, size=args.size)
    log_dir = REPO / ".cache" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    items = make_items(args.items, short=args.short)
    print(f"model {model_dir} ({args.size}), {len(items)} items", flush=True)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    runs = {dtype: run_once(model_dir, items, log_dir, dtype) for dtype in dtypes}
    head = runs[dtypes[0]]
    exact = runs.get("float32", head)

    import torch
    import transformers

    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    result = {
        "tokens_per_s": head["tokens_per_s"],
        "speedup_vs_openai": head["speedup_vs_openai"],
        "speedup_vs_transformers": head["speedup_vs_transformers"],
        "max_abs_token_diff": exact["max_abs_token_diff"],
        "max_abs_sum_diff": exact["max_abs_sum_diff"],
        "headline": {"throughput_dtype": dtypes[0], "parity_dtype": "float32" if "float32" in runs else dtypes[0]},
        "runs": {d: {k: v for k, v in r.items() if k != "fingerprint"} for d, r in runs.items()},
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores (no GPU)",
        "model": f"offdpo.testmodel size={args.size}: Qwen2, {params / 1e6:.1f}M parameters",
        "workload": {"items": len(items), "tokens": head["tokens"], "short_items": args.short,
                     "refscore_client": "Score requests of 64 items, 4 in flight",
                     "openai_client": "one chat request per item, sequential, max_tokens=1, prompt_logprobs=1; "
                                      "same engine settings as refscore (VLLM_CPU_NUM_OF_RESERVED_CPU=0)",
                     "transformers": f"padded batches of 8, full log_softmax, {head['torch_threads']} torch threads"},
        "versions": {"vllm": head["fingerprint"].engine_version, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "speedup_vs_openai", "speedup_vs_transformers",
                                              "max_abs_token_diff", "max_abs_sum_diff")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
