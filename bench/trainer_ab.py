"""Offline DPO vs SFT on the same tokens, interleaved in one process: the ratio without run-to-run noise.

    python -m bench.trainer_ab [ROUNDS]     # prints one JSON line per batch, then the median ratio

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


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.config import TrainerConfig
    from services.trainer.losses import AnswerLogps

    argv = sys.argv[1:] if argv is None else argv
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
