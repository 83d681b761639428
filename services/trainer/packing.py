"""Batch layouts for the trainer's forward pass: shared prompts and padding-free packing.

Three layouts build the same `losses.Batch` (the same answer log-probs, loss and gradients):

  padded        chosen rows then rejected rows, each [prompt, answer], right-padded to the longest
                (losses.make_batch; the prompt is computed twice per pair)
  shared prefix one segment [prompt, chosen, rejected] per pair: the rejected tokens see the prompt
                but not the chosen answer, and their positions restart after the prompt (Wang et al.
                2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
                arXiv 2410.20305): the prompt is computed once
  packed        several segments share a row (about `row_tokens` each, balanced), each
                with its own positions and a block-diagonal causal mask: no padding inside a row

Any layout other than the plain padded one passes explicit position_ids and either its segment layout
(Layout.attention "varlen", the CPU's default: each segment attended on its own, services.trainer.attention)
or a 4-D boolean mask [rows, 1, T, T] (True: may attend); transformers (>= 4.53, 5.x) uses a 4-D mask as given.
The module also counts the useful FLOPs of a batch (for MFU) and plans token-budget micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    share_prefix: bool = True
    pack: bool = True
    row_tokens: int = 4096  # packed rows hold about this many tokens (the longest segment is never split)
    # How packed segments are computed. "mask" (default): rows of several segments with a 4-D block mask,
    # one forward. "segments": one row, no padding and no mask; each segment's [prompt, chosen] runs
    # causally (sdpa's causal kernel) and its rejected answer as a continuation of the prompt's key/value
    # cache (gradients flow through the cache). Measured on the 2-core CPU (bench-qwen-vocab, chat_like,
    # 2 pairs, CPU seconds per step, two rounds under load ~30): mask 29.0 / 27.6, shared-prefix rows
    # 30.5 / 30.0, padded 34.3 / 33.5, segments 42.9 / 34.0.
    pack_mode: str = "mask"
    # How rows of several segments (and shared-prefix rows) are attended. "varlen": no 4-D mask; the
    # segment layout rides in the model call and each segment runs sdpa's causal kernel on its own keys
    # (services.trainer.attention), so no block of another segment or of padding is computed. "mask":
    # the 4-D block mask (kept for parity tests and other devices). "auto": varlen on the CPU (measured
    # there; see bench/trainer_ab.py --layouts), mask elsewhere.
    attention: str = "auto"


ATTENTIONS = ("auto", "varlen", "mask")


def uses_varlen(layout: Layout, device: torch.device | str) -> bool:
    """Whether `layout`'s rows are attended per segment (services.trainer.attention) on `device`."""
    if layout.attention not in ATTENTIONS:
        raise ValueError(f"Layout.attention must be one of {', '.join(ATTENTIONS)}, not {layout.attention!r}")
    if layout.attention == "auto":
        return torch.device(device).type == "cpu"
    return layout.attention == "varlen"


def segment_length(e: Any, share_prefix: bool) -> list[int]:
    """Token counts of the segments a pair becomes."""
    p, c, r = len(e.prompt), len(e.chosen), len(e.rejected)
    return [p + c + r] if share_prefix else [p + c, p + r]


def pair_tokens(e: Any, share_prefix: bool) -> int:
    return sum(segment_length(e, share_prefix))


def _rows(lengths: list[int], pack: bool, row_tokens: int) -> list[list[int]]:
    """Segment indices per row: one per row, or packed into ceil(total / row_tokens) rows balanced by
    length (longest first into the emptiest row), so the rows end close together: little padding, and
    no row longer than about row_tokens + the longest segment (attention is quadratic in a row)."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    k = max(1, -(-sum(lengths) // max(row_tokens, 1)))
    rows: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(k), key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    return [row for row in rows if row]


def make_layout_batch(examples: Sequence[Any], layout: Layout, device: torch.device | str = "cpu", pad_id: int = 0):
    """A losses.Batch for `examples` in the given layout (see the module docstring)."""
    from services.trainer.losses import Batch

    B = len(examples)
    # Segments: (tokens, positions, roles, [(answer row index in 0..2B-1, answer start, answer len, predictor start)])
    segs: list[tuple[list[int], list[int], list[int], list[tuple[int, int, int, int]]]] = []
    refs = [0.0] * (2 * B)
    lengths = [0.0] * (2 * B)
    for i, e in enumerate(examples):
        p, c, r = list(e.prompt), list(e.chosen), list(e.rejected)
        P, C, R = len(p), len(c), len(r)
        refs[i] = float(sum(float(x) for x in e.ref_chosen))  # float64 sums, as make_batch
        refs[B + i] = float(sum(float(x) for x in e.ref_rejected))
        lengths[i], lengths[B + i] = C, R
        if layout.share_prefix:
            toks = p + c + r
            pos = list(range(P + C)) + list(range(P, P + R))
            roles = [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R
            # chosen token j is predicted by the state at P-1+j; rejected token 0 by the prompt's last
            # state (P-1), rejected token j >= 1 by the state at P+C+j-1.
            segs.append((toks, pos, roles, [(i, P, C, P - 1), (B + i, P + C, R, P - 1)]))
        else:
            segs.append((p + c, list(range(P + C)), [PROMPT] * P + [CHOSEN] * C, [(i, P, C, P - 1)]))
            segs.append((p + r, list(range(P + R)), [PROMPT] * P + [REJECTED] * R, [(B + i, P, R, P - 1)]))
    seg_len = [len(s[0]) for s in segs]
    per_segment = layout.pack and layout.pack_mode == "segments"
    rows = [list(range(len(segs)))] if per_segment else _rows(seg_len, layout.pack, layout.row_tokens)
    T = max(sum(seg_len[i] for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    pos_ids = torch.zeros((n_rows, T), dtype=torch.long)
    seg_id = torch.full((n_rows, T), -1, dtype=torch.long)
    role = torch.full((n_rows, T), -1, dtype=torch.long)
    hidden_index: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    seq_index: list[torch.Tensor] = []
    attn_pairs = 0
    spans: list[list[int]] = []  # per segment: row, start, causal tokens, prefix, continuation (attention.py)
    for r_i, row in enumerate(rows):
        off = 0
        for s in row:
            toks, pos, roles, answers = segs[s]
            n = len(toks)
            ids[r_i, off : off + n] = torch.tensor(toks, dtype=torch.long)
            pos_ids[r_i, off : off + n] = torch.tensor(pos, dtype=torch.long)
            seg_id[r_i, off : off + n] = s
            role[r_i, off : off + n] = torch.tensor(roles, dtype=torch.long)
            base = r_i * T + off
            for out_row, start, length, first_pred in answers:
                if length == 0:
                    continue
                # the first answer token is predicted by first_pred (the prompt's last state), the rest
                # by the answer's own states
                idx = torch.cat(
                    [torch.tensor([base + first_pred]), torch.arange(base + start, base + start + length - 1)]
                )
                hidden_index.append(idx)
                targets.append(torch.tensor(toks[start : start + length], dtype=torch.long))
                seq_index.append(torch.full((length,), out_row, dtype=torch.long))
            P = roles.count(PROMPT)
            if layout.share_prefix:
                n_c, n_r = roles.count(CHOSEN), roles.count(REJECTED)
                attn_pairs += (P + n_c) * (P + n_c + 1) // 2 + n_r * P + n_r * (n_r + 1) // 2
                spans.append([r_i, off, P + n_c, P, n_r])
            else:
                attn_pairs += n * (n + 1) // 2
                spans.append([r_i, off, n, n, 0])
            off += n
    plain = not layout.share_prefix and not layout.pack
    segments = segment_layout = None
    if per_segment:  # (first part, its prompt, the continuation) per segment: see AnswerLogps.forward
        mask, positions = torch.ones((1, T), dtype=torch.long), None
        segments = torch.tensor(
            [[len(s[0]) - s[2].count(REJECTED), s[2].count(PROMPT), s[2].count(REJECTED)] for s in segs],
            dtype=torch.long,
        )
    elif plain:
        mask = (seg_id >= 0).long()
        positions = None
    elif uses_varlen(layout, device):  # the layout replaces the mask; positions as for the mask
        mask, positions = (seg_id >= 0).long(), pos_ids
        segment_layout = torch.tensor(spans, dtype=torch.long)
    else:
        mask = attention_mask_4d(seg_id, role)
        positions = pos_ids
    real = int((seg_id >= 0).sum())
    logical = sum(len(e.prompt) * 2 + len(e.chosen) + len(e.rejected) for e in examples)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        hidden_index=torch.cat(hidden_index).to(device) if hidden_index else torch.zeros(0, dtype=torch.long),
        targets=torch.cat(targets).to(device) if targets else torch.zeros(0, dtype=torch.long),
        seq_index=torch.cat(seq_index).to(device) if seq_index else torch.zeros(0, dtype=torch.long),
        answer_lengths=torch.tensor(lengths, dtype=torch.float32, device=device),
        ref_logps=torch.tensor(refs, dtype=torch.float32, device=device),
        num_pairs=B,
        num_tokens=logical,
        position_ids=positions.to(device) if positions is not None else None,
        computed_tokens=real,
        padded_tokens=n_rows * T,
        attention_pairs=attn_pairs,
        segments=segments,
        segment_layout=segment_layout.to(device) if segment_layout is not None else None,
    )


def attention_mask_4d(seg_id: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] bool: query q may see key k iff same segment, k <= q, and not (q rejected, k chosen).

    Padding queries see themselves only (a fully masked row would make the attention NaN)."""
    T = seg_id.shape[1]
    same = (seg_id[:, :, None] == seg_id[:, None, :]) & (seg_id[:, None, :] >= 0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    hidden_answer = (role[:, :, None] == REJECTED) & (role[:, None, :] == CHOSEN)
    mask = same & causal & ~hidden_answer
    mask |= torch.eye(T, dtype=torch.bool) & (seg_id < 0)[:, :, None]
    return mask[:, None]


def plan_micro_batches(
    examples: Sequence[Any], world: int, per_rank: int, micro_pairs: int, token_budget: int, share_prefix: bool
) -> tuple[list[list[list[Any]]], int]:
    """Per rank, its micro-batches (lists of examples), and the number every rank must run.

    token_budget > 0: micro-batches are filled up to that many tokens (at least one pair each), longest
    pairs first; otherwise `micro_pairs` pairs each. Every rank holds the whole global batch, so every rank
    computes every rank's plan and the same count (DDP/FSDP collectives must line up)."""
    plans = []
    for r in range(world):
        mine = list(examples[r * per_rank : (r + 1) * per_rank])
        if token_budget <= 0:
            plans.append([mine[i : i + micro_pairs] for i in range(0, len(mine), micro_pairs)])
            continue
        order = sorted(mine, key=lambda e: -pair_tokens(e, share_prefix))
        micros: list[list[Any]] = []
        used: list[int] = []
        for e in order:
            t = pair_tokens(e, share_prefix)
            for k, u in enumerate(used):
                if u + t <= token_budget:
                    micros[k].append(e)
                    used[k] += t
                    break
            else:
                micros.append([e])
                used.append(t)
        plans.append(micros)
    return plans, max(1, max(len(p) for p in plans))


def step_flops(
    shape: tuple[int, int, int, int], computed_tokens: float, answer_tokens: float, attn_pairs: float
) -> float:
    """Useful training FLOPs (forward + backward): 6 x body parameters per computed token (a shared prompt
    once), 6 x LM-head parameters per answer token (the head runs only there), and 12 x layers x attention
    width per (query, key) pair attended (QK^T and AV, forward and backward; causal). Padding and
    recomputation (the checkpointed head chunks) are not useful work and are not counted.
    shape: model_flop_shape(model)."""
    layers, attn_dim, body, head = shape
    return 6.0 * body * computed_tokens + 6.0 * head * answer_tokens + 12.0 * layers * attn_dim * attn_pairs


def model_flop_shape(model) -> tuple[int, int, int, int]:
    """(layers, attention width, body parameters, head parameters) of a causal LM (tied head counted once)."""
    cfg = model.config
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # The embedding lookup is not a matmul: body = all but the embedding table (and the head, if untied).
    body = total - emb.numel() - (0 if head is emb else head.numel())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, body, head.numel()


def matmul_ceiling_gflops(size: int = 1024, seconds: float = 0.3) -> float:
    """A quick float32 GEMM ceiling of this device (best of torch's linear and oneDNN): MFU's denominator."""
    import time

    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    x = torch.randn(size, size, device=dev)
    w = torch.randn(size, size, device=dev)
    fns = [lambda: torch.nn.functional.linear(x, w)]
    if not on_gpu and torch.backends.mkldnn.is_available():
        xm, wm = x.to_mkldnn(), w.to_mkldnn()
        fns.append(lambda: torch._C._nn.mkldnn_linear(xm, wm, None))
    best = float("inf")
    for fn in fns:
        try:
            fn()
        except RuntimeError:
            continue
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            if on_gpu:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9
