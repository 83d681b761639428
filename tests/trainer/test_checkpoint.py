"""Checkpoints into an in-memory object store: a resumed policy continues exactly where it stopped."""

from __future__ import annotations

import contextlib

import torch

from services.trainer import checkpoint as ckpt
from services.trainer.config import TrainerConfig
from services.trainer.distributed import Node
from services.trainer.examples import Example
from services.trainer.messages import Plan
from services.trainer.step import train_step
from services.trainer.train import build_policy
from tests.fakes import FakeObjectStore

NODE = Node(0, 1, torch.device("cpu"))


def _examples() -> list[Example]:
    return [
        Example(f"p{i}", [1, 500 + i], [100 + i, 101], [300 + i, 301], [-2.0, -2.0], [-2.5, -2.5], "k")
        for i in range(4)
    ]


def _step(policy: ckpt.Policy, cfg: TrainerConfig) -> float:
    train_step(policy.module, _examples(), cfg, 0, 1, "cpu", contextlib.nullcontext)
    lr = float(policy.scheduler.get_last_lr()[0])
    policy.optimizer.step()
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return lr


def test_resume_restores_weights_optimizer_schedule_and_position(tiny_model):
    store = FakeObjectStore()
    cfg = TrainerConfig(model=str(tiny_model), run_name="ck", lr=1e-3, warmup_steps=2, micro_batch_size=4)
    plan = Plan(total_steps=8, fingerprint_id="fp", resume_from=None)
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, plan)
    for _ in range(2):  # the warmup; the resumed steps cross into the cosine decay
        _step(policy, cfg)
    data = {"mode": "replay", "epoch": 0, "index": 8}
    ckpt.save(store, cfg, NODE, 2, policy, None, {"data": data, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "ck")
    assert prefix == "runs/ck/checkpoints/step-00000002"
    assert ckpt.read_state(store, prefix)["data"] == data

    resumed = build_policy(cfg, NODE, store, Plan(8, "fp", prefix))
    assert ckpt.restore(store, prefix, cfg, NODE, resumed) == 2
    for (name, a), b in zip(policy.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    # The next steps of the straight run and of the resumed one: same learning rates, same weights.
    assert [_step(policy, cfg) for _ in range(2)] == [_step(resumed, cfg) for _ in range(2)]
    for (name, a), b in zip(policy.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0), name
