"""Packing and planning (services/trainer/packing.py) without a model: rows, padding, token-budget
micro-batches, the FLOP count, the LM-head chunk by bytes, and the MFU / padding metrics."""

from __future__ import annotations

import dataclasses

import torch

from services.trainer.config import TrainerConfig
from services.trainer.examples import Example
from services.trainer.losses import AnswerLogps, make_batch
from services.trainer.packing import (
    Layout,
    _rows,
    make_layout_batch,
    pair_tokens,
    plan_micro_batches,
    step_flops,
)
from services.trainer.step import layout_for, layout_of, padded_saving, step_metrics
from services.trainer.step import make_batch as step_make_batch

from .test_prefix_sharing import random_pairs


def test_rows_balance_and_keep_every_segment_once():
    lengths = [500, 20, 300, 300, 90, 1200, 40, 10]
    rows = _rows(lengths, pack=True, row_tokens=1000)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in r) for r in rows]
    assert len(rows) == -(-sum(lengths) // 1000)
    assert max(loads) <= 1000 + max(lengths)
    assert _rows(lengths, pack=False, row_tokens=1000) == [[i] for i in range(len(lengths))]


def test_packed_layout_has_less_padding_and_counts_tokens_once():
    pairs = random_pairs(12, seed=4)
    padded = make_batch(pairs)
    shared = make_layout_batch(pairs, Layout(share_prefix=True, pack=False))
    packed = make_layout_batch(pairs, Layout(share_prefix=True, pack=True, row_tokens=256))
    logical = sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in pairs)
    assert padded.num_tokens == shared.num_tokens == packed.num_tokens == logical
    assert padded.computed_tokens == logical
    assert shared.computed_tokens == packed.computed_tokens == logical - sum(len(e.prompt) for e in pairs)
    waste = {k: 1 - b.computed_tokens / b.padded_tokens for k, b in (("pad", padded), ("pack", packed))}
    assert waste["pack"] < waste["pad"] and waste["pack"] < 0.2
    assert packed.attention_pairs < padded.attention_pairs  # the shared prompt's attention is counted once
    # position ids restart after the prompt for the rejected answer: every row's positions are the segment's
    assert packed.position_ids is not None and packed.position_ids.max() < max(
        len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in pairs
    )


def test_token_budget_plan_fills_micro_batches_and_lines_up_ranks():
    pairs = random_pairs(10, seed=6)
    plans, n = plan_micro_batches(pairs, world=2, per_rank=5, micro_pairs=4, token_budget=120, share_prefix=True)
    assert len(plans) == 2 and n == max(len(p) for p in plans)
    for r, plan in enumerate(plans):
        assert sorted(e.pair_id for m in plan for e in m) == sorted(e.pair_id for e in pairs[r * 5 : (r + 1) * 5])
        for m in plan:  # a pair over the budget goes alone; otherwise the budget holds
            assert len(m) == 1 or sum(pair_tokens(e, True) for e in m) <= 120
    plans, n = plan_micro_batches(pairs, world=1, per_rank=10, micro_pairs=4, token_budget=0, share_prefix=True)
    assert [len(m) for m in plans[0]] == [4, 4, 2] and n == 3


def test_step_flops_counts_head_per_answer_token_and_prompt_once():
    pairs = random_pairs(5, seed=8)
    shape = (2, 128, 1000, 50000)  # layers, attention width, body params, head params
    padded = make_batch(pairs)
    shared = make_layout_batch(pairs, Layout(True, True))

    def flops(b):
        return step_flops(shape, b.computed_tokens, b.targets.numel(), b.attention_pairs)

    answers = sum(len(e.chosen) + len(e.rejected) for e in pairs)
    assert padded.targets.numel() == shared.targets.numel() == answers
    assert flops(padded) - flops(shared) == 6 * 1000 * sum(len(e.prompt) for e in pairs) + 12 * 2 * 128 * (
        padded.attention_pairs - shared.attention_pairs
    )


def test_lm_head_chunk_is_sized_in_bytes():
    head = torch.nn.Linear(8, 151936, bias=False)
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    m = AnswerLogps.__new__(AnswerLogps)
    torch.nn.Module.__init__(m)
    m.model, m.chunk_size, m.chunk_bytes = model, 0, 128 << 20
    assert m.head_chunk_positions() == (128 << 20) // (4 * 151936) == 220
    m.chunk_size = 100
    assert m.head_chunk_positions() == 100
    assert TrainerConfig().logprob_chunk_bytes == 128 << 20


def test_step_metrics_log_mfu_beside_tokens_per_s():
    sums = dict.fromkeys(("loss", "chosen", "rejected", "correct", "logps_c", "logps_r"), 0.0)
    sums.update(tokens=1000.0, computed=800.0, padded=1000.0, answer_tokens=500.0, attn_pairs=10000.0)
    shape = (2, 64, 1_000_000, 2_000_000)
    v = step_metrics(sums, 4, 1.0, 1e-6, 2.0, shape, peak_gflops=100.0)
    expect = step_flops(shape, 800, 500, 10000) / 2.0 / 100e9
    assert abs(v["mfu"] - expect) < 1e-12 and v["tokens_per_s"] == 500.0
    assert abs(v["padding_waste"] - 0.2) < 1e-12
    assert "mfu" not in step_metrics(sums, 4, 1.0, 1e-6, 2.0)


def _pair(p: int, c: int, r: int, i: int = 0) -> Example:
    return Example(f"x{i}", list(range(4, 4 + p)), [5] * c, [6] * r, [-1.0] * c, [-1.0] * r)


def test_the_padded_layout_is_used_where_sharing_and_packing_save_too_little():
    """Uniform short answers (bench `current`: 2% padding, a short prompt) save ~14% of the padded
    layout's positions, less than the masked kernel costs on the CPU: the padded layout. Chat-like
    batches (uneven answers) and long shared prompts save far more: the configured layout."""
    default = TrainerConfig(model="m")
    uniform = [_pair(32, 96 - i % 4, 95 - i % 3, i) for i in range(8)]
    uneven = [_pair(40, 20 + 60 * (i % 2), 400 if i == 0 else 30, i) for i in range(8)]
    long_prompt = [_pair(2000, 150, 200, i) for i in range(2)]
    configured = layout_of(default)
    assert padded_saving(uniform, configured) < default.layout_min_saving < padded_saving(uneven, configured)
    assert padded_saving(long_prompt, configured) > 0.4  # the prompt once instead of twice
    plain = layout_for(uniform, default)
    assert not plain.share_prefix and not plain.pack
    assert layout_for(uneven, default) == configured and layout_for(long_prompt, default) == configured
    always = dataclasses.replace(default, layout_min_saving=0.0)
    assert layout_for(uniform, always) == configured
    # and the batch make_batch builds is that layout's: no 4-D mask for the padded one, and on the CPU none
    # for the packed one either (its segment layout instead: services.trainer.attention)
    padded_batch, packed_batch = (step_make_batch(m, "cpu", 0, default) for m in (uniform, uneven))
    assert padded_batch.attention_mask.dim() == 2 and padded_batch.segment_layout is None
    assert packed_batch.attention_mask.dim() == 2 and packed_batch.segment_layout is not None
    mask_batch = make_layout_batch(uneven, dataclasses.replace(configured, attention="mask"))
    assert mask_batch.attention_mask.dim() == 4 and mask_batch.segment_layout is None


def test_attention_setting_is_checked_and_auto_means_varlen_on_the_cpu():
    pairs = random_pairs(4, seed=1)
    assert make_layout_batch(pairs, Layout(True, True)).segment_layout is not None
    assert make_layout_batch(pairs, Layout(True, True, attention="varlen")).segment_layout is not None
    assert make_layout_batch(pairs, Layout(False, False, attention="varlen")).segment_layout is None  # plain rows
    try:
        make_layout_batch(pairs, Layout(True, True, attention="flash"))
    except ValueError as e:
        assert "auto, varlen, mask" in str(e)
    else:
        raise AssertionError("an unknown attention setting was accepted")
