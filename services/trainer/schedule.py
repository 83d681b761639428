"""The learning-rate schedule: linear warmup, then cosine decay to lr * min_ratio, from torch's schedulers.

Step s (0-based) trains at lr * f(s):
    f(s) = (s + 1) / warmup                                        for s < warmup
    f(s) = min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2     after it, p = (s - warmup) / (total - warmup)
and f(s) = 1 after the warmup when the run's length is unknown (a stream) or not longer than the warmup.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def lr_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int | None, min_ratio: float) -> LRScheduler:
    peak = float(optimizer.param_groups[0]["lr"])  # read first: each scheduler rescales it when built
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1) if warmup else None
    if not total or total <= warmup:
        return ramp or ConstantLR(optimizer, factor=1.0, total_iters=0)
    decay = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=peak * min_ratio)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup]) if ramp else decay
