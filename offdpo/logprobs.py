"""Per-token log-probs from a causal LM's hidden states, in chunks.

A full [tokens x vocab] float32 logits tensor is 4 GB for 8k tokens of a 128k vocabulary. Here the
LM head, log-softmax and gather run over `chunk_size` positions at a time; with
`checkpoint=True` (training) each chunk's logits are recomputed in backward instead of kept.
Used by refscore's transformers engine (no grad) and by the trainer (with grad).
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
