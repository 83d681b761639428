"""The learning-rate schedule (torch's schedulers) gives the trainer's warmup + cosine values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from services.trainer.schedule import lr_schedule


def closed_form(step: int, warmup: int, total: int | None, min_ratio: float) -> float:
    """The schedule's definition: linear warmup from lr/warmup, then cosine to lr * min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if not total or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(float(scheduler.get_last_lr()[0]))
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine_values_written_out():
    # lr 1, warmup 2, 6 steps, min ratio 0.1: warmup 1/2, 2/2; then p = 0, 1/4, 2/4, 3/4 of the cosine:
    # 0.1 + 0.9 * (1 + cos(p * pi)) / 2 = 1.0, 0.1 + 0.9 * 0.853553 = 0.868198, 0.55, 0.1 + 0.9 * 0.146447 = 0.231802
    opt = _optimizer(1.0)
    got = _lrs(opt, lr_schedule(opt, 2, 6, 0.1), 6)
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8681980515, 0.55, 0.2318019485], abs=1e-9)


@pytest.mark.parametrize("warmup", [0, 1, 2, 3, 10])
@pytest.mark.parametrize("total", [None, 0, 1, 2, 5, 11, 40])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 1.0])
def test_matches_the_closed_form(warmup, total, min_ratio):
    lr = 3e-3
    opt = _optimizer(lr)
    steps = (total or 30) + 1
    got = _lrs(opt, lr_schedule(opt, warmup, total, min_ratio), steps)
    want = [lr * closed_form(s, warmup, total, min_ratio) for s in range(steps)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("warmup,total", [(2, 10), (0, 10), (3, None)])
def test_resumes_from_its_json_state_where_it_stopped(warmup, total):
    # What a checkpoint does: optimizer and scheduler state through state.json, into fresh objects.
    opt = _optimizer(1e-3)
    sched = lr_schedule(opt, warmup, total, 0.1)
    _lrs(opt, sched, 4)
    opt_state, sched_state = (
        json.loads(json.dumps(opt.state_dict()["param_groups"])),
        json.loads(json.dumps(sched.state_dict())),
    )
    rest = _lrs(opt, sched, 6)

    opt2 = _optimizer(1e-3)
    sched2 = lr_schedule(opt2, warmup, total, 0.1)
    opt2.load_state_dict({"state": {}, "param_groups": opt_state})
    sched2.load_state_dict(sched_state)
    assert _lrs(opt2, sched2, 6) == pytest.approx(rest, rel=1e-12)
