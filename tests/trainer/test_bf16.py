"""bf16 autocast on the CPU (OFFDPO_TRAINER_PRECISION=bf16): the matmuls run in bfloat16, the
log-softmax, the log-prob sums and the loss in float32 (offdpo.logprobs upcasts the logits). Its effect
on the loss, measured on a fixed batch of the tiny model (16 pairs, 2-30 answer tokens, beta 0.1, a moved
policy, shared prefix + packing on), 2026-11-29: |loss_bf16 - loss_fp32| = 4e-4 per pair, mean
per-token log-prob difference 1.3e-4, gradient cosine 0.99997 (relative error 0.9%).
The bounds below are ~5x those figures."""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForCausalLM

from services.trainer.config import TrainerConfig
from services.trainer.losses import AnswerLogps
from services.trainer.step import train_step

from .test_prefix_sharing import random_pairs

LOSS_BOUND = 2e-3  # per pair, beta 0.1
TOKEN_LOGP_BOUND = 1e-3  # mean per answer token, nats
GRAD_COSINE_MIN = 0.9995


def test_bf16_autocast_loss_within_bound_of_float32(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    module = AnswerLogps(model.train())
    pairs = random_pairs(16, seed=1)
    cfg = TrainerConfig(model=str(tiny_model), beta=0.1, micro_batch_size=16)
    out = {}
    for name, autocast in (
        ("fp32", contextlib.nullcontext),
        ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ):
        module.zero_grad(set_to_none=True)
        sums = train_step(module, pairs, cfg, 0, 1, "cpu", autocast)
        out[name] = sums, torch.cat([p.grad.flatten() for p in module.parameters()])
    (s32, g32), (s16, g16) = out["fp32"], out["bf16"]
    assert abs(s32["loss"] - s16["loss"]) / len(pairs) < LOSS_BOUND
    for k in ("logps_c", "logps_r"):
        assert abs(s32[k] - s16[k]) / s32["answer_tokens"] < TOKEN_LOGP_BOUND, k
    assert torch.isfinite(g16).all()
    assert torch.nn.functional.cosine_similarity(g32, g16, 0).item() > GRAD_COSINE_MIN
