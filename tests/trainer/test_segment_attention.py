"""Per-segment attention for packed rows (services/trainer/attention.py): without any 4-D mask, the same
answer log-prob sums and gradients as the 4-D-mask path within 1e-5 (float32), for packed rows and
shared-prefix rows with segments of unequal length, on the tiny model (GQA: 2 query heads, 1 key/value
head); groups padded inside one sdpa call equal single calls; the model attends as before where no
segment layout is passed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer import attention
from services.trainer.losses import AnswerLogps, answer_logps, make_batch, preference_loss
from services.trainer.packing import Layout, attention_mask_4d, make_layout_batch

from .test_prefix_sharing import random_pairs


def _model(path, impl: str = "sdpa", checkpointing: bool = False):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    with torch.no_grad():  # a moved policy: rewards are not ~0
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m.train()


@pytest.fixture(scope="module")
def models(tiny_model):
    return {impl: _model(tiny_model, impl) for impl in ("sdpa", "eager")}


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    logps = answer_logps(module, batch)
    losses, _, _ = preference_loss(logps, batch.ref_logps, batch.answer_lengths, beta=0.5)
    losses.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "packed"])
def test_varlen_equals_the_mask_path(models, impl, share_prefix):
    model = models[impl]
    assert model.config.num_key_value_heads < model.config.num_attention_heads, "the tiny model is GQA"
    module = AnswerLogps(model)
    pairs = random_pairs(9, seed=21)  # prompts 1-21 tokens, answers 1-30: every segment a different length
    mask_batch = make_layout_batch(pairs, Layout(share_prefix, True, row_tokens=90, attention="mask"))
    varlen_batch = make_layout_batch(pairs, Layout(share_prefix, True, row_tokens=90, attention="varlen"))
    assert mask_batch.attention_mask.dim() == 4 and varlen_batch.attention_mask.dim() == 2
    layout = varlen_batch.segment_layout
    assert layout is not None and len(set(layout[:, 0].tolist())) > 1, "several rows"
    assert (layout[:, 0].bincount() > 1).any(), "rows of several segments"
    assert len(set(layout[:, 2].tolist())) > 3, "segments of unequal length"
    if share_prefix:
        assert (layout[:, 4] > 0).all() and (layout[:, 3] < layout[:, 2]).any()
    got, g_got = _loss_and_grads(module, varlen_batch)
    assert model.config._attn_implementation == attention.PREFIX + impl
    ref, g_ref = _loss_and_grads(module, mask_batch)
    # sums of ~100 log-probs (magnitude ~200, where one float32 ulp is 1.5e-5): relative 1e-6 as well
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert g_got.keys() == g_ref.keys() and len(g_ref) > 10
    for name, g in g_ref.items():
        torch.testing.assert_close(g_got[name], g, rtol=0, atol=1e-5, msg=name)
    # and both equal the padded layout (no packing, no sharing, the causal kernel)
    plain, _ = _loss_and_grads(module, make_batch(pairs))
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-5)


def test_varlen_under_gradient_checkpointing(tiny_model):
    """The layout rides in kwargs, so a checkpointed layer's recompute attends per segment again."""
    pairs = random_pairs(6, seed=4)
    lay = Layout(True, True, row_tokens=80, attention="varlen")
    got, g_got = _loss_and_grads(AnswerLogps(_model(tiny_model, checkpointing=True)), make_layout_batch(pairs, lay))
    ref, g_ref = _loss_and_grads(AnswerLogps(_model(tiny_model)), make_layout_batch(pairs, lay))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_got[name], g, rtol=0, atol=1e-5, msg=name)


def test_grouped_calls_equal_single_calls_and_the_mask():
    """group_slack > 0 pads parts of different lengths into one sdpa call: the same outputs and gradients as
    one call per part and as the 4-D mask, GQA, two rows, row padding left at zero."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    # (row, start, causal tokens, prefix, continuation): shared-prefix segments and plain ones
    spans = [[0, 0, 9, 4, 5], [0, 14, 11, 3, 4], [0, 29, 7, 7, 0], [1, 0, 10, 4, 6], [1, 16, 12, 12, 0]]
    rows, T = 2, 40
    seg_id = torch.full((rows, T), -1)
    role = torch.full((rows, T), -1)
    for i, (r, s, n, p, c) in enumerate(spans):
        seg_id[r, s : s + n + c] = i
        role[r, s : s + p], role[r, s + p : s + n], role[r, s + n : s + n + c] = 0, 1, 2
    inputs = [torch.randn(rows, h, T, dim, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
    real = (seg_id >= 0)[:, :, None, None]
    upstream = torch.randn(rows, T, heads, dim) * real

    def run(fn):
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        (out * upstream).sum().backward()
        return out.detach() * real, [t.grad.clone() for t in inputs]

    mask = attention_mask_4d(seg_id, role)
    rep = heads // kv_heads
    want = run(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
        ).transpose(1, 2)
    )
    layout = torch.tensor(spans)
    for slack in (0.0, 10.0):
        seg = attention.plan(layout, rows, T, group_slack=slack)
        assert len(seg.groups) == (8 if slack == 0 else 2)  # 5 causal parts + 3 continuations, or 1 + 1
        out, grads = run(lambda q, k, v, seg=seg: attention.segment_attention(None, q, k, v, seg))
        assert not out[~real.expand_as(out)].any(), "row padding is not zero"
        torch.testing.assert_close(out, want[0], rtol=0, atol=1e-5)
        for g, w in zip(grads, want[1]):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_the_model_attends_as_configured_without_a_layout(tiny_model):
    """enable() switches the attention implementation, but a forward without a segment layout (eval,
    generation, the mask path) is the configured attention's, padding mask included."""
    model = _model(tiny_model).eval()
    ids = torch.randint(4, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        attention.enable(model)
        assert attention.enable(model) == "offdpo_segments+sdpa"  # idempotent
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        attention.plan(torch.tensor([[0, 30, 20, 5, 0]]), 1, 40)
    with pytest.raises(ValueError, match="does not fit"):
        attention.plan(torch.tensor([[0, 0, 10, 12, 3]]), 1, 40)  # a prefix longer than the causal part
    seg = attention.plan(torch.tensor([[0, 0, 10, 10, 0]]), 1, 10)
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match="segment plan is for"):
        attention.segment_attention(None, q, q, q, seg)
