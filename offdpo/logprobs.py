"""Per-token log-probs from a causal LM's hidden states, in chunks.

A full [tokens x vocab] float32 logits tensor is 4 GB for 8k tokens of a 128k vocabulary. Here the
LM head, log-softmax and gather run over `chunk_size` positions at a time.
- gather_token_logprobs: autograd ops per chunk; with `checkpoint=True` each chunk's logits are recomputed
  in backward instead of kept. Used by refscore's transformers engine (no grad), and by the trainer before
  issue 29 (AnswerLogps(fused_head=False)).
- fused_token_logprobs: the trainer's head, one autograd.Function with a hand-written backward (see the
  note above it): one reused logits buffer, one weight-gradient buffer, no autograd temporaries.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    # log_softmax(x)[t] = x[t] - logsumexp(x): avoids a second [chunk x vocab] tensor.
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def gather_token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    checkpoint: bool = False,
) -> torch.Tensor:
    """log p(targets[..., i] | ...) from hidden states that predict them.

    hidden: [..., T, H] (the states at positions that predict each target); targets: [..., T] int64.
    Returns float32 [..., T].
    """
    lead = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    outs = []
    for start in range(0, flat_t.shape[0], chunk_size):
        h, t = flat_h[start : start + chunk_size], flat_t[start : start + chunk_size]
        if checkpoint and torch.is_grad_enabled():
            outs.append(_checkpoint(_chunk_logprobs, h, weight, bias, t, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(h, weight, bias, t))
    if not outs:
        return torch.zeros(lead, dtype=torch.float32, device=hidden.device)
    return torch.cat(outs).reshape(lead)


# -- the fused head (issue 29) -----------------------------------------------------------------------------
# The checkpointed path above runs, per chunk, the logits GEMM twice (forward, recompute), autograd's
# log-softmax/gather backward (several full passes over the [chunk x vocab] logits and fresh temporaries of
# that size) and hands autograd a fresh [vocab x hidden] weight gradient per chunk to add up. On a CPU the
# [chunk x vocab] buffer (134 MB at 220 x 151,936) is far larger than the caches, so every elementwise pass
# over it is a trip to memory. The fused head instead:
#   forward:  logits = h @ W^T (+ b) into ONE reused float32 buffer, the label logit gathered, then torch's
#             row-wise log-softmax kernel in place (a row stays in cache between its max, sum and write);
#             nothing of the chunk is kept: only the inputs are saved.
#   backward: the logits recomputed once into the same buffer, softmax in place by the same kernel (it
#             recomputes the row's log-sum-exp in cache: 11 ms per 220 x 151,936 chunk against 19 ms for
#             exp(x - saved lse), two whole-chunk passes; bench/results/head.json), and the
#             upstream per-row gradient g folded into the small operands of the two GEMMs instead of a pass
#             over the buffer:  dh = g * (W[t] - P @ W),  dW = sum_chunks (g*h)^T scattered at t - P^T @ (g*h),
#             dW accumulated by addmm_ into ONE [vocab x hidden] buffer.
# 4 GEMMs, like the checkpointed path: the gradient-in-forward way (Liger's, 3 GEMMs) needs the upstream
# gradient during the forward, which for DPO is one scalar per answer known only after every chunk of both
# answers is summed; keeping the weight gradient per answer instead would cost an extra [vocab x hidden]
# buffer per answer (bench/head.py measures the trade: ~0.7x the CPU time, +2.5 GB for 4 pairs).
# torch 2.13's F.linear_cross_entropy(reduction="none") is as fast in float32 here (both GEMM-bound), but in
# bfloat16 it was slower than the old head with 4x the fused head's peak (its CPU policy runs float32 GEMMs).


def head_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in: autocast's where it is on (as F.linear would), else the weight's."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _chunk_logits(
    out32: torch.Tensor,
    low: torch.Tensor | None,
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """out32 <- h @ w^T (+ bias), float32. A low-precision GEMM writes to `low` (a reused scratch of the
    GEMM's dtype) and is widened into out32: the CPU has no float32-output bf16 GEMM (mm out_dtype)."""
    target = out32 if low is None else low
    if bias is None:
        torch.mm(h, w.t(), out=target)
    else:
        torch.addmm(bias.to(target.dtype), h, w.t(), out=target)
    if low is not None:
        out32.copy_(low)


class _FusedTokenLogprobs(torch.autograd.Function):
    """log p(t_i | h_i) for rows i of h, float32 [N]; see the note above."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        ctx.save_for_backward(hidden, weight, bias, targets)
        if n == 0:
            return out
        rows = min(chunk_rows, n)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w, b = hidden.to(compute_dtype), weight.to(compute_dtype), bias
            buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            low = None if compute_dtype == torch.float32 else torch.empty_like(buf, dtype=compute_dtype)
            for s in range(0, n, rows):
                e = min(s + rows, n)
                logits = buf[: e - s]
                _chunk_logits(logits, None if low is None else low[: e - s], h_all[s:e], w, b)
                # log_softmax in place: a row-wise kernel, so one trip to memory instead of one per op.
                torch._log_softmax(logits, 1, False, out=logits)
                out[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, _, _, _, _ = ctx.needs_input_grad
        need_b = bias is not None and ctx.needs_input_grad[2]
        n, vocab = hidden.shape[0], weight.shape[0]
        cdt = ctx.compute_dtype
        grad_h = torch.zeros_like(hidden) if need_h else None
        # The ONE weight-gradient buffer, in the weight's dtype when the GEMMs run in it (float32, or a bf16
        # model: addmm_ adds each chunk in one rounding, as autograd added the old head's bf16 chunks), else
        # (autocast: float32 weights, bf16 GEMMs) float32, each chunk's bf16 GEMM landing in a reused scratch.
        acc_dtype = weight.dtype if weight.dtype == cdt else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        if n == 0 or not (need_h or need_w or need_b):
            return grad_h, _cast(grad_w, weight), _cast(grad_b, bias), None, None, None
        rows = min(ctx.chunk_rows, n)
        g_all = grad_out.to(torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(cdt), weight.to(cdt)
            buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
            low = None if cdt == torch.float32 else torch.empty_like(buf, dtype=cdt)
            # Autocast: each chunk's bf16 weight-gradient GEMM goes through a small reused scratch, a slice of
            # the vocabulary at a time: a whole [V, H] bf16 scratch, and the float32 copy of it that a mixed-
            # dtype sub_ makes on the CPU, measured +300 MB of peak at 151,936 x 512.
            step_v = max(1, _WGRAD_SCRATCH_BYTES // (weight.shape[1] * _itemsize(cdt)))
            w_scratch = (
                torch.empty(min(step_v, vocab), weight.shape[1], dtype=cdt, device=weight.device)
                if need_w and cdt != acc_dtype
                else None
            )
            for s in range(0, n, rows):
                e = min(s + rows, n)
                logits = buf[: e - s]
                low_c = None if low is None else low[: e - s]
                _chunk_logits(logits, low_c, h_all[s:e], w, bias)
                torch._softmax(logits, 1, False, out=logits)  # P, in place, row-wise like the forward
                p = logits
                if low_c is not None:
                    low_c.copy_(logits)
                    p = low_c
                g, t = g_all[s:e, None], targets[s:e]
                gh = (h_all[s:e].float() * g).to(cdt)  # g folded into the small [rows x hidden] operand
                if grad_h is not None:
                    # dh = g * (W[t] - P @ W)
                    dh = torch.mm(p, w).float().mul_(-g).add_(w.index_select(0, t).float() * g)
                    grad_h[s:e] = dh.to(grad_h.dtype)
                if grad_w is not None:
                    if w_scratch is None:
                        grad_w.addmm_(p.t(), gh, alpha=-1)
                    else:
                        for v in range(0, vocab, step_v):
                            scratch = w_scratch[: min(step_v, vocab - v)]
                            torch.mm(p[:, v : v + step_v].t(), gh, out=scratch)
                            grad_w[v : v + step_v].sub_(scratch)
                    grad_w.index_add_(0, t, gh.to(acc_dtype))
                if grad_b is not None:
                    grad_b.sub_(torch.mv(logits.t(), g.squeeze(1))).index_add_(0, t, g.squeeze(1))
        return grad_h, _cast(grad_w, weight), _cast(grad_b, bias), None, None, None


_WGRAD_SCRATCH_BYTES = 32 << 20


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return grad if grad is None or like is None or grad.dtype == like.dtype else grad.to(like.dtype)


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the LM head (weight [V, H], optional bias [V]), float32 [N].

    hidden: [N, H], the states that predict each target (answer positions only); chunk_rows: positions per
    chunk of float32 logits. Gradients flow to hidden, weight (tied or not) and bias."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"fused_token_logprobs: hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)} (flatten the batch first)"
        )
    if chunk_rows < 1:
        raise ValueError(f"fused_token_logprobs: chunk_rows must be >= 1, got {chunk_rows}")
    dtype = head_compute_dtype(hidden, weight)
    out: torch.Tensor = _FusedTokenLogprobs.apply(hidden, weight, bias, targets, chunk_rows, dtype)
    return out
