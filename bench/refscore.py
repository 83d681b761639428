"""Benchmark: reference log-probs of the same items by every method, per model and dtype, in one run.

Methods (all on the same 256 (prompt, answer) items = 128 preference pairs):
  (a)  refscore over gRPC: its own process; the client (this process) sends Score requests of 64
       items, 4 in flight
  (a') refscore's stream path: the same 128 pairs produced to Kafka, scored by the stream worker in
       the same refscore process, written as Parquet shards to S3; timed from the first send to the
       last shard-ready event
  (b)  the original recipe: vLLM's OpenAI-compatible server with its default engine settings, one
       chat request per item, max_tokens=1, prompt_logprobs=1, sequential, through the `openai` client
  (b') the same server with 8 concurrent clients (the fairest form of the recipe)
  (c)  a transformers forward in padded batches of 8 with a full log-softmax (what TRL's
       precompute_ref_log_probs does)
  (d)  the machine's ceiling: fp32 and bf16 GEMM GFLOP/s (bench/ceiling.py), measured in this run

tokens/s counts prompt+answer tokens per second of wall time (the same tokens for every method;
(a') scores each pair's prompt twice, as (a) does). A method whose run takes under 3 s is run again
(at most 3 runs) and its median counts; (a') runs once. FLOP per item, for the fraction of the ceiling:
2 x (every linear layer's weights, lm_head included) per token, plus causal attention
2 x layers x q_dim x L x (L+1) per sequence of L tokens (QK^T and PV over the lower triangle only:
useful work, not what a padded kernel spends). Embedding lookups, norms and softmax are not counted.

Parity: per-token and per-answer-sum differences of (b) and (c) against (a) in the same dtype; the
bfloat16 runs also carry their difference to refscore's float32 scores on the same items.

    make bench-refscore          # every model and dtype; writes bench/results/refscore.{json,png}
    python -m bench.refscore --models bench --dtypes float32 --pairs 32   # a quick look
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.machine import cpu_name

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "refscore.json"
METHODS = ("refscore", "refscore_stream", "openai_prompt_logprobs", "openai_concurrent", "transformers")
WORDS = [
    "the",
    "model",
    "answer",
    "question",
    "reason",
    "step",
    "because",
    "therefore",
    "first",
    "second",
    "then",
    "finally",
    "compute",
    "value",
    "number",
    "list",
    "sort",
    "python",
    "code",
    "function",
    "return",
    "true",
    "false",
    "data",
    "train",
    "reward",
    "policy",
    "reference",
    "prefer",
    "chosen",
    "rejected",
    "good",
    "bad",
    "better",
    "worse",
    "helpful",
    "explain",
    "why",
    "how",
    "what",
    "when",
    "where",
    "which",
    "pi",
    "circle",
    "radius",
    "area",
    "sum",
    "product",
    "prime",
    "even",
    "odd",
    "add",
    "multiply",
    "divide",
    "result",
    "check",
    "test",
    "example",
    "output",
    "input",
    "json",
    "key",
    "error",
    "fix",
    "bug",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]
PROMPT_TOKENS = (20, 200)
ANSWER_TOKENS = (50, 800)


# -- workload -------------------------------------------------------------------------------------
def _text_of_tokens(tokenizer, rng: random.Random, n_tokens: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens + 8))
    return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]).strip()


def _long_tail(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int]) -> int:
    return int(min(bounds[1], max(bounds[0], round(rng.lognormvariate(math.log(median), sigma)))))


def make_pairs(tokenizer, n_pairs: int = 128, seed: int = 0) -> list[tuple[list[tuple[str, str]], str, str]]:
    """Deterministic (prompt, chosen, rejected): user prompts of 20-200 tokens, answers of 50-800 tokens
    with a long tail (log-normal, median 180), lengths counted with `tokenizer`."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = [
            ("system", "You are a helpful assistant."),
            ("user", _text_of_tokens(tokenizer, rng, _long_tail(rng, 70, 0.6, PROMPT_TOKENS))),
        ]
        chosen, rejected = (
            _text_of_tokens(tokenizer, rng, _long_tail(rng, 180, 0.75, ANSWER_TOKENS)) for _ in range(2)
        )
        pairs.append((prompt, chosen, rejected))
    return pairs


def items_of(pairs):
    return [(prompt, answer) for prompt, chosen, rejected in pairs for answer in (chosen, rejected)]


# -- FLOP count -----------------------------------------------------------------------------------
def model_flops(model_dir: Path):
    """(params, linear_params, flop(L) for one sequence of L tokens) from the model's config."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * inter
    linear = layers * per_layer + hidden * cfg["vocab_size"]
    embed = 0 if cfg.get("tie_word_embeddings") else hidden * cfg["vocab_size"]
    qkv_bias = layers * (q_dim + 2 * kv_dim) if cfg.get("model_type") == "qwen2" else 0  # Qwen2: q/k/v biases
    params = linear + embed + qkv_bias + layers * 2 * hidden + hidden  # + norms

    def flop(length: int) -> float:
        return 2.0 * linear * length + 2.0 * layers * q_dim * length * (length + 1)

    return params, linear, flop


def timed(fn, min_total_s: float = 3.0, max_runs: int = 3):
    """(median seconds, last result) of fn over runs until min_total_s has passed (at most max_runs):
    one run for every method on the bench model, a few for the sub-second runs of the tiny model."""
    times, total = [], 0.0
    while True:
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
        if total >= min_total_s or len(times) >= max_runs:
            return sorted(times)[len(times) // 2], result


# -- (a) and (a'): refscore -------------------------------------------------------------------------
def bench_refscore(model_dir: Path, pairs, dtype: str, stack, log_dir: Path) -> dict:
    from localdev.process import free_port, stop_process
    from offdpo.kafka import ensure_topics, make_producer
    from offdpo.records import ShardReady, chat_prompt, make_pair
    from offdpo.refscore_client import RefscoreClient, score_item

    items = items_of(pairs)
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "OFFDPO_TOPIC_PAIRS": f"bench.pairs.{suffix}",
        "OFFDPO_TOPIC_SHARDS": f"bench.shards.{suffix}",
        "OFFDPO_TOPIC_DEADLETTER": f"bench.dead.{suffix}",
    }
    ensure_topics(stack.kafka, topics.values(), partitions=1)
    port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        **topics,
        "OFFDPO_REFSCORE_GROUP": f"bench-{suffix}",
        "OFFDPO_REFSCORE_MODEL_DIR": str(model_dir),
        "OFFDPO_REFSCORE_PORT": str(port),
        "OFFDPO_REFSCORE_METRICS_PORT": "0",
        "OFFDPO_REFSCORE_MAX_MODEL_LEN": "2048",
        "OFFDPO_REFSCORE_DTYPE": dtype,
        "PYTHONPATH": str(REPO),
        "OFFDPO_REFSCORE_PLAINTEXT": "true",
        "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
    }  # local benchmark
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.refscore", "serve", "--worker"],
        env=env,
        cwd=REPO,
        stdout=open(log_dir / f"refscore-{model_dir.name}-{dtype}.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with RefscoreClient(f"127.0.0.1:{port}") as client:
            client.wait_serving(timeout_s=600)
            info = client.model_info()
            client.score([score_item(p, a) for p, a in items[:8]])  # warm-up
            batches = [items[i : i + 64] for i in range(0, len(items), 64)]

            def score_all():
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    return list(
                        pool.map(lambda b: client.score([score_item(p, a) for p, a in b], timeout=1800), batches)
                    )

            grpc_s, responses = timed(score_all)
        scored = [it for r in responses for it in r.items]

        # (a') the same pairs through Kafka -> worker -> Parquet in S3 -> shard-ready event.
        from kafka import KafkaConsumer

        shards = KafkaConsumer(
            topics["OFFDPO_TOPIC_SHARDS"],
            **stack.kafka.client_kwargs(),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        shards.poll(timeout_ms=500)
        producer = make_producer(stack.kafka, "bench")
        records = [make_pair(chat_prompt(p), c, r) for p, c, r in pairs]
        t0 = time.perf_counter()
        for record in records:
            producer.send(topics["OFFDPO_TOPIC_PAIRS"], key=record.pair_id.encode(), value=record.SerializeToString())
        producer.flush()
        rows, keys, deadline = 0, [], time.monotonic() + 1800
        while rows < len(records):
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream path: {rows} of {len(records)} pairs in shards after 1800 s; see {log_dir}")
            for batch in shards.poll(timeout_ms=200).values():
                for message in batch:
                    event = ShardReady.FromString(message.value)
                    rows += event.row_count
                    keys.append(event.object_key)
        stream_s = time.perf_counter() - t0
        producer.close()
        shards.close()
    finally:
        stop_process(proc, 180)
    stream_lps = _read_stream_logprobs(stack, keys)
    tokens = sum(len(it.prompt_token_ids) + len(it.answer_token_ids) for it in scored)
    return {
        "tokens": tokens,
        "grpc_s": grpc_s,
        "stream_s": stream_s,
        "items": scored,
        "stream_matches_grpc": _stream_matches(records, scored, stream_lps),
        "fingerprint": info.fingerprint,
        "engine_settings": dict(info.engine_settings),
    }


def _read_stream_logprobs(stack, keys) -> dict:
    from offdpo.records import read_shard
    from offdpo.s3 import ObjectStore

    store = ObjectStore(stack.s3)
    out = {}
    for key in keys:
        table = read_shard(store.get_bytes(key)).table
        for pid, c, r in zip(
            *(table.column(n).to_pylist() for n in ("pair_id", "chosen_logprobs", "rejected_logprobs"))
        ):
            out[pid] = (c, r)
    return out


def _stream_matches(records, scored, stream_lps) -> float:
    """Largest |difference| between a pair's log-probs from the stream and from gRPC (expected 0)."""
    worst = 0.0
    for i, record in enumerate(records):
        chosen, rejected = stream_lps[record.pair_id]
        for mine, theirs in ((chosen, scored[2 * i].token_logprobs), (rejected, scored[2 * i + 1].token_logprobs)):
            worst = max([worst] + [abs(a - b) for a, b in zip(mine, theirs)])
    return worst


# -- (b) and (b'): the recipe -----------------------------------------------------------------------
def bench_openai(model_dir: Path, items, reference_items, dtype: str, log_dir: Path) -> dict:
    from openai import OpenAI

    from localdev.openai_server import OpenAIServer

    # Default engine settings: nothing but what the CPU needs to start (a memory fraction) and the dtype.
    with OpenAIServer(
        model_dir,
        served_model_name="ref",
        max_model_len=2048,
        dtype=dtype,
        log_path=log_dir / f"openai-{model_dir.name}-{dtype}.log",
    ) as server:
        client = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=1800)

        def one(item):
            prompt, answer = item
            messages = [{"role": r, "content": c} for r, c in prompt] + [{"role": "assistant", "content": answer}]
            # The recipe's second method: <x, y> as messages, max_tokens=1, prompt_logprobs=1.
            resp = client.chat.completions.create(
                model="ref",
                messages=messages,
                max_tokens=1,
                logprobs=True,
                extra_body={"prompt_logprobs": 1, "add_generation_prompt": False, "continue_final_message": False},
            )
            return resp.model_extra["prompt_logprobs"]

        def concurrently():
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                return list(pool.map(one, items))

        one(items[0])  # warm-up
        sequential_s, results = timed(lambda: [one(it) for it in items])
        concurrent_s, _ = timed(concurrently)
    # Read y's positions with refscore's token ids (the same chat template and tokenizer).
    per_item, missing = [], 0
    for ref, plps in zip(reference_items, results):
        start = len(ref.prompt_token_ids)
        lps = []
        for i, tok in enumerate(ref.answer_token_ids):
            entry = plps[start + i] if start + i < len(plps) and plps[start + i] else {}
            lps.append(entry[str(tok)]["logprob"] if str(tok) in entry else None)
            missing += str(tok) not in entry
        per_item.append(lps)
    return {
        "sequential_s": sequential_s,
        "concurrent_s": concurrent_s,
        "logprobs": per_item,
        "tokens_not_aligned": missing,
    }


# -- (c): transformers ------------------------------------------------------------------------------
def padded_forward_logprobs(model, seqs, device: str = "cpu", batch_size: int = 8) -> list[list[float]]:
    """What TRL's precompute does: right-padded batches, one forward, a full log-softmax, the gather."""
    import torch

    out = []
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        longest = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, a) in enumerate(batch):
            ids[row, : len(p) + len(a)] = torch.tensor(list(p) + list(a))
            mask[row, : len(p) + len(a)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
        out += [logps[row, len(p) - 1 : len(p) - 1 + len(a)].tolist() for row, (p, a) in enumerate(batch)]
    return out


def bench_transformers(model_dir: Path, reference_items, dtype: str, batch_size: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    seqs = [(list(r.prompt_token_ids), list(r.answer_token_ids)) for r in reference_items]
    padded_forward_logprobs(model, seqs[:batch_size], batch_size=batch_size)  # warm-up
    elapsed, out = timed(lambda: padded_forward_logprobs(model, seqs, batch_size=batch_size))
    return {"elapsed_s": elapsed, "logprobs": out, "torch_threads": torch.get_num_threads()}


# -- comparison -------------------------------------------------------------------------------------
def parity(reference_items, other: list[list[float | None]]) -> tuple[float, float]:
    max_tok = max_sum = 0.0
    for ref, lps in zip(reference_items, other):
        pairs = [(a, b) for a, b in zip(ref.token_logprobs, lps) if b is not None]
        if pairs:
            max_tok = max(max_tok, max(abs(a - b) for a, b in pairs))
        if len(pairs) == len(ref.token_logprobs):
            max_sum = max(max_sum, abs(sum(a for a, _ in pairs) - sum(b for _, b in pairs)))
    return max_tok, max_sum


def run_one(model_dir: Path, pairs, dtype: str, stack, log_dir: Path, flop_of, ceiling: dict) -> dict:
    """Every method on one model in one dtype."""
    tag = f"[{model_dir.name} {dtype}]"
    a = bench_refscore(model_dir, pairs, dtype, stack, log_dir)
    tokens, n_items = a["tokens"], len(a["items"])
    flop = sum(flop_of(len(it.prompt_token_ids) + len(it.answer_token_ids)) for it in a["items"])
    b = bench_openai(model_dir, items_of(pairs), a["items"], dtype, log_dir)
    c = bench_transformers(model_dir, a["items"], dtype)
    seconds = {
        "refscore": a["grpc_s"],
        "refscore_stream": a["stream_s"],
        "openai_prompt_logprobs": b["sequential_s"],
        "openai_concurrent": b["concurrent_s"],
        "transformers": c["elapsed_s"],
    }
    tps = {m: tokens / s for m, s in seconds.items()}
    peak = ceiling["bf16" if dtype == "bfloat16" else "fp32"] * 1e9
    for m in METHODS:
        print(
            f"{tag} {m:24s} {tps[m]:9.0f} tokens/s {n_items / 2 / seconds[m]:7.1f} pairs/s "
            f"({seconds[m]:.1f} s, {flop / seconds[m] / peak:.2f} of the ceiling)",
            flush=True,
        )
    tok_b, sum_b = parity(a["items"], b["logprobs"])
    tok_c, sum_c = parity(a["items"], c["logprobs"])
    return {
        "tokens_per_s": tps,
        "pairs_per_s": {m: n_items / 2 / s for m, s in seconds.items()},
        "fraction_of_ceiling": {m: flop / s / peak for m, s in seconds.items()},
        "speedup_vs_openai": tps["refscore"] / tps["openai_prompt_logprobs"],
        "speedup_vs_openai_concurrent": tps["refscore"] / tps["openai_concurrent"],
        "speedup_vs_transformers": tps["refscore"] / tps["transformers"],
        "stream_vs_grpc": tps["refscore_stream"] / tps["refscore"],
        "max_abs_token_diff": max(tok_b, tok_c),
        "max_abs_sum_diff": max(sum_b, sum_c),
        "parity_detail": {
            "openai_vs_refscore": {"token": tok_b, "sum": sum_b, "tokens_not_aligned": b["tokens_not_aligned"]},
            "transformers_vs_refscore": {"token": tok_c, "sum": sum_c},
            "stream_vs_grpc_token": a["stream_matches_grpc"],
        },
        "tokens": tokens,
        "items": n_items,
        "gflop": flop / 1e9,
        "seconds": seconds,
        "engine_settings": a["engine_settings"],
        "transformers_threads": c["torch_threads"],
        "_items": a["items"],
        "_fingerprint": a["fingerprint"],
    }


def targets(by_model: dict) -> list[dict]:
    """The issue's targets, each with the measured figure (None where that run was not made)."""

    def get(model, dtype, *path):
        node = by_model.get(model, {}).get(dtype)
        for key in path:
            node = None if node is None else node.get(key)
        return node

    rows = [
        ("bench float32: refscore / recipe (b)", ">= 3", 3.0, get("bench", "float32", "speedup_vs_openai")),
        (
            "bench float32: refscore / transformers (c)",
            ">= 1.0",
            1.0,
            get("bench", "float32", "speedup_vs_transformers"),
        ),
        (
            "bench float32: refscore fraction of the fp32 ceiling",
            ">= 0.6",
            0.6,
            get("bench", "float32", "fraction_of_ceiling", "refscore"),
        ),
        ("bench bfloat16: refscore / recipe (b)", ">= 10", 10.0, get("bench", "bfloat16", "speedup_vs_openai")),
        (
            "bench bfloat16: per-token |difference| to float32",
            "<= 0.05",
            -0.05,
            get("bench", "bfloat16", "vs_float32", "max_abs_token_diff"),
        ),
        ("tiny float32: refscore / recipe (b)", ">= 5", 5.0, get("tiny", "float32", "speedup_vs_openai")),
        ("bench float32: stream (a') / gRPC (a), pairs/s", ">= 0.8", 0.8, get("bench", "float32", "stream_vs_grpc")),
    ]
    out = []
    for name, text, bound, measured in rows:
        met = None if measured is None else (measured <= -bound if bound < 0 else measured >= bound)
        out.append({"target": name, "wanted": text, "measured": measured, "met": met})
    return out


def chart(by_model: dict, path: Path, device: str, ceiling_gflops: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m, d) for m in by_model for d in by_model[m]]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        values = [by_model[m][d]["tokens_per_s"][method] for m, d in groups]
        bars = ax.bar([g + i * width for g in range(len(groups))], values, width, label=method)
        ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in values], fontsize=6, rotation=90, padding=2)
    # The machine's ceiling for each group: GEMM peak / FLOP per token of that model.
    for g, (m, d) in enumerate(groups):
        run = by_model[m][d]
        peak = ceiling_gflops["bf16" if d == "bfloat16" else "fp32"] * 1e9 / (run["gflop"] * 1e9 / run["tokens"])
        ax.hlines(
            peak,
            g - width / 2,
            g + width * (len(METHODS) - 0.5),
            colors="black",
            linestyles="dashed",
            label="GEMM ceiling" if g == 0 else None,
        )
    ax.set_xticks([g + width * (len(METHODS) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{m} {d}" for m, d in groups])
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log scale)")
    ax.set_title(f"Reference log-probs, 256 items: {device}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- (e) real vocabulary: the long-prompt workload and long answers ------------------------------
LONG_PROMPT_TOKENS = (1000, 3000)
LONG_ANSWER_TOKENS = (50, 400)


def make_long_prompt_pairs(tokenizer, vocab_rows: int, n_pairs: int, seed: int = 0):
    """Deterministic (prompt text, chosen ids, rejected ids): prompts of 1,000-3,000 tokens (retrieval or
    multi-turn context), answers of 50-400 tokens of different lengths. Answer ids are drawn from the
    tokenizer's ids (refscore refuses ids a tokenizer cannot produce); the LM head computes every one
    of the model's rows for each position whatever the ids, so it costs what it costs in a real model."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = _text_of_tokens(tokenizer, rng, rng.randint(*LONG_PROMPT_TOKENS))
        answers = [[rng.randrange(vocab_rows) for _ in range(rng.randint(*LONG_ANSWER_TOKENS))] for _ in range(2)]
        pairs.append((prompt, answers[0], answers[1]))
    return pairs


class PeakRSS:
    """Peak resident memory of a process and its children (vLLM's engine core runs in one), sampled
    every 20 ms while the block runs."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _serve(model_dir: Path, log_path: Path, extra_env: dict) -> tuple[subprocess.Popen, str]:
    from localdev.process import free_port

    port = free_port()
    env = {
        **os.environ,
        "OFFDPO_REFSCORE_MODEL_DIR": str(model_dir),
        "OFFDPO_REFSCORE_PORT": str(port),
        "OFFDPO_REFSCORE_METRICS_PORT": "0",
        "OFFDPO_REFSCORE_MAX_MODEL_LEN": "8192",
        "OFFDPO_REFSCORE_PLAINTEXT": "true",  # local benchmark
        "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
        "PYTHONPATH": str(REPO),
        **extra_env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.refscore", "serve"],
        env=env,
        cwd=REPO,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"127.0.0.1:{port}"


# The configurations compared: what refscore ran before (every answer recomputes its prompt; vLLM's
# 4,096 tokens per step, whose [tokens x vocab] logits are what grows), and today's defaults.
LONG_CONFIGS = {
    "before": {"OFFDPO_REFSCORE_SHARE_PROMPTS": "false", "OFFDPO_REFSCORE_MAX_BATCHED_TOKENS": "4096"},
    "default": {},
}


def bench_long_prompt(model_dir: Path, n_pairs: int, log_dir: Path, memory_answers=(200, 8000)) -> dict:
    """tokens/s on the long-prompt workload (each pair's prompt counted once) per configuration, and the
    peak RSS of the refscore process tree scoring one short-prompt item with a 200- and an 8,000-token
    answer (today's defaults)."""
    from transformers import AutoTokenizer

    from localdev.process import stop_process
    from offdpo.refscore_client import RefscoreClient, score_item

    vocab_rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_ids = len(tokenizer)
    pairs = make_long_prompt_pairs(tokenizer, token_ids, n_pairs)
    items = [
        score_item(p, a, item_id=f"{i}{side}") for i, (p, c, r) in enumerate(pairs) for side, a in (("c", c), ("r", r))
    ]
    out: dict = {"workload": "long_prompt", "pairs": n_pairs, "vocab_rows": vocab_rows, "configs": {}}
    scored_by_config = {}
    for name, extra in LONG_CONFIGS.items():
        proc, target = _serve(model_dir, log_dir / f"refscore-long-{name}.log", extra)
        try:
            with RefscoreClient(target) as client:
                client.wait_serving(timeout_s=900)
                settings = dict(client.model_info().engine_settings)
                client.score(items[:2], timeout=900)  # warm-up (one pair)
                batches = [items[i : i + 8] for i in range(0, len(items), 8)]  # 4 pairs per request

                def score_all(client=client, batches=batches):
                    with concurrent.futures.ThreadPoolExecutor(4) as pool:
                        return [
                            it for r in pool.map(lambda b: client.score(b, timeout=3600), batches) for it in r.items
                        ]

                seconds, scored = timed(score_all, min_total_s=0, max_runs=1)
                row = {"seconds": seconds, "engine_settings": settings}
                if name == "default":
                    memory = {}
                    for n in memory_answers:
                        rng = random.Random(n)
                        item = score_item("Summarise the review.", [rng.randrange(token_ids) for _ in range(n)])
                        with PeakRSS(proc.pid) as rss:
                            client.score([item], timeout=3600)
                        memory[str(n)] = rss.peak
                    row["peak_rss_bytes_by_answer_tokens"] = memory
                    row["rss_growth_bytes"] = memory[str(memory_answers[1])] - memory[str(memory_answers[0])]
        finally:
            stop_process(proc, 180)
        tokens = sum(len(scored[2 * i].prompt_token_ids) for i in range(n_pairs)) + sum(
            len(it.answer_token_ids) for it in scored
        )
        row.update({"tokens": tokens, "tokens_per_s": tokens / seconds})
        out["configs"][name] = row
        scored_by_config[name] = scored
        print(f"(e) long prompt, {name}: {row['tokens_per_s']:.0f} tokens/s (prompt counted once per pair)", flush=True)
    before, default = scored_by_config["before"], scored_by_config["default"]
    out["max_abs_token_diff_default_vs_before"] = max(
        abs(a - b) for x, y in zip(before, default) for a, b in zip(x.token_logprobs, y.token_logprobs)
    )
    out["speedup_vs_before"] = out["configs"]["default"]["tokens_per_s"] / out["configs"]["before"]["tokens_per_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128, help="pairs (items = 2 x pairs)")
    parser.add_argument("--models", default="bench,tiny")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--chart-only", action="store_true", help="redraw the PNG from the --out JSON")
    parser.add_argument("--long-model", default="bench-qwen-vocab", help="(e): the real-vocabulary model ('' skips)")
    parser.add_argument("--long-pairs", type=int, default=16, help="(e): long-prompt pairs")
    parser.add_argument(
        "--long-only", action="store_true", help="run (e) alone and update its section of the --out JSON"
    )
    args = parser.parse_args(argv)
    if args.long_only:
        return _long_only(args)
    if args.chart_only:
        saved = json.loads(Path(args.out).read_text())
        chart(saved["by_model"], Path(args.out).with_suffix(".png"), saved["device"], saved["ceiling_gflops"])
        return 0

    # (b) must run with vLLM's defaults: nothing of refscore's tuning may leak into its environment.
    for name in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"):
        os.environ.pop(name, None)
    import torch
    import transformers
    from transformers import AutoTokenizer

    from localdev.stack import LocalStack
    from localdev.testmodel import ensure_test_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    model_dirs = {m: ensure_test_model(REPO / ".cache" / "models" / m, size=m) for m in models}
    pairs = make_pairs(
        AutoTokenizer.from_pretrained(model_dirs.get("bench", next(iter(model_dirs.values())))), args.pairs
    )
    log_dir = REPO / ".cache" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    ceiling = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bench.ceiling"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
    )
    print(
        f"(d) ceiling: fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s ({ceiling['kernels']})",
        flush=True,
    )

    by_model, model_info = {}, {}
    with tempfile.TemporaryDirectory(prefix="offdpo-bench-") as tmp, LocalStack.for_tests(tmp) as stack:
        for model, model_dir in model_dirs.items():
            params, linear, flop_of = model_flops(model_dir)
            model_info[model] = {"parameters": params, "linear_parameters": linear, "flop_per_token_linear": 2 * linear}
            by_model[model] = {d: run_one(model_dir, pairs, d, stack, log_dir, flop_of, ceiling) for d in dtypes}
            if "float32" in by_model[model]:
                exact = by_model[model]["float32"]["_items"]
                for d, run in by_model[model].items():
                    if d != "float32":
                        tok, total = parity(exact, [list(it.token_logprobs) for it in run["_items"]])
                        run["vs_float32"] = {"max_abs_token_diff": tok, "max_abs_sum_diff": total}
    fingerprint = next(iter(next(iter(by_model.values())).values()))["_fingerprint"]
    for runs in by_model.values():
        for run in runs.values():
            run.pop("_items"), run.pop("_fingerprint")

    device = f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores (no GPU)"
    head_model = "bench" if "bench" in by_model else models[0]
    head = by_model[head_model].get("float32") or next(iter(by_model[head_model].values()))
    result = {
        # The refscore issue's keys: the bench model in float32.
        "tokens_per_s": {k: head["tokens_per_s"][k] for k in ("refscore", "openai_prompt_logprobs", "transformers")},
        "speedup_vs_openai": head["speedup_vs_openai"],
        "speedup_vs_transformers": head["speedup_vs_transformers"],
        "max_abs_token_diff": head["max_abs_token_diff"],
        "max_abs_sum_diff": head["max_abs_sum_diff"],
        "device": device,
        "cores": len(os.sched_getaffinity(0)),
        "model": f"localdev.testmodel size={head_model}: Qwen2, {model_info[head_model]['parameters'] / 1e6:.1f}M parameters",
        "ceiling_gflops": {"fp32": ceiling["fp32"], "bf16": ceiling["bf16"]},
        "ceiling_detail": ceiling,
        "by_model": by_model,
        "models": model_info,
        "targets": targets(by_model),
        "workload": {
            "pairs": len(pairs),
            "items": 2 * len(pairs),
            "prompt_tokens": PROMPT_TOKENS,
            "answer_tokens": ANSWER_TOKENS,
            "timing": "median of runs until 3 s have passed (at most 3); the stream path runs once",
            "refscore_client": "Score requests of 64 items, 4 in flight, client in another process",
            "refscore_stream": "pairs produced to a 1-partition topic; the worker in the refscore process "
            "with its default micro-batch settings; until the last shard-ready event",
            "openai": "one chat request per item, max_tokens=1, prompt_logprobs=1, vLLM's default engine "
            "settings (CPU: one core reserved); sequential, then 8 client threads",
            "transformers": "padded batches of 8, full log_softmax",
            "flop": "2 x linear weights (lm_head included) per token + causal attention "
            "2 x layers x q_dim x L(L+1) per sequence",
        },
        "versions": {
            "vllm": fingerprint.engine_version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    if args.long_model:
        result["long_prompt"] = _run_long(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    chart(by_model, out.with_suffix(".png"), device, result["ceiling_gflops"])
    for row in result["targets"]:
        measured = "not run" if row["measured"] is None else f"{row['measured']:.3g}"
        print(
            f"target {row['target']:55s} {row['wanted']:>8s}  measured {measured:>8s}  "
            f"{'met' if row['met'] else 'NOT met' if row['met'] is False else ''}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _run_long(args) -> dict:
    from bench.machine import stamp
    from localdev.testmodel import ensure_test_model

    model_dir = ensure_test_model(REPO / ".cache" / "models" / args.long_model, size=args.long_model)
    log_dir = REPO / ".cache" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    result = {
        **stamp(),
        "model": f"localdev.testmodel size={args.long_model}",
        **bench_long_prompt(model_dir, args.long_pairs, log_dir),
    }
    growth = result["configs"]["default"]["rss_growth_bytes"]
    result["targets"] = [
        {
            "target": "long prompt tokens/s vs before",
            "wanted": ">= 1.5",
            "measured": result["speedup_vs_before"],
            "met": result["speedup_vs_before"] >= 1.5,
        },
        {
            "target": "peak RSS growth, 200 -> 8,000-token answer",
            "wanted": "< 1 GB",
            "measured": growth / 1e9,
            "met": growth < 1e9,
        },
    ]
    for row in result["targets"]:
        print(
            f"target {row['target']:55s} {row['wanted']:>8s}  measured {row['measured']:.3g}  {'met' if row['met'] else 'NOT met'}"
        )
    return result


def _long_only(args) -> int:
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved["long_prompt"] = _run_long(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote the long_prompt section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
