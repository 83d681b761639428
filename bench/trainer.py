"""Trainer benchmark: offline DPO vs DPO with a live reference model vs SFT, side by side.

    python -m bench.trainer            # writes bench/results/trainer.json   (make bench-trainer)

Same model (localdev.testmodel "bench", ~23M parameters, float32 on the CPU / bf16 autocast on GPU),
same batches, same number of steps, same training step code (services.trainer.train.train_step):
  offline_dpo   reference log-probs read from the batch (what the trainer does)
  live_ref_dpo  a frozen copy of the initial policy computes them every step (TRL without precompute)
  sft           NLL on the same chosen + rejected tokens (the cost floor DPO should match)
Each variant runs in a fresh subprocess (so its peak RSS is its own), and the variants are
interleaved over several rounds in rotating order; tokens/s is the median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("offline_dpo", "live_ref_dpo", "sft")


@dataclass
class _Ex:
    pair_id: str
    prompt: list
    chosen: list
    rejected: list
    ref_chosen: list
    ref_rejected: list


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def batches(n_batches: int, pairs: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for b in range(n_batches):
        batch = []
        for i in range(pairs):
            # Same lengths in every variant; answers vary a little, as real ones do.
            lc, lr = answer_len - rng.randrange(0, 8), answer_len - rng.randrange(0, 8)
            prompt = [1] + [rng.randrange(4, vocab) for _ in range(prompt_len - 1)]
            batch.append(
                _Ex(
                    f"{b}-{i}",
                    prompt,
                    [rng.randrange(4, vocab) for _ in range(lc)],
                    [rng.randrange(4, vocab) for _ in range(lr)],
                    [-2.0] * lc,
                    [-2.0] * lr,
                )
            )
        out.append(batch)
    return out


def _variant(name: str, model_path: str, pairs: int):
    """(step function, device) for one variant: its own policy copy and optimizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.config import TrainerConfig
    from services.trainer.losses import AnswerLogps
    from services.trainer.train import train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = AnswerLogps(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).train())
    ref = None
    if name == "live_ref_dpo":
        ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
        ref = AnswerLogps(ref_model.requires_grad_(False))
    cfg = TrainerConfig(model=model_path, micro_batch_size=pairs, global_batch_size=pairs)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-6)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )

    def step(batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        sums = train_step(
            module, batch, cfg, 0, 1, device, autocast, ref_module=ref, objective="sft" if name == "sft" else "dpo"
        )
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return sums["tokens"], time.perf_counter() - t0

    return step, device


def interleaved(args, model_path: str) -> dict:
    """All three variants in one process, one step each in rotating order: load bursts hit all alike."""
    import torch

    torch.manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    steps = {v: _variant(v, model_path, args.pairs)[0] for v in VARIANTS}
    data = batches(args.interleaved_steps + args.warmup, args.pairs, args.prompt_len, args.answer_len, vocab)
    times = {v: [] for v in VARIANTS}
    for i, batch in enumerate(data):
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        for v in order:
            tokens, sec = steps[v](batch)
            if i >= args.warmup:
                times[v].append(tokens / sec)
    return times


def worker(args) -> dict:
    base_rss = _rss_bytes()
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.config import TrainerConfig
    from services.trainer.losses import AnswerLogps
    from services.trainer.train import train_step

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    after_import_rss = _rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).train()
    module = AnswerLogps(model)
    ref = None
    if args.worker == "live_ref_dpo":
        ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
        ref = AnswerLogps(ref_model.requires_grad_(False))
    cfg = TrainerConfig(model=args.model, micro_batch_size=args.pairs, global_batch_size=args.pairs)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-6)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    data = batches(args.steps + args.warmup, args.pairs, args.prompt_len, args.answer_len, model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        sums = train_step(
            module,
            batch,
            cfg,
            0,
            1,
            device,
            autocast,
            ref_module=ref,
            objective="sft" if args.worker == "sft" else "dpo",
        )
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds += time.perf_counter() - t0
            tokens += sums["tokens"]
    out = {
        "variant": args.worker,
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": after_import_rss,
        "rss_at_start_bytes": base_rss,
    }
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU: {cpu_name()}, {os.cpu_count()} logical cores visible"


MODEL_CACHE = REPO / ".cache" / "models"


def resolve_model(path: str | Path) -> Path:
    """The model to benchmark. A path the user gives is read-only: a loadable model (config.json) is
    used as it is. The benchmark's own test model is built only under the project's cache
    (.cache/models/...), where the project owns the folder; anything else is refused."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.resolve().is_relative_to(MODEL_CACHE.resolve()):
        from localdev.testmodel import ensure_test_model

        return ensure_test_model(path, size="bench")
    raise SystemExit(
        f"bench.trainer: {path} is not a model directory (no config.json) and not under {MODEL_CACHE}; "
        f"pass a Hugging Face model folder, or leave --model out to build the test model in the cache"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", default=str(REPO / ".cache" / "models" / "bench"))
    p.add_argument("--rounds", type=int, default=1, help="fresh-process runs per variant (memory)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--interleaved-steps", type=int, default=12, help="timed steps per variant, interleaved in one process"
    )
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (chosen + rejected: 2x sequences)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=96)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "trainer.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    model_dir = resolve_model(args.model)
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        n_params = sum(
            f.get_slice(k).get_shape().numel()
            if hasattr(f.get_slice(k).get_shape(), "numel")
            else __import__("math").prod(f.get_slice(k).get_shape())
            for k in f
        )
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate, so no variant always runs first
        for v in order:
            cmd = [
                sys.executable,
                "-m",
                "bench.trainer",
                "--worker",
                v,
                "--model",
                str(model_dir),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--pairs",
                str(args.pairs),
                "--prompt-len",
                str(args.prompt_len),
                "--answer-len",
                str(args.answer_len),
            ]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[v].append(res)
            print(
                f"round {r} {v:13s} {res['tokens_per_s']:8.1f} tokens/s  peak RSS {res['peak_rss_bytes'] / 2**20:7.1f} MiB",
                file=sys.stderr,
            )
    # Throughput: in one process, variants interleaved step by step (fresh-process numbers kept for reference).
    print("interleaved timing ...", file=sys.stderr)
    inter = interleaved(args, str(model_dir))
    tps = {v: statistics.median(inter[v]) for v in VARIANTS}
    step_ratios = {
        "speedup_vs_live_ref": statistics.median(a / b for a, b in zip(inter["offline_dpo"], inter["live_ref_dpo"])),
        "ratio_vs_sft": statistics.median(a / b for a, b in zip(inter["offline_dpo"], inter["sft"])),
    }
    fresh_tps = {v: statistics.median(x["tokens_per_s"] for x in results[v]) for v in VARIANTS}
    peak = {v: max(x.get("cuda_peak_bytes", x["peak_rss_bytes"]) for x in results[v]) for v in VARIANTS}
    above = {v: max(x["peak_rss_bytes"] - x["rss_after_imports_bytes"] for x in results[v]) for v in VARIANTS}
    per_round = [
        {
            "speedup_vs_live_ref": results["offline_dpo"][i]["tokens_per_s"]
            / results["live_ref_dpo"][i]["tokens_per_s"],
            "ratio_vs_sft": results["offline_dpo"][i]["tokens_per_s"] / results["sft"][i]["tokens_per_s"],
        }
        for i in range(args.rounds)
    ]
    out = {
        "tokens_per_s": tps,
        "peak_mem_bytes": peak,
        "peak_mem_above_imports_bytes": above,
        "speedup_vs_live_ref": step_ratios["speedup_vs_live_ref"],
        "ratio_vs_sft": step_ratios["ratio_vs_sft"],
        "tokens_per_s_each_step": {v: [round(x, 1) for x in inter[v]] for v in VARIANTS},
        "fresh_process_tokens_per_s": fresh_tps,
        "fresh_process_per_round": per_round,
        "targets": {"speedup_vs_live_ref": 1.25, "ratio_vs_sft": 0.95},
        "device": device_name(),
        "model": f"localdev.testmodel size=bench ({n_params / 1e6:.1f}M parameters, Qwen2 architecture), float32 weights"
        + (", bf16 autocast" if "CPU" not in device_name() else ""),
        "workload": {
            "pairs_per_step": args.pairs,
            "prompt_tokens": args.prompt_len,
            "answer_tokens": f"{args.answer_len - 7}-{args.answer_len}",
            "timed_steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "tokens": "non-pad tokens of the chosen and rejected sequences (prompt counted twice)",
        },
        "method": (
            "throughput: the three variants (each its own policy copy and AdamW) in one process, one optimizer "
            "step each in rotating order, --interleaved-steps timed steps after warmup; tokens_per_s = median "
            "over steps; the two ratios = median over steps of the per-step ratio (load bursts from other "
            "work on the machine hit neighbouring steps alike). Memory: each variant alone in a fresh "
            "subprocess (--rounds, rotating order; their tokens/s are kept as fresh_process_*); peak memory = the "
            "process's RSS high-water mark (getrusage ru_maxrss) on CPU, torch.cuda.max_memory_allocated on "
            "GPU; peak_mem_above_imports_bytes subtracts the RSS after importing torch and transformers. "
            "Reference log-probs of the offline variant are constants: their values do not change the cost."
        ),
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
