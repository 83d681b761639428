"""The losses: hand-computed values for a 2-token pair, and stored reference log-probs giving the same
loss, rewards and gradients as a live reference model (the frozen initial policy), for every loss type."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from offdpo.records import scored_pairs_to_parquet
from services.trainer.config import LOSS_TYPES, TrainerConfig
from services.trainer.losses import AnswerLogps, make_batch, preference_loss
from services.trainer.shards import examples_from_shard
from services.trainer.train import train_step

from .conftest import scored_pairs, synthetic_tokens


@pytest.fixture(scope="module")
def examples(tiny_model, ref_fp):
    rows = scored_pairs(tiny_model, synthetic_tokens(6, seed=7), ref_fp)
    data = scored_pairs_to_parquet(rows, ref_fp)
    out, refused = examples_from_shard(data, "mem", ref_fp, set(), 64, "refuse")
    assert not refused
    return out


def _grads_and_sums(module, examples, cfg, ref_module=None):
    module.zero_grad(set_to_none=True)
    sums = train_step(module, examples, cfg, 0, 1, "cpu", contextlib.nullcontext, ref_module=ref_module)
    return {n: p.grad.clone() for n, p in module.named_parameters()}, sums


@pytest.mark.parametrize("perturb", [False, True], ids=["step0", "moved-policy"])
@pytest.mark.parametrize(
    "loss_type,extra",
    [(t, {}) for t in LOSS_TYPES]
    + [("sigmoid", {"label_smoothing": 0.1, "sft_weight": 0.5}), ("robust", {"label_smoothing": 0.2})],
)
def test_precomputed_reference_equals_live_reference(tiny_model, examples, loss_type, extra, perturb):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ref = AnswerLogps(copy.deepcopy(base).eval().requires_grad_(False))
    if perturb:  # a policy that has moved away from the reference: rewards are non-zero
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    policy = AnswerLogps(base.train())
    cfg = TrainerConfig(model=str(tiny_model), loss_type=loss_type, beta=0.5, micro_batch_size=4, **extra)
    g_off, s_off = _grads_and_sums(policy, examples, cfg)
    g_live, s_live = _grads_and_sums(policy, examples, cfg, ref_module=ref)
    for k in ("loss", "chosen", "rejected", "logps_c", "logps_r"):
        assert abs(s_off[k] - s_live[k]) / len(examples) < 1e-5, (k, s_off[k], s_live[k])
    if perturb:  # at step 0 every reward is ~0 (float noise), so accuracy is only comparable once moved
        assert abs(s_off["chosen"]) > 1e-3, "the moved policy should have non-zero rewards"
        assert s_off["correct"] == s_live["correct"]
    for name in g_off:
        assert torch.allclose(g_off[name], g_live[name], atol=1e-5, rtol=0), name
    assert any(g.abs().sum() > 0 for g in g_off.values())


@dataclass
class _Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: list[float]
    ref_rejected: list[float]


# One pair with 2-token answers. Per-token log-probs and their sums (the losses see sums):
#   policy     chosen -1.0 + -0.5 = -1.5    rejected -2.0 + -1.0 = -3.0
#   reference  chosen -1.0 + -1.0 = -2.0    rejected -1.5 + -1.0 = -2.5
# beta 0.5. logits = (pi_c - pi_r) - (ref_c - ref_r) = 1.5 - 0.5 = 1.0, so beta * logits = 0.5.
# Rewards: chosen 0.5 * (-1.5 + 2.0) = 0.25, rejected 0.5 * (-3.0 + 2.5) = -0.25.
# -log sigmoid(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770; -log sigmoid(-0.5) = 0.4740770 + 0.5 = 0.9740770.
PAIR = _Pair(prompt=[1, 7], chosen=[11, 12], rejected=[21, 22], ref_chosen=[-1.0, -1.0], ref_rejected=[-1.5, -1.0])
POLICY = torch.tensor([-1.5, -3.0])  # chosen row, then rejected row
BETA = 0.5


@pytest.mark.parametrize(
    "loss_type,extra,want",
    [
        ("sigmoid", {}, 0.4740770),  # DPO: -log sigmoid(0.5)
        # cDPO, eps 0.1: 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.4266693 + 0.0974077
        ("sigmoid", {"label_smoothing": 0.1}, 0.5240770),
        # robust DPO, eps 0.1: (0.9 * 0.4740770 - 0.1 * 0.9740770) / (1 - 0.2) = 0.3292616 / 0.8
        ("robust", {"label_smoothing": 0.1}, 0.4115770),
        ("hinge", {}, 0.5),  # relu(1 - 0.5)
        # IPO on per-token means: logits = (-0.75 + 1.5) - (-1.0 + 1.25) = 0.5; (0.5 - 1 / (2 * 0.5))^2
        ("ipo", {}, 0.25),
        # SimPO, reference-free, gamma 0.5: z = 0.5 * (-0.75 + 1.5) - 0.5 = -0.125; log(1 + e^0.125) = log(2.1331485)
        ("simpo", {"reference_free": True}, 0.7575990),
        # DPO + SFT term 0.3 * NLL per chosen token: 0.4740770 + 0.3 * 1.5 / 2
        ("sigmoid", {"sft_weight": 0.3}, 0.6990770),
    ],
)
def test_hand_computed_losses_for_a_two_token_pair(loss_type, extra, want):
    batch = make_batch([PAIR])
    assert batch.ref_logps.tolist() == [-2.0, -2.5] and batch.answer_lengths.tolist() == [2.0, 2.0]
    loss, chosen, rejected = preference_loss(
        POLICY, batch.ref_logps, batch.answer_lengths, loss_type=loss_type, beta=BETA, **extra
    )
    assert loss.tolist() == pytest.approx([want], abs=1e-6)
    if not extra.get("reference_free") and loss_type != "ipo":
        assert chosen.tolist() == pytest.approx([0.25]) and rejected.tolist() == pytest.approx([-0.25])
