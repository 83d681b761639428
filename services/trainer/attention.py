"""Attention for packed rows without a 4-D mask: each segment attended causally on its own.

A packed row holds several segments (services.trainer.packing). With a 4-D block mask the CPU's sdpa
kernel computes every (query, key) block of the row, so a ~3,000-token row of five segments costs the
attention of one 3,000-token sequence, not of five short ones: the padding packing saved is spent again.
Here the row's layout travels with the model call instead (`segment_plan=` in the decoder's kwargs,
which transformers hands to every attention call, gradient-checkpoint recomputes included), and each
segment's queries attend only their own keys through torch's causal kernel:

  causal part   the segment's first n tokens ([prompt, chosen], or one [prompt, answer]): is_causal
  continuation  the shared-prefix layout's rejected answer: its r queries attend [the p prompt keys,
                its own keys], lower-right aligned causal (query j sees key k iff k <= p + j), an
                explicit [r, p + r] mask (sdpa's is_causal is top-left aligned when lengths differ)

Parts of equal shape (or close enough, `group_slack`) run as one batched sdpa call; padding inside a
group is exact (right-padded causal rows: a real query never reaches a padded key; continuations carry
their masks). Positions no segment covers (row padding) get zero outputs.

The switch is explicit: `enable(model)` installs the attention implementation `offdpo_segments+<base>`
(base: the model's configured one, e.g. sdpa), which behaves exactly as the base wherever no
`segment_plan` is passed (eval, generation, the 4-D mask path), and `no_mask()` keeps transformers from
building any mask for the one forward that carries a plan. The mask is built once per forward (never in a
checkpointed layer's recompute), so a context variable is enough there; the plan itself rides in kwargs.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

KWARG = "segment_plan"
PREFIX = "offdpo_segments+"
_NO_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("offdpo_segments_no_mask", default=False)

# A layout row per segment (services.trainer.packing builds it): the row it sits in, its first token,
# the tokens attended causally from there, how many of those the continuation sees (the prompt), and the
# continuation's length (tokens right after the causal part; 0: none).
ROW, START, CAUSAL, PREFIX_LEN, CONT = range(5)


@dataclass(frozen=True)
class _Group:
    """One sdpa call: `size` parts, queries/keys gathered by flat index (row * T + position)."""

    q_index: torch.Tensor | None  # [size * Lq] (None: a single causal part read as a view)
    k_index: torch.Tensor | None  # [size * Lk]
    view: tuple[int, int, int] | None  # single causal part: (row, start, length)
    size: int
    lq: int
    lk: int
    mask: torch.Tensor | None  # [size, 1, Lq, Lk] bool, True: may attend (None: is_causal)
    keep: torch.Tensor | None  # [n real queries] rows of the [size * Lq] output that are real (None: all)


@dataclass(frozen=True)
class SegmentPlan:
    """What every attention layer of one forward needs, computed once per batch (see `plan`)."""

    rows: int
    length: int
    groups: tuple[_Group, ...]
    dest: torch.Tensor  # [real queries] flat index each group's real outputs land at, in group order
    covered: int  # positions that belong to a segment (the rest are row padding)


def plan(layout: torch.Tensor, rows: int, length: int, group_slack: float = 0.0) -> SegmentPlan:
    """A SegmentPlan from a [segments, 5] layout (ROW, START, CAUSAL, PREFIX_LEN, CONT per segment).

    group_slack: parts join a group (one sdpa call, padded to its longest member) while the group's padded
    attention work stays within (1 + group_slack) of its members' own; 0 groups equal shapes only."""
    device = layout.device
    causal: list[tuple[int, int, int]] = []  # (row, start, n)
    cont: list[tuple[int, int, int, int, int]] = []  # (row, start, causal n, prefix p, r)
    for row, start, n, p, r in layout.tolist():
        if n < 0 or r < 0 or not 0 <= p <= n or (r and p == 0) or start < 0 or start + n + r > length:
            raise ValueError(f"segment layout row {(row, start, n, p, r)} does not fit a row of {length} tokens")
        if n:
            causal.append((row, start, n))
        if r:
            cont.append((row, start, n, p, r))
    groups: list[_Group] = []
    dest: list[torch.Tensor] = []
    ar = torch.arange(max(length, 1))
    for members in _group([(n, n) for _, _, n in causal], group_slack):
        parts = [causal[i] for i in members]
        lq = max(n for _, _, n in parts)
        real = [torch.arange(row * length + s, row * length + s + n) for row, s, n in parts]
        dest.extend(real)
        if len(parts) == 1:
            row, s, n = parts[0]
            groups.append(_Group(None, None, (row, s, n), 1, n, n, None, None))
            continue
        # right-padded with the part's last position: top-left causal, so no real query sees a pad key
        idx = torch.cat([torch.cat([x, x[-1:].expand(lq - len(x))]) for x in real])
        keep = torch.cat([i * lq + ar[: len(x)] for i, x in enumerate(real)])
        groups.append(_Group(idx.to(device), idx.to(device), None, len(parts), lq, lq, None, keep.to(device)))
    for members in _group([(r, p + r) for _, _, _, p, r in cont], group_slack):
        parts2 = [cont[i] for i in members]
        lq = max(r for *_, r in parts2)
        lk = max(p + r for *_, p, r in parts2)
        q_idx, k_idx, keep_l, masks = [], [], [], []
        for i, (row, s, n, p, r) in enumerate(parts2):
            base = row * length + s
            q = torch.arange(base + n, base + n + r)
            k = torch.cat([torch.arange(base, base + p), q])
            dest.append(q)
            q_idx.append(torch.cat([q, q[-1:].expand(lq - r)]))
            k_idx.append(torch.cat([k, k[-1:].expand(lk - p - r)]))
            keep_l.append(i * lq + ar[:r])
            # lower-right aligned causal: query j sees the prompt and its own keys up to j (padded keys sit
            # past p + r - 1 >= p + j for every real query; padded queries are dropped)
            masks.append(ar[:lk][None, :] <= (ar[:lq][:, None] + p))
        keep_t = torch.cat(keep_l)
        groups.append(
            _Group(
                torch.cat(q_idx).to(device),
                torch.cat(k_idx).to(device),
                None,
                len(parts2),
                lq,
                lk,
                torch.stack(masks)[:, None].to(device),
                None if len(keep_t) == len(parts2) * lq else keep_t.to(device),
            )
        )
    dest_t = torch.cat(dest) if dest else torch.zeros(0, dtype=torch.long)
    return SegmentPlan(rows, length, tuple(groups), dest_t.to(device), len(dest_t))


def _group(shapes: Sequence[tuple[int, int]], slack: float) -> list[list[int]]:
    """Indices of parts per group: sorted by shape, a part joins the current group while the group padded
    to its largest member costs at most (1 + slack) x its members' own Lq x Lk."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i], i))
    out: list[list[int]] = []
    for i in order:
        if out:
            members = out[-1] + [i]
            lq = max(shapes[j][0] for j in members)
            lk = max(shapes[j][1] for j in members)
            own = sum(shapes[j][0] * shapes[j][1] for j in members)
            if len(members) * lq * lk <= (1.0 + slack) * own:
                out[-1].append(i)
                continue
        out.append([i])
    return out


def segment_attention(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: SegmentPlan,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """[rows, T, heads, head_dim] attention output for [rows, heads, T, head_dim] inputs laid out by `seg`."""
    rows, heads, T, dim = query.shape
    if (rows, T) != (seg.rows, seg.length):
        raise ValueError(f"segment plan is for [{seg.rows}, {seg.length}] rows, the attention got [{rows}, {T}]")
    kv_heads = key.shape[1]
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    flat: tuple[torch.Tensor, ...] = ()
    outs: list[torch.Tensor] = []
    for g in seg.groups:
        if g.view is not None:  # one causal part: a view, no copy
            row, s, n = g.view
            q = query[row : row + 1, :, s : s + n]
            k = key[row : row + 1, :, s : s + n]
            v = value[row : row + 1, :, s : s + n]
        else:
            assert g.q_index is not None and g.k_index is not None
            if not flat:  # [rows * T, heads, dim]: views where the layout allows (q_proj(x).view().transpose())
                flat = tuple(t.transpose(1, 2).reshape(rows * T, t.shape[1], t.shape[-1]) for t in (query, key, value))
            flat_q, flat_k, flat_v = flat
            q = flat_q.index_select(0, g.q_index).view(g.size, g.lq, heads, dim).transpose(1, 2)
            k = flat_k.index_select(0, g.k_index).view(g.size, g.lk, kv_heads, dim).transpose(1, 2)
            v = flat_v.index_select(0, g.k_index).view(g.size, g.lk, kv_heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=g.mask, dropout_p=dropout, is_causal=g.mask is None, scale=scaling, **gqa
        )
        o = o.transpose(1, 2).reshape(g.size * g.lq, heads, -1)
        outs.append(o if g.keep is None else o.index_select(0, g.keep))
    src = torch.cat(outs) if len(outs) > 1 else outs[0]
    if seg.covered == rows * T and len(seg.groups) == 1 and seg.groups[0].view is not None:
        return src.view(rows, T, heads, -1)  # one segment fills the row: nothing to scatter
    out = src.new_zeros(rows * T, heads, src.shape[-1]).index_copy(0, seg.dest, src)
    return out.view(rows, T, heads, -1)


def _base_attention(module: torch.nn.Module, base: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" lives in each model's own module, not in the shared interface
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"segment attention: no attention function {base!r} for {type(module).__name__}")
    return eager


def _attention_for(base: str) -> Callable[..., Any]:
    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        seg = kwargs.pop(KWARG, None)
        if seg is None:  # everything but a packed training forward: the configured attention, unchanged
            return _base_attention(module, base)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if attention_mask is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("segment attention: a segment_plan forward takes no attention mask and no cache")
        if kwargs.get("sliding_window") is not None:
            raise ValueError(
                "segment attention does not implement sliding-window layers; use pack_mode='mask' for this model"
            )
        return segment_attention(module, query, key, value, seg, dropout=dropout, scaling=scaling), None

    return forward


def _mask_for(base: str) -> Callable[..., Any]:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base_mask = ALL_MASK_ATTENTION_FUNCTIONS[base]

    def mask(*args: Any, **kwargs: Any) -> Any:
        return None if _NO_MASK.get() else base_mask(*args, **kwargs)

    return mask


def enable(model: Any) -> str:
    """Give `model` the segment-aware attention (idempotent); it behaves as before without a plan."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config  # a transformers PreTrainedModel's
    base: str = config._attn_implementation or "eager"
    if base.startswith(PREFIX):
        return base
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"segment attention: attention implementation {base!r} is not supported (sdpa, eager, ...)")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _attention_for(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, _mask_for(base))
    config._attn_implementation = name
    return name


@contextlib.contextmanager
def no_mask() -> Iterator[None]:
    """While a segment_plan forward builds its masks: build none (the plan replaces them)."""
    token = _NO_MASK.set(True)
    try:
        yield
    finally:
        _NO_MASK.reset(token)
