"""The fused LM head (offdpo.logprobs.fused_token_logprobs) is AnswerLogps's default and equals the autograd
head it replaced (fused_head=False) on the tiny model (tied embeddings): per-answer log-prob sums and every
parameter's gradient, in the padded and packed layouts, with chunks that cut answers in the middle."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.losses import AnswerLogps, answer_logps, make_batch
from services.trainer.packing import Layout, make_layout_batch

from .test_prefix_sharing import random_pairs


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():  # a moved policy: logits far from the initial ones
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight, "the tiny model ties its head"
    return m.train()


def _sums_and_grads(module, batch, g):
    module.zero_grad(set_to_none=True)
    sums = answer_logps(module, batch)
    (sums * g).sum().backward()
    return sums.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_fused_head_is_the_default():
    assert AnswerLogps(torch.nn.Module()).fused_head is True


@pytest.mark.parametrize(
    "layout",
    [None, Layout(share_prefix=True, pack=True, row_tokens=150, pack_mode="mask")],
    ids=["padded", "shared+packed"],
)
def test_fused_head_equals_autograd_head(model, layout):
    pairs = random_pairs(6, seed=3)
    batch = make_batch(pairs) if layout is None else make_layout_batch(pairs, layout)
    g = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(1))  # signed, per answer (DPO's)
    # chunk_size 7: chunks end inside answers; the old head with its default checkpointing
    s_old, g_old = _sums_and_grads(AnswerLogps(model, chunk_size=7, fused_head=False), batch, g)
    s_new, g_new = _sums_and_grads(AnswerLogps(model, chunk_size=7), batch, g)
    assert torch.allclose(s_new, s_old, atol=1e-5, rtol=1e-5), (s_new - s_old).abs().max()
    assert g_new.keys() == g_old.keys()
    for name in g_old:
        assert torch.allclose(g_new[name], g_old[name], atol=1e-5, rtol=0), (
            name,
            (g_new[name] - g_old[name]).abs().max(),
        )
    tied = "model.model.embed_tokens.weight"
    assert tied in g_new and g_new[tied].abs().max() > 1e-4, "the tied weight gets the head's gradient too"


def test_fused_head_empty_answer_row(model):
    """An answer of no tokens (a row with nothing to score) sums to 0 and gets no gradient."""
    pairs = random_pairs(3, seed=4)
    pairs[1].rejected[:] = []
    pairs[1].ref_rejected[:] = []
    batch = make_batch(pairs)
    g = torch.ones(6)
    s_old, g_old = _sums_and_grads(AnswerLogps(model, fused_head=False), batch, g)
    s_new, g_new = _sums_and_grads(AnswerLogps(model), batch, g)
    assert s_new[3 + 1] == 0 and s_old[3 + 1] == 0
    assert torch.allclose(s_new, s_old, atol=1e-5, rtol=1e-5)
    for name in g_old:
        assert torch.allclose(g_new[name], g_old[name], atol=1e-5, rtol=0), name
