"""Offline DPO vs SFT on the same tokens, interleaved in one process: the ratio without run-to-run noise.

    python -m bench.trainer_ab [ROUNDS]     # prints one JSON line per batch, then the median ratio
    python -m bench.trainer_ab --layouts [ROUNDS] [--profile]
                                            # padded vs packed (4-D mask) vs packed (per-segment attention)

`make bench-trainer` runs each method in its own process (so that each peak RSS is its own); its
tokens/s then vary by up to ~10% between processes of the same configuration on the 2-core CPU, which
is the size of the DPO/SFT difference being asked about (>= 0.95). Here one policy alternates DPO (the
trainer's default layout) and SFT on the same chat_like batches, the order swapped every round, and
each batch's ratio is paired: load that hits one hits the other.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

from bench.trainer import MODEL_CACHE, optimizer_step, workload_batches

# --layouts: the same pairs in three layouts, one policy, interleaved (the order rotated every round).
# The packed ones are both a shared-prefix segment per pair packed into rows (the trainer's default
# layout); they differ only in how a row is attended (services.trainer.packing.Layout.attention).
LAYOUTS = {
    "padded": dict(share_prefix=False, pack=False),
    "packed_mask": dict(share_prefix=True, pack=True, attention="mask"),
    "packed_varlen": dict(share_prefix=True, pack=True, attention="varlen"),
}


def layouts(rounds: int, pairs: int = 4, batches_n: int = 2, profile: bool = False) -> dict:
    """CPU seconds per optimizer step of each layout on the same chat_like batches, and per-batch ratios
    to the padded layout (paired: load that hits one step hits its neighbours in the same round)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.losses import AnswerLogps, answer_logps, preference_loss
    from services.trainer.packing import Layout, make_layout_batch

    torch.set_num_threads(2)
    path = str(MODEL_CACHE / "bench-qwen-vocab")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    module = AnswerLogps(model)
    batches = workload_batches("chat_like", batches_n + 1, pairs, AutoConfig.from_pretrained(path).vocab_size)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-6)

    cpu_seconds: dict[str, list[float]] = {n: [] for n in LAYOUTS}

    def step(batch, name: str) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        b = make_layout_batch(batch, Layout(**LAYOUTS[name]))  # type: ignore[arg-type]
        losses, _, _ = preference_loss(answer_logps(module, b), b.ref_logps, b.answer_lengths)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu_seconds[name].append(time.process_time() - c0)  # both threads' CPU time: less moved by others' load
        return time.perf_counter() - t0

    names = list(LAYOUTS)
    for name in names:  # warm-up: every path once
        step(batches[0], name)
    for v in cpu_seconds.values():
        v.clear()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "padded"}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for i, batch in enumerate(batches[1:]):
            s = {name: step(batch, name) for name in order}
            for name in names:
                seconds[name].append(s[name])
            for name in ratios:
                ratios[name].append(s["padded"] / s[name])  # tokens/s over the padded layout's, same pairs
            cpu = {name: round(cpu_seconds[name][-1], 2) for name in order}
            print(json.dumps({"round": r, "batch": i, "order": order, "seconds": s, "cpu_seconds": cpu}), flush=True)
    out: dict = {
        "median_seconds": {n: statistics.median(v) for n, v in seconds.items()},
        "median_cpu_seconds": {n: statistics.median(v) for n, v in cpu_seconds.items()},
        "median_ratio_vs_padded": {n: statistics.median(v) for n, v in ratios.items()},
        "median_cpu_ratio_vs_padded": {
            n: statistics.median(p / c for p, c in zip(cpu_seconds["padded"], cpu_seconds[n])) for n in ratios
        },
        "ratios_vs_padded": {n: [round(x, 3) for x in v] for n, v in ratios.items()},
        "pairs_per_step": pairs,
        "load_average": __import__("os").getloadavg(),
    }
    if profile:
        out["profile"] = {name: _profile(step, batches[1], name) for name in ("packed_mask", "packed_varlen")}
    return out


def _profile(step, batch, name: str) -> dict:
    """Shares of one step's CPU time: sdpa (forward + backward), GEMMs, the rest (torch.profiler)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(batch, name)
    total = attention = gemm = 0.0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::_scaled_dot_product") or "flash_attention" in ev.key:
            attention += ev.self_cpu_time_total
        elif ev.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear_backward"):
            gemm += ev.self_cpu_time_total
        total += ev.self_cpu_time_total
    return {"attention_share": attention / total, "gemm_share": gemm / total, "seconds": total / 1e6}


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.config import TrainerConfig
    from services.trainer.losses import AnswerLogps

    argv = sys.argv[1:] if argv is None else argv
    if "--layouts" in argv:
        rest = [a for a in argv if not a.startswith("--")]
        res = layouts(max(1, int(rest[0])) if rest else 2, profile="--profile" in argv)
        print(json.dumps(res))
        return 0
    rounds = max(1, int(argv[0])) if argv else 2
    torch.set_num_threads(2)
    path = str(MODEL_CACHE / "bench-qwen-vocab")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    module = AnswerLogps(model)
    batches = workload_batches("chat_like", 3, 4, AutoConfig.from_pretrained(path).vocab_size)
    cfg = TrainerConfig(model=path, micro_batch_size=4, global_batch_size=4, share_prefix=True, pack=True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-6)

    def step(batch, objective: str) -> float:
        t0 = time.perf_counter()
        optimizer_step(module, batch, cfg, opt, contextlib.nullcontext, objective=objective)
        return time.perf_counter() - t0

    step(batches[0], "dpo")  # warm-up
    ratios: list[float] = []
    for r in range(rounds):
        order = ("dpo", "sft") if r % 2 == 0 else ("sft", "dpo")
        for batch in batches[1:]:
            seconds = {objective: step(batch, objective) for objective in order}
            ratios.append(seconds["sft"] / seconds["dpo"])  # DPO tokens/s over SFT's on the same batch
            print(json.dumps({"round": r, "order": order, "seconds": seconds}), flush=True)
    print(json.dumps({"median_dpo_over_sft": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
