"""Sequence log-probs of answers, and the preference losses.

Conventions follow TRL's DPOTrainer, so numbers are comparable:
  logits  = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))
  rewards = beta * (log pi(y|x) - log ref(y|x))            (implicit reward, Rafailov et al. 2023)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offdpo.logprobs import fused_token_logprobs, gather_token_logprobs


@dataclass
class Batch:
    """Chosen rows first, then rejected rows: one forward pass for both (right-padded)."""

    input_ids: torch.Tensor  # [2B, T] int64
    attention_mask: torch.Tensor  # [2B, T]
    hidden_index: torch.Tensor  # [N] flat index (row * T + pos) of the state that predicts each answer token
    targets: torch.Tensor  # [N] the answer tokens
    seq_index: torch.Tensor  # [N] which row each answer token belongs to
    answer_lengths: torch.Tensor  # [2B] float32
    ref_logps: torch.Tensor  # [2B] float32 sums of stored reference log-probs
    num_pairs: int
    num_tokens: int  # logical tokens: prompt + answer of both answers (the prompt counted twice), any layout
    # Set by the shared-prefix / packed layouts (services.trainer.packing); a 4-D bool attention_mask then.
    position_ids: torch.Tensor | None = None  # [rows, T]
    computed_tokens: int = 0  # non-pad positions the model computes (a shared prompt once)
    padded_tokens: int = 0  # rows x T: computed_tokens plus padding
    attention_pairs: int = 0  # (query, key) pairs attended, causal (the attention's useful work)
    # Per-segment layout: [n, 3] (tokens computed first, of which prompt, tokens continuing the prompt)
    segments: torch.Tensor | None = None
    # Packed / shared-prefix rows attended per segment (services.trainer.attention), no 4-D mask:
    # [segments, 5] (row, start, causal tokens, prefix the continuation sees, continuation tokens)
    segment_layout: torch.Tensor | None = None


def make_batch(examples, device: torch.device | str = "cpu", pad_id: int = 0) -> Batch:
    """examples: objects with prompt, chosen, rejected (token id lists), ref_chosen, ref_rejected (per-token lists)."""
    rows = [(e.prompt, e.chosen, e.ref_chosen) for e in examples] + [
        (e.prompt, e.rejected, e.ref_rejected) for e in examples
    ]
    T = max(len(p) + len(a) for p, a, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    hidden_index, targets, seq_index, lengths, refs = [], [], [], [], []
    for r, (prompt, answer, ref) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
        mask[r, :n] = 1
        # Loss only on answer tokens: the state at position i predicts token i+1.
        start = len(prompt)
        hidden_index.append(torch.arange(r * T + start - 1, r * T + n - 1))
        targets.append(torch.tensor(list(answer), dtype=torch.long))
        seq_index.append(torch.full((len(answer),), r, dtype=torch.long))
        lengths.append(len(answer))
        refs.append(float(sum(float(x) for x in ref)))  # summed in float64: stored per-token values are float32
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        hidden_index=torch.cat(hidden_index).to(device),
        targets=torch.cat(targets).to(device),
        seq_index=torch.cat(seq_index).to(device),
        answer_lengths=torch.tensor(lengths, dtype=torch.float32, device=device),
        ref_logps=torch.tensor(refs, dtype=torch.float32, device=device),
        num_pairs=len(examples),
        num_tokens=int(mask.sum()),
        computed_tokens=int(mask.sum()),
        padded_tokens=int(mask.numel()),
        attention_pairs=sum((len(p) + len(a)) * (len(p) + len(a) + 1) // 2 for p, a, _ in rows),
    )


DEFAULT_CHUNK_BYTES = 128 << 20


class AnswerLogps(torch.nn.Module):
    """Wraps a causal LM: forward(batch) -> summed answer log-probs per row, float32 [2B].

    Runs the base model for the last hidden states, then the LM head only over answer positions, in
    chunks (offdpo.logprobs), so no [tokens x vocab] float32 tensor is ever materialised. A chunk holds
    as many positions as fit `chunk_bytes` of float32 logits (128 MiB: 220 positions at a 151,936
    vocabulary, 8,192 at 4,096), capped at `chunk_size` positions (0: no cap).
    The head is the fused one (offdpo.logprobs.fused_token_logprobs: one reused logits buffer, the
    logits recomputed once in backward, one weight-gradient buffer); `fused_head=False` runs the earlier
    autograd head (each chunk checkpointed when `checkpoint_head`), kept as a reference for tests and
    bench/head.py. DDP/FSDP wrap this module, so their hooks see the whole computation.
    """

    def __init__(
        self,
        model,
        chunk_size: int = 0,
        checkpoint_head: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fused_head: bool = True,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self.checkpoint_head = checkpoint_head
        self.fused_head = fused_head

    def head_chunk_positions(self) -> int:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        n = max(1, self.chunk_bytes // (4 * vocab)) if self.chunk_bytes > 0 else 1 << 30
        return min(n, self.chunk_size) if self.chunk_size > 0 else n

    def forward(
        self,
        input_ids,
        attention_mask,
        hidden_index,
        targets,
        seq_index,
        num_rows: int,
        position_ids=None,
        segments=None,
        segment_layout=None,
    ):
        if segments is not None:
            hidden = self._segment_hidden(input_ids, segments)
        else:
            hidden = self._hidden(input_ids, attention_mask, position_ids, segment_layout)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index)
        head = self.model.get_output_embeddings()
        if self.fused_head:
            token_logps = fused_token_logprobs(
                h, head.weight, getattr(head, "bias", None), targets, self.head_chunk_positions()
            )
        else:
            token_logps = gather_token_logprobs(
                h, head, targets, chunk_size=self.head_chunk_positions(), checkpoint=self.checkpoint_head
            )
        return torch.zeros(num_rows, dtype=torch.float32, device=token_logps.device).index_add(
            0, seq_index, token_logps
        )

    def _segment_hidden(self, input_ids, segments):
        """Last hidden states of a one-row batch of segments, each run on its own: no padding, no mask.

        A segment (n, p, r) is n tokens run causally, then r tokens that continue its first p tokens (the
        prompt) with positions p.. : the keys/values of the prompt are reused (cropped cache), so the
        rejected answer sees the prompt and not the chosen answer, and the prompt is computed once."""
        from transformers import DynamicCache

        decoder = self.model.get_decoder()
        out, off = [], 0
        for n, p, r in segments.tolist():
            first = input_ids[:, off : off + n]
            if r == 0:
                out.append(decoder(input_ids=first, use_cache=False).last_hidden_state)
            else:
                cache = DynamicCache(config=self.model.config)
                out.append(decoder(input_ids=first, past_key_values=cache, use_cache=True).last_hidden_state)
                if n > p:  # keep the prompt's keys/values only (a negative crop removes that many)
                    cache.crop(p - n)
                pos = torch.arange(p, p + r, device=input_ids.device)[None]
                cont = input_ids[:, off + n : off + n + r]
                out.append(
                    decoder(input_ids=cont, past_key_values=cache, position_ids=pos, use_cache=True).last_hidden_state
                )
            off += n + r
        return torch.cat(out, dim=1)

    def _hidden(self, input_ids, attention_mask, position_ids, segment_layout=None):
        if segment_layout is not None:  # per-segment attention: no mask is built at all
            from services.trainer import attention

            attention.enable(self.model)  # once; the model attends as configured wherever no plan is passed
            seg = attention.plan(segment_layout, input_ids.shape[0], input_ids.shape[1])
            with attention.no_mask():
                return self.model.get_decoder()(
                    input_ids=input_ids, position_ids=position_ids, **{attention.KWARG: seg}
                ).last_hidden_state
        if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            impl = getattr(self.model.config, "_attn_implementation", "sdpa") or "eager"
            impl = impl.removeprefix("offdpo_segments+")  # services.trainer.attention wraps the configured one
            if impl not in ("sdpa", "flex_attention"):  # eager adds the mask to the scores: additive form
                dtype = self.model.get_input_embeddings().weight.dtype
                attention_mask = torch.zeros(
                    attention_mask.shape, dtype=dtype, device=attention_mask.device
                ).masked_fill(~attention_mask, torch.finfo(dtype).min)
        return self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state


def answer_logps(module, batch: Batch) -> torch.Tensor:
    return module(
        batch.input_ids,
        batch.attention_mask,
        batch.hidden_index,
        batch.targets,
        batch.seq_index,
        batch.answer_lengths.shape[0],
        position_ids=batch.position_ids,
        segments=batch.segments,
        segment_layout=batch.segment_layout,
    )


def preference_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    answer_lengths: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    reference_free: bool = False,
    sft_weight: float = 0.0,
):
    """Per-pair losses and rewards. Inputs are [2B]: chosen rows then rejected rows.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are detached.
    """
    B = policy_logps.shape[0] // 2
    pi, ref = policy_logps, (torch.zeros_like(ref_logps) if reference_free else ref_logps)
    if loss_type in ("ipo", "simpo"):
        # Length-normalised log-probs. IPO: TRL averages over tokens (the paper's Psi uses sums but
        # its regulariser 1/(2 beta) then scales with length); we follow TRL. SimPO normalises by |y|.
        pi, ref = pi / answer_lengths, ref / answer_lengths
    pi_c, pi_r, ref_c, ref_r = pi[:B], pi[B:], ref[:B], ref[B:]
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    eps = label_smoothing
    if loss_type == "sigmoid":
        # DPO, Rafailov et al. 2023, eq. 7; eps > 0: conservative DPO (cDPO, Mitchell 2023), labels flipped w.p. eps.
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        # Robust DPO, Chowdhury et al. 2024 ("Provably Robust DPO"), eq. 6: unbiased under flip rate eps < 0.5.
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "ipo":
        # IPO, Azar et al. 2023, eq. 17: squared distance of the log-ratio margin to 1/(2 beta).
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # SLiC hinge, Zhao et al. 2023 ("SLiC-HF"), with delta = 1/beta as in TRL: relu(1 - beta * logits).
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "simpo":
        # SimPO, Meng et al. 2024, eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
        # Reference-free in the paper (--reference-free); with a reference it is a length-normalised DPO.
        z = beta * logits - simpo_gamma
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if sft_weight:
        # RPO, Pang et al. 2024 ("Iterative Reasoning Preference Optimization"): + alpha * NLL of the
        # chosen answer, per token (as TRL's rpo_alpha).
        losses = losses + sft_weight * (-policy_logps[:B] / answer_lengths[:B])
    chosen_rewards = (beta * (pi_c - ref_c)).detach()
    rejected_rewards = (beta * (pi_r - ref_r)).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(policy_logps: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """Per-row NLL per token (the benchmark's SFT baseline trains on chosen and rejected answers alike)."""
    return -policy_logps / answer_lengths
