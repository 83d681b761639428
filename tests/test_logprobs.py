import contextlib

import pytest
import torch

from offdpo.fingerprint import model_fingerprint
from offdpo.logprobs import fused_token_logprobs, gather_token_logprobs


def test_chunked_gather_matches_full_log_softmax_with_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    full = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[..., None])[..., 0]
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    for chunk, ckpt in ((3, False), (5, True), (100, False)):
        got = gather_token_logprobs(hidden, head, targets, chunk_size=chunk, checkpoint=ckpt)
        assert torch.allclose(got, full, atol=1e-6)
        (g,) = torch.autograd.grad(got.sum(), hidden)
        assert torch.allclose(g, g_full, atol=1e-6)


def test_fingerprint_changes_with_weights_dtype_and_template(tiny_model, tmp_path):
    import shutil

    a = model_fingerprint(tiny_model, dtype="float32", engine="vllm", engine_version="x")
    b = model_fingerprint(tiny_model, dtype="float32", engine="transformers", engine_version="y")
    assert a.fingerprint_id == b.fingerprint_id, "engine is not part of identity"
    assert (
        model_fingerprint(tiny_model, dtype="bfloat16", engine="vllm", engine_version="x").fingerprint_id
        != a.fingerprint_id
    )
    assert (
        model_fingerprint(
            tiny_model, dtype="float32", engine="vllm", engine_version="x", chat_template="{{ messages }}"
        ).fingerprint_id
        != a.fingerprint_id
    )
    copy = tmp_path / tiny_model.name
    shutil.copytree(tiny_model, copy)
    assert (
        model_fingerprint(copy, dtype="float32", engine="vllm", engine_version="x").fingerprint_id == a.fingerprint_id
    )
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy, dtype="float32", engine="vllm", engine_version="x").weights_hash != a.weights_hash


# -- the fused head (offdpo.logprobs.fused_token_logprobs) against the autograd head ------------------------


def _answer_sums(token_logps, seq_index, rows):
    return torch.zeros(rows).index_add(0, seq_index, token_logps.float())


def _both_heads(hidden, head, targets, seq_index, rows, chunk, g, autocast=None):
    """(sums, grad hidden, grads of head params) for the old head and the fused one, same inputs."""
    out = {}
    for name in ("old", "fused"):
        h = hidden.detach().clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with autocast() if autocast else contextlib.nullcontext():
            if name == "old":
                tok = gather_token_logprobs(h, head, targets, chunk_size=chunk, checkpoint=True)
            else:
                tok = fused_token_logprobs(h, head.weight, head.bias, targets, chunk)
        sums = _answer_sums(tok, seq_index, rows)
        (sums * g).sum().backward()
        out[name] = (sums.detach(), h.grad, [p.grad.clone() for p in head.parameters()])
    return out["old"], out["fused"]


def _answers(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000], ids=lambda c: f"chunk{c}")
def test_fused_head_equals_autograd_head_float32(bias, chunk):
    """Answers of 5, 0 (an empty answer), 13, 9 and 0 tokens: chunks of 7 cut answers in the middle."""
    torch.manual_seed(0)
    lengths = [5, 0, 13, 9, 0]
    seq_index, n = _answers(lengths), sum(lengths)
    head = torch.nn.Linear(24, 301, bias=bias)
    with torch.no_grad():
        head.weight.mul_(8)  # logits of several units: softmax far from uniform
    hidden = torch.randn(n, 24)
    targets = torch.randint(0, 301, (n,))
    g = torch.randn(len(lengths))  # a signed upstream gradient per answer, as DPO's
    (s0, gh0, gp0), (s1, gh1, gp1) = _both_heads(hidden, head, targets, seq_index, len(lengths), chunk, g)
    assert s0.abs().min() == 0 and s0[1] == 0 and s0[4] == 0, "the empty answers sum to 0"
    # Sums of ~150 nats: one float32 ulp there is 1.5e-5, so 1e-5 is relative for the sums.
    assert torch.allclose(s1, s0, atol=1e-5, rtol=1e-5), (s1 - s0).abs().max()
    assert torch.allclose(gh1, gh0, atol=1e-5, rtol=0), (gh1 - gh0).abs().max()
    for a, b in zip(gp1, gp0):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert gp1[0].abs().max() > 1e-3, "the weight gradient is not trivially zero"


def test_fused_head_tied_embedding_gradient():
    """A tied embedding/LM-head weight: its gradient is the sum of the embedding's and the head's."""
    torch.manual_seed(1)
    vocab, width = 97, 16
    emb = torch.nn.Embedding(vocab, width)
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight = emb.weight
    ids = torch.randint(0, vocab, (30,))
    targets = torch.randint(0, vocab, (30,))
    seq_index = _answers([11, 19])
    grads = []
    for fused in (False, True):
        emb.zero_grad(set_to_none=True)
        h = torch.tanh(emb(ids) @ torch.ones(width, width) / 4)  # a body between the embedding and the head
        tok = (
            fused_token_logprobs(h, head.weight, None, targets, 8)
            if fused
            else gather_token_logprobs(h, head, targets, chunk_size=8, checkpoint=True)
        )
        (_answer_sums(tok, seq_index, 2) * torch.tensor([1.0, -0.5])).sum().backward()
        assert emb.weight.grad is not None
        grads.append(emb.weight.grad.clone())
    assert torch.allclose(grads[1], grads[0], atol=1e-5, rtol=0), (grads[1] - grads[0]).abs().max()
    assert grads[0][ids].abs().max() > 0 and grads[0][targets].abs().max() > 0


# Bounds for bfloat16 GEMMs. Measured on this test's shapes (torch 2.13, AVX-512 BF16 CPU): the sums are
# equal (both heads run the forward GEMM in bf16 and the log-softmax in float32); the gradients differ by
# 2.4e-3 (hidden) and 3.7e-3 (weight) relative under autocast, 2.8e-3 / 4.2e-3 with bf16 weights, because
# the backward rounds differently (old: softmax-minus-one-hot rounded to bf16 before its GEMMs; fused:
# softmax in float32, g folded into the small operand). ~5x margins.
BF16_SUM_PER_TOKEN = 1e-3  # nats per answer token
BF16_GRAD_REL = 0.02  # |g_fused - g_old| / |g_old|, Frobenius


@pytest.mark.parametrize("mode", ["autocast", "autocast-vocab-slices", "bf16-weights"])
def test_fused_head_bfloat16_within_bound(mode, monkeypatch):
    if mode == "autocast-vocab-slices":  # the weight-gradient scratch of 100 vocabulary rows: 6 slices, the last short
        monkeypatch.setattr("offdpo.logprobs._WGRAD_SCRATCH_BYTES", 100 * 32 * 2)
    torch.manual_seed(2)
    lengths = [20, 0, 33, 11]
    seq_index, n = _answers(lengths), sum(lengths)
    head = torch.nn.Linear(32, 513, bias=False)
    with torch.no_grad():
        head.weight.mul_(6)
    hidden = torch.randn(n, 32)
    targets = torch.randint(0, 513, (n,))
    g = torch.randn(len(lengths))
    autocast = None
    if mode.startswith("autocast"):
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        head = head.to(torch.bfloat16)
        hidden = hidden.to(torch.bfloat16)
    (s0, gh0, gp0), (s1, gh1, gp1) = _both_heads(hidden, head, targets, seq_index, len(lengths), 16, g, autocast)
    assert s1.dtype == torch.float32
    assert gh1.dtype == hidden.dtype and gp1[0].dtype == head.weight.dtype
    per_token = (s1 - s0).abs() / torch.tensor(lengths).clamp(min=1)
    assert per_token.max() < BF16_SUM_PER_TOKEN, per_token
    for a, b in ((gh1, gh0), (gp1[0], gp0[0])):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < BF16_GRAD_REL, rel
    # ... and both near the float32 result: the fused head is no worse than the old one
    with torch.no_grad():
        ref = _answer_sums(
            fused_token_logprobs(hidden.float(), head.weight.float(), None, targets, 16), seq_index, len(lengths)
        )
    assert (s1 - ref).abs().max() <= (s0 - ref).abs().max() * 1.5 + 1e-3


def test_fused_head_rejects_unflattened_input():
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\]"):
        fused_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), None, torch.zeros(2, 3, dtype=torch.long), 4)
