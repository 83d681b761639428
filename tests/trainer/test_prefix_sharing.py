"""Prefix sharing and packing (services/trainer/packing.py): the same answer log-probs, loss and gradients
as the padded path on random pairs, in float32 within 1e-5, with the eager and the sdpa attention; and the
mask lets no rejected token see a chosen one."""

from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer import step
from services.trainer.config import TrainerConfig
from services.trainer.examples import Example
from services.trainer.losses import AnswerLogps, answer_logps, make_batch
from services.trainer.packing import CHOSEN, REJECTED, Layout, attention_mask_4d, make_layout_batch
from services.trainer.step import train_step


def random_pairs(n: int, seed: int, vocab: int = 1024) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [1] + [rng.randrange(4, vocab) for _ in range(rng.randint(0, 20))]
        c = [rng.randrange(4, vocab) for _ in range(rng.randint(2 if i % 2 else 1, 30))]
        r = [rng.randrange(4, vocab) for _ in range(rng.randint(2 if i % 2 else 1, 30))]
        if i == 1:  # chosen and rejected start with the same token (common in real data)
            r[0] = c[0]
        out.append(Example(f"p{i}", p, c, r, [rng.uniform(-9, -1) for _ in c], [rng.uniform(-9, -1) for _ in r]))
    return out


LAYOUTS = {
    "shared": Layout(share_prefix=True, pack=False),
    "shared-mask": Layout(share_prefix=True, pack=False, attention="mask"),
    "packed-mask": Layout(share_prefix=False, pack=True, row_tokens=120, pack_mode="mask", attention="mask"),
    "shared+packed-mask": Layout(share_prefix=True, pack=True, row_tokens=150, pack_mode="mask", attention="mask"),
    # the CPU's default: rows attended per segment, no 4-D mask (services/trainer/attention.py)
    "packed-varlen": Layout(share_prefix=False, pack=True, row_tokens=120, attention="varlen"),
    "shared+packed-varlen": Layout(share_prefix=True, pack=True, row_tokens=150, attention="varlen"),
    "packed-segments": Layout(share_prefix=False, pack=True, pack_mode="segments"),
    "shared+packed-segments": Layout(share_prefix=True, pack=True, pack_mode="segments"),
}


@pytest.fixture(scope="module")
def base_models(tiny_model):
    out = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=impl)
        with torch.no_grad():  # a moved policy: rewards are not ~0
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        out[impl] = m.train()
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_logps_equal_padded(base_models, impl, layout):
    module = AnswerLogps(base_models[impl])
    pairs = random_pairs(7, seed=3)
    with torch.no_grad():
        ref = answer_logps(module, make_batch(pairs))
        got = answer_logps(module, make_layout_batch(pairs, LAYOUTS[layout]))
    # Sums of ~100 log-probs (magnitude ~200, where a float32 ulp is 1.5e-5): relative 1e-6.
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loss_and_gradients_equal_padded(base_models, tiny_model, impl, layout, monkeypatch):
    module = AnswerLogps(base_models[impl])
    pairs = random_pairs(6, seed=11)
    lay = LAYOUTS[layout]
    # the trainer's config has no attention setting (the CPU's default: varlen): hold it to this layout's
    configured = step.layout_of
    monkeypatch.setattr(step, "layout_of", lambda cfg: dataclasses.replace(configured(cfg), attention=lay.attention))

    def run(cfg):
        module.zero_grad(set_to_none=True)
        sums = train_step(module, pairs, cfg, 0, 1, "cpu", contextlib.nullcontext)
        return sums, {n: p.grad.clone() for n, p in module.named_parameters()}

    common = dict(model=str(tiny_model), beta=0.5, micro_batch_size=3)
    s_pad, g_pad = run(TrainerConfig(share_prefix=False, pack=False, **common))
    s_lay, g_lay = run(
        TrainerConfig(
            share_prefix=lay.share_prefix,
            pack=lay.pack,
            pack_row_tokens=lay.row_tokens,
            pack_mode=lay.pack_mode,
            **common,
        )
    )
    for k in ("loss", "chosen", "rejected", "logps_c", "logps_r", "tokens", "answer_tokens"):
        assert abs(s_pad[k] - s_lay[k]) / len(pairs) < 1e-5, (k, s_pad[k], s_lay[k])
    assert abs(s_pad["chosen"]) > 1e-3, "rewards should be non-zero for a moved policy"
    for name, g in g_pad.items():
        torch.testing.assert_close(g_lay[name], g, rtol=0, atol=1e-5, msg=name)
    if lay.share_prefix:  # the prompt was computed once
        assert s_lay["computed"] < s_pad["computed"]
    if lay.pack:
        assert s_lay["padded"] - s_lay["computed"] < s_pad["padded"] - s_pad["computed"]


def test_token_budget_micro_batches_equal_pair_count(base_models, tiny_model):
    """micro_batch_tokens splits the step differently but the update is the same."""
    module = AnswerLogps(base_models["sdpa"])
    pairs = random_pairs(9, seed=5)

    def grads(**kw):
        module.zero_grad(set_to_none=True)
        sums = train_step(
            module, pairs, TrainerConfig(model=str(tiny_model), **kw), 0, 1, "cpu", contextlib.nullcontext
        )
        return sums, {n: p.grad.clone() for n, p in module.named_parameters()}

    s1, g1 = grads(micro_batch_size=9)
    s2, g2 = grads(micro_batch_size=9, micro_batch_tokens=100)
    assert abs(s1["loss"] - s2["loss"]) < 1e-5 * len(pairs)
    for name, g in g1.items():
        torch.testing.assert_close(g2[name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rejected_logps_do_not_depend_on_the_chosen_answer(base_models, layout):
    """Behaviourally, for every layout: other chosen tokens leave every rejected log-prob unchanged."""
    module = AnswerLogps(base_models["sdpa"])
    pairs = random_pairs(5, seed=9)
    other = [
        Example(e.pair_id, e.prompt, [(t * 7 + 3) % 1000 + 4 for t in e.chosen], *rest)
        for e, *rest in [(e, e.rejected, e.ref_chosen, e.ref_rejected) for e in pairs]
    ]
    with torch.no_grad():
        a = answer_logps(module, make_layout_batch(pairs, LAYOUTS[layout]))
        b = answer_logps(module, make_layout_batch(other, LAYOUTS[layout]))
    assert not torch.allclose(a[:5], b[:5])  # the chosen answers did change
    assert torch.equal(a[5:], b[5:]) or torch.allclose(a[5:], b[5:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if v.attention == "mask"])
def test_no_rejected_token_sees_a_chosen_one(layout):
    pairs = [e for e in random_pairs(16, seed=2) if len(e.chosen) > 1 and len(e.rejected) > 1]
    b = make_layout_batch(pairs, LAYOUTS[layout])
    mask = b.attention_mask[:, 0]
    assert mask.dtype == torch.bool and mask.dim() == 3
    # Rebuild each position's role and pair from the layout: the rejected answers' tokens never attend to a
    # chosen token, nor to another pair's tokens, nor to the future.
    rows, T = b.input_ids.shape
    assert not mask.triu(1).any(), "a token sees the future"
    # Where each answer token sits, from the batch's own indices: token j >= 1 right after the state that
    # predicts it; token 0 where the state predicting token 1 is. Checked against input_ids.
    role = torch.full((rows * T,), -1)
    B = len(pairs)
    flat_ids = b.input_ids.reshape(-1)
    for s_row in range(2 * B):
        sel = (b.seq_index == s_row).nonzero().squeeze(1)
        h, t = b.hidden_index[sel], b.targets[sel]
        assert len(h) > 1, "random_pairs' answers here all have 2+ tokens"
        at = torch.cat([h[1:2], h[1:] + 1])
        assert torch.equal(flat_ids[at], t), "answer tokens are not where the indices say"
        role[at] = CHOSEN if s_row < B else REJECTED
    role = role.reshape(rows, T)
    rej = role == REJECTED
    cho = role == CHOSEN
    for r in range(rows):
        seen = mask[r][rej[r]][:, cho[r]]
        assert not seen.any(), "a rejected token sees a chosen one"
    # every real query sees at least itself (no fully masked row)
    assert mask.diagonal(dim1=1, dim2=2).all()


def test_mask_function_directly():
    # one segment [p p c c r r]: r sees p and earlier r, never c
    seg = torch.zeros(1, 6, dtype=torch.long)
    role = torch.tensor([[0, 0, CHOSEN, CHOSEN, REJECTED, REJECTED]])
    m = attention_mask_4d(seg, role)[0, 0]
    assert m[4].tolist() == [True, True, False, False, True, False]
    assert m[5].tolist() == [True, True, False, False, True, True]
    assert m[3].tolist() == [True, True, True, True, False, False]
