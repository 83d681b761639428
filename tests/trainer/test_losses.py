"""Loss equivalence: stored reference log-probs give the same loss, rewards and gradients as a live
reference model (the frozen initial policy), for every loss type, in float32."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from offdpo.records import scored_pairs_to_parquet
from services.trainer.config import LOSS_TYPES, TrainerConfig
from services.trainer.data import examples_from_shard
from services.trainer.losses import AnswerLogps, preference_loss
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


def test_loss_formulas_match_the_papers():
    # One pair, chosen/rejected policy and reference log-probs, answer lengths 2 and 4.
    pi = torch.tensor([-3.0, -5.0])
    ref = torch.tensor([-4.0, -4.5])
    lengths = torch.tensor([2.0, 4.0])
    beta = 0.2
    h = (pi[0] - pi[1]) - (ref[0] - ref[1])  # 2.5
    sig = torch.nn.functional.logsigmoid
    expect = {
        "sigmoid": -sig(beta * h),
        "hinge": torch.relu(1 - beta * h),
        "ipo": ((pi[0] / 2 - pi[1] / 4) - (ref[0] / 2 - ref[1] / 4) - 1 / (2 * beta)) ** 2,
        "simpo": -sig(beta * ((pi[0] / 2 - pi[1] / 4) - (ref[0] / 2 - ref[1] / 4)) - 0.5),
    }
    for lt, want in expect.items():
        got, cr, rr = preference_loss(pi, ref, lengths, loss_type=lt, beta=beta)
        assert torch.allclose(got, want.reshape(1)), lt
    got, cr, rr = preference_loss(pi, ref, lengths, loss_type="sigmoid", beta=beta)
    assert torch.allclose(cr, torch.tensor([beta * 1.0])) and torch.allclose(rr, torch.tensor([beta * -0.5]))
    # Robust DPO with eps=0 is DPO; cDPO mixes the flipped label.
    eps = 0.1
    got, *_ = preference_loss(pi, ref, lengths, loss_type="robust", beta=beta, label_smoothing=eps)
    assert torch.allclose(got, ((-sig(beta * h) * (1 - eps) + sig(-beta * h) * eps) / (1 - 2 * eps)).reshape(1))
    got, *_ = preference_loss(pi, ref, lengths, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    assert torch.allclose(got, (-sig(beta * h) * (1 - eps) - sig(-beta * h) * eps).reshape(1))
    # SimPO proper is reference-free; the SFT (RPO) term adds alpha * NLL per chosen token.
    got, *_ = preference_loss(pi, ref, lengths, loss_type="simpo", beta=beta, reference_free=True, sft_weight=0.3)
    assert torch.allclose(got, (-sig(beta * (pi[0] / 2 - pi[1] / 4) - 0.5) + 0.3 * 3.0 / 2).reshape(1))
