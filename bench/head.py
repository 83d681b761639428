"""Micro-benchmark of the LM head alone: answer log-prob sums, forward + backward, old head vs fused (issue 29).

    python -m bench.head                 # writes bench/results/head.json
    python -m bench.head --quick         # small shapes, one repeat: checks the machinery

Shape (default): 4 pairs x 700 answer tokens (2,800 answer positions), hidden 512 (the trainer benchmark's
bench-qwen-vocab body), vocabulary 151,936 (Qwen2.5's, tied), float32; chunks of 128 MiB of float32 logits
(220 positions), the trainer's default. Every method gets the same hidden states, labels and per-answer
upstream gradient (random, signed: DPO's gradient is one scalar per answer), and runs in this one process,
interleaved, repeats times; the best repeat is reported (the machine is shared), in wall seconds and in the
process's CPU seconds (all threads: the work done, less sensitive to other processes taking the cores).

Methods:
  old                  offdpo.logprobs.gather_token_logprobs(checkpoint=True): each chunk checkpointed, autograd's
                       log-softmax/gather backward, a fresh weight gradient per chunk (the head before issue 29)
  fused                offdpo.logprobs.fused_token_logprobs: one reused logits buffer, in-place row-wise
                       (log-)softmax, the upstream gradient folded into the GEMM operands, one weight-grad buffer
  torch_lce            torch.nn.functional.linear_cross_entropy(reduction="none") with LinearCrossEntropyOptions
                       (batch_chunk_size = the same chunk): torch 2.13's chunked head (negated: a log-prob)
  grad_in_forward      NOT a usable head: the fused loop with the upstream gradient given before the forward
                       (Liger's way, 3 GEMMs). It is what the gradient-in-forward design could gain at most here;
                       for DPO the gradient is known only after both answers' sums, so using it would need one
                       [vocab x hidden] weight-gradient buffer per answer (reported as extra_bytes_needed).
Peak transient bytes: the process's RSS sampled every 2 ms by a thread during the call, minus the RSS before
it (glibc's mmap threshold is fixed at 1 MiB, so every buffer that matters is mmap-ed and returned on free:
RSS follows it; torch has no CPU allocator statistics, and tracemalloc does not see torch); the weight
gradient the call returns is included for every method alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from bench.machine import stamp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHUNK_BYTES = 128 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mmap_large_allocations(threshold: int = 1 << 20) -> None:
    """glibc serves allocations below its (self-raising, up to 32 MiB) mmap threshold from the heap, where
    freed memory stays resident and is reused unseen by RSS; a fixed 1 MiB threshold makes every buffer
    that matters here an mmap of its own, returned on free, so RSS follows it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: buffers of 32 MiB and more are still seen


class PeakRSS:
    """Highest RSS seen while the block runs, minus the RSS at its start (sampled by a thread)."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.peak, self.start = period_s, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        _mmap_large_allocations()
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def transient(self) -> int:
        return self.peak - self.start


def grad_in_forward(h, weight, targets, g_rows, chunk_rows):
    """Liger's way with the upstream per-row gradient known before the forward (a lower bound on its time):
    per chunk one logits GEMM, log-softmax, P, and the two gradient GEMMs; no recompute."""
    import torch

    n, vocab = h.shape[0], weight.shape[0]
    out = torch.empty(n)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(weight)
    buf = torch.empty(min(chunk_rows, n), vocab)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        logits, t, g = buf[: e - s], targets[s:e], g_rows[s:e, None]
        torch.mm(h[s:e], weight.t(), out=logits)
        torch._log_softmax(logits, 1, False, out=logits)
        out[s:e] = logits.gather(1, t[:, None]).squeeze(1)
        logits.exp_()
        gh = h[s:e] * g
        grad_h[s:e] = torch.mm(logits, weight).mul_(-g).add_(weight.index_select(0, t) * g)
        grad_w.addmm_(logits.t(), gh, alpha=-1).index_add_(0, t, gh)
    return out, grad_h, grad_w


def head_peaks(targets, vocab: int, hidden: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, bf16: bool = False) -> dict:
    """The head's transient bytes for one micro-batch's answer tokens `targets`, old head and fused (the
    trainer's defaults: chunk_bytes, checkpointed old head), forward + backward with a per-answer-like
    upstream gradient. Random states and weights of the model's shape: the bytes depend on the shapes only."""
    import contextlib

    import torch

    from offdpo.logprobs import fused_token_logprobs, gather_token_logprobs

    gen = torch.Generator().manual_seed(0)
    targets = torch.as_tensor(targets, dtype=torch.long)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
    h0 = torch.randn(targets.shape[0], hidden, generator=gen)
    g = torch.randn(targets.shape[0], generator=gen)
    chunk_rows = max(1, chunk_bytes // (4 * vocab))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    out = {}
    for name in ("old", "fused"):
        h = h0.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with PeakRSS() as mem:
            with autocast():
                if name == "old":
                    tok = gather_token_logprobs(h, head, targets, chunk_size=chunk_rows, checkpoint=True)
                else:
                    tok = fused_token_logprobs(h, head.weight, None, targets, chunk_rows)
            (tok * g).sum().backward()
            del tok
        out[name] = mem.transient
    head.zero_grad(set_to_none=True)
    return {
        "head_peak_bytes": out["fused"],
        "head_peak_bytes_old": out["old"],
        "head_answer_positions": int(targets.shape[0]),
    }


def backward_elementwise(rows: int, vocab: int, repeats: int = 5) -> dict:
    """Seconds per chunk for the backward's softmax over recomputed logits, three ways: torch's row-wise
    softmax kernel in place (max, sum and write while a row is in cache: the fused head), exp(x - lse) with
    the forward's saved log-sum-exp (two passes over the whole chunk: sub_, exp_), and torch's
    linear_cross_entropy sequence (whole-chunk passes: amax, sub_, exp_, sum, scale). Best of `repeats`."""
    import torch

    x = torch.randn(rows, vocab)
    lse = torch.logsumexp(x, 1, keepdim=True)
    buf = torch.empty_like(x)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            buf.copy_(x)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return {
        "chunk_shape": [rows, vocab],
        "softmax_in_place_s": best(lambda: torch._softmax(buf, 1, False, out=buf)),
        "exp_minus_saved_lse_s": best(lambda: buf.sub_(lse).exp_()),
        # torch.nn.functional.linear_cross_entropy's per-chunk sequence (amax, sub_, exp_ + sum, scale)
        "torch_lce_sequence_s": best(lambda: buf.sub_(buf.amax(1, keepdim=True)).exp_().div_(buf.sum(1, keepdim=True))),
    }


def run(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions

    from offdpo.logprobs import fused_token_logprobs, gather_token_logprobs

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    n_answers = 2 * args.pairs
    # A pair's answer tokens split unevenly between its answers (as in chat data): 60% / 40%.
    chosen = args.answer_tokens * 3 // 5
    lengths = torch.tensor([chosen] * args.pairs + [args.answer_tokens - chosen] * args.pairs)
    n = int(lengths.sum())
    seq_index = torch.repeat_interleave(torch.arange(n_answers), lengths)
    chunk_rows = max(1, args.chunk_bytes // (4 * args.vocab))
    # Weights at a trained model's scale (std 0.02), states of a final norm's scale: logits of a few units.
    weight = torch.nn.Parameter((torch.randn(args.vocab, args.hidden) * 0.02).to(dtype))
    hidden = torch.randn(n, args.hidden).to(dtype)
    targets = torch.randint(0, args.vocab, (n,))
    g_answer = torch.randn(n_answers)  # DPO's upstream gradient: one signed scalar per answer
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=dtype)
    head.weight = weight

    def sums(token_logps, seq_index):
        return torch.zeros(n_answers).index_add(0, seq_index, token_logps.float())

    def step(method: str, mem: PeakRSS, rows: int = n):
        """One forward + backward; `mem` starts after the inputs are made and the last gradient is freed."""
        weight.grad = None
        h = hidden[:rows].clone().requires_grad_(True)
        t, seq = targets[:rows], seq_index[:rows]
        with mem:
            return _step(method, h, t, seq)

    def _step(method, h, targets, seq_index):
        c0 = time.process_time()
        out = _timed(method, h, targets, seq_index)
        return (*out, time.process_time() - c0)

    def _timed(method, h, targets, seq_index):
        t0 = time.perf_counter()
        if method == "grad_in_forward":
            with torch.no_grad():
                tok, gh, gw = grad_in_forward(h, weight, targets, g_answer[seq_index], chunk_rows)
                s = sums(tok, seq_index)
            t1 = time.perf_counter()
            return s, gh, gw, t1 - t0, 0.0
        if method == "old":
            tok = gather_token_logprobs(h, head, targets, chunk_size=chunk_rows, checkpoint=True)
        elif method == "fused":
            tok = fused_token_logprobs(h, weight, None, targets, chunk_rows)
        elif method == "torch_lce":
            opts = LinearCrossEntropyOptions(batch_chunk_size=chunk_rows, chunking_method=None)
            tok = -F.linear_cross_entropy(h, weight, targets, reduction="none", options=opts)
        else:
            raise ValueError(method)
        s = sums(tok, seq_index)
        t1 = time.perf_counter()
        (s * g_answer).sum().backward()
        t2 = time.perf_counter()
        return s.detach(), h.grad, weight.grad, t1 - t0, t2 - t1

    methods = [m for m in args.methods.split(",") if m]
    results: dict[str, dict] = {
        m: {"forward_s": [], "backward_s": [], "total_s": [], "cpu_s": [], "peak_bytes": []} for m in methods
    }
    reference = None
    for m in methods:  # warm-up on two chunks: lazy initialisation (oneDNN, threads) is not the head's cost
        step(m, PeakRSS(), rows=min(n, 2 * chunk_rows))
    for rep in range(args.repeats):
        for m in methods:
            mem = PeakRSS()
            s, gh, gw, tf, tb, cpu = step(m, mem)
            r = results[m]
            r["forward_s"].append(round(tf, 3))
            r["backward_s"].append(round(tb, 3))
            r["total_s"].append(round(tf + tb, 3))
            r["cpu_s"].append(round(cpu, 3))
            r["peak_bytes"].append(mem.transient)
            if reference is None:
                reference = (s, gh, gw)
            elif rep == 0:  # every method computes the same thing: its largest difference to the first
                r["max_abs_diff_vs_" + methods[0]] = {
                    "answer_sums": (s - reference[0]).abs().max().item(),
                    "grad_hidden": (gh.float() - reference[1].float()).abs().max().item(),
                    "grad_weight": (gw.float() - reference[2].float()).abs().max().item(),
                }
            del s, gh, gw
            print(
                f"rep {rep} {m:16s} fwd {tf:7.2f}s bwd {tb:7.2f}s cpu {cpu:7.2f}s peak +{mem.transient / 2**20:7.0f} MiB",
                file=sys.stderr,
            )
    for r in results.values():
        r["best_total_s"] = min(r["total_s"])
        r["best_cpu_s"] = min(r["cpu_s"])
        r["peak_transient_bytes"] = min(r["peak_bytes"])
    base = results.get("old")
    if base:
        for r in results.values():
            r["speedup_vs_old"] = base["best_total_s"] / r["best_total_s"]
            r["cpu_speedup_vs_old"] = base["best_cpu_s"] / r["best_cpu_s"]
            r["peak_ratio_vs_old"] = r["peak_transient_bytes"] / base["peak_transient_bytes"]
    if "grad_in_forward" in results:
        results["grad_in_forward"]["extra_bytes_needed"] = n_answers * args.vocab * args.hidden * 4
    flops = 2 * n * args.hidden * args.vocab  # one GEMM of the head
    for m, r in results.items():  # the head's GEMM work per second of the best repeat (3 GEMMs or 4)
        r["gemms"] = 3 if m == "grad_in_forward" else 4
        r["gemm_gflops_per_s"] = r["gemms"] * flops / 1e9 / r["best_total_s"]
    return {
        "backward_elementwise_per_chunk": backward_elementwise(chunk_rows, args.vocab),
        "shape": {
            "answer_positions": n,
            "pairs": args.pairs,
            "answer_tokens_per_pair": args.answer_tokens,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "chunk_bytes": args.chunk_bytes,
            "chunk_positions": chunk_rows,
        },
        "gflop_per_gemm": flops / 1e9,
        "methods": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=700, help="answer tokens per pair (both answers)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default="old,fused,torch_lce,grad_in_forward")
    p.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "head.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.answer_tokens, args.hidden, args.vocab, args.repeats = 2, 40, 32, 5000, 1
        args.chunk_bytes = 4 * args.vocab * 16
    import torch

    from bench.ceiling import measure

    started = stamp()
    ceiling = measure()
    out = {**started, **run(args)}
    out["ceiling_gflops"] = {"fp32": ceiling["fp32"], "bf16": ceiling["bf16"]}
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
    out["load_average_at_end"] = os.getloadavg()
    out["command"] = "python -m bench.head " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {m: {k: v for k, v in r.items() if not isinstance(v, list)} for m, r in out["methods"].items()}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
