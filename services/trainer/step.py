"""One optimizer step's forward and backward passes, and the metrics logged for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from services.trainer.config import TrainerConfig
from services.trainer.distributed import all_sum
from services.trainer.losses import Batch, answer_logps, preference_loss, sft_loss
from services.trainer.packing import Layout, make_layout_batch, plan_micro_batches, segment_length, step_flops

Autocast = Callable[[], AbstractContextManager[Any]]
SUM_KEYS = (
    "loss",
    "chosen",
    "rejected",
    "correct",
    "logps_c",
    "logps_r",
    "tokens",  # logical tokens (prompt counted for both answers): the same in every layout
    "computed",  # positions the model computed (a shared prompt once)
    "padded",  # rows x length of the forward passes (computed + padding)
    "answer_tokens",
    "attn_pairs",
)


def layout_of(cfg: TrainerConfig) -> Layout:
    return Layout(share_prefix=cfg.share_prefix, pack=cfg.pack, row_tokens=cfg.pack_row_tokens, pack_mode=cfg.pack_mode)


def padded_saving(micro: Sequence[Any], layout: Layout) -> float:
    """The fraction of the padded layout's positions (2 rows per pair, as long as the longest) that
    `layout` does not compute: padding dropped by packing, the prompt computed once by sharing."""
    longest = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in micro)
    padded = 2 * len(micro) * longest
    if layout.pack:
        computed = sum(sum(segment_length(e, layout.share_prefix)) for e in micro)
    else:  # one row per pair (shared) padded to the longest
        computed = len(micro) * max(sum(segment_length(e, layout.share_prefix)) for e in micro)
    return 1.0 - computed / padded if padded else 0.0


def layout_for(micro: Sequence[Any], cfg: TrainerConfig) -> Layout:
    """The configured layout, or the padded one where sharing/packing would save too little for the
    cost of its masked attention (cfg.layout_min_saving)."""
    layout = layout_of(cfg)
    if (layout.share_prefix or layout.pack) and micro and padded_saving(micro, layout) < cfg.layout_min_saving:
        return Layout(share_prefix=False, pack=False, row_tokens=layout.row_tokens, pack_mode=layout.pack_mode)
    return layout


def make_batch(micro: Sequence[Any], device: torch.device | str, pad_id: int, cfg: TrainerConfig) -> Batch:
    return make_layout_batch(micro, layout_for(micro, cfg), device, pad_id)


def _losses(
    module: torch.nn.Module,
    batch: Batch,
    cfg: TrainerConfig,
    autocast: Autocast,
    ref_module: torch.nn.Module | None,
    objective: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy answer log-probs [2B], per-pair loss [B], chosen rewards [B], rejected rewards [B])."""
    with autocast():
        policy = answer_logps(module, batch)
    if objective == "sft":
        losses = sft_loss(policy, batch.answer_lengths)
        zeros = torch.zeros(batch.num_pairs)
        return policy, losses[: batch.num_pairs] + losses[batch.num_pairs :], zeros, zeros
    ref = batch.ref_logps
    if ref_module is not None:  # the "live reference" baseline: a frozen model's forward per step
        with torch.no_grad(), autocast():
            ref = answer_logps(ref_module, batch)
    per_pair, chosen, rejected = preference_loss(
        policy,
        ref,
        batch.answer_lengths,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        reference_free=cfg.reference_free,
        sft_weight=cfg.sft_weight,
    )
    return policy, per_pair, chosen, rejected


def train_step(
    module: torch.nn.Module,
    batch_examples: Sequence[Any],
    cfg: TrainerConfig,
    rank: int,
    world: int,
    device: torch.device | str,
    autocast: Autocast,
    ref_module: torch.nn.Module | None = None,
    objective: str = "dpo",
    pad_id: int = 0,
) -> dict[str, float]:
    """Forward/backward over this rank's slice of the global batch; returns global sums.

    The loss of each micro-batch is sum(per-pair loss) / global_pairs * world: DDP averages gradients
    over ranks, so the update equals one process's mean over the same global batch.
    """
    n = len(batch_examples)
    per_rank = -(-n // world)
    plans, n_micro = plan_micro_batches(
        batch_examples, world, per_rank, cfg.micro_batch_size, cfg.micro_batch_tokens, cfg.share_prefix
    )
    micros = plans[rank]  # n_micro is the same on every rank: collectives must line up
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    for i in range(n_micro):
        micro: Sequence[Any] = micros[i] if i < len(micros) else []
        weight = 1.0
        if not micro:  # this rank ran out (short last batch): a zero-weight pass keeps DDP in step
            micro, weight = batch_examples[:1], 0.0
        batch = make_batch(micro, device, pad_id, cfg)
        last = i == n_micro - 1
        no_sync = getattr(module, "no_sync", None)  # DDP: all-reduce gradients only after the last micro-batch
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            policy, per_pair, chosen, rejected = _losses(module, batch, cfg, autocast, ref_module, objective)
            (per_pair.sum() * (weight * world / n)).backward()
        if weight:
            _accumulate(sums, batch, policy, per_pair, chosen, rejected)
    return dict(zip(SUM_KEYS, all_sum([sums[k] for k in SUM_KEYS], world, device)))


def _accumulate(
    sums: dict[str, float],
    batch: Batch,
    policy: torch.Tensor,
    per_pair: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
) -> None:
    B = batch.num_pairs
    sums["loss"] += per_pair.detach().sum().item()
    sums["chosen"] += chosen.sum().item()
    sums["rejected"] += rejected.sum().item()
    sums["correct"] += (chosen > rejected).float().sum().item()
    sums["logps_c"] += policy[:B].detach().sum().item()
    sums["logps_r"] += policy[B:].detach().sum().item()
    sums["tokens"] += batch.num_tokens
    sums["computed"] += batch.computed_tokens
    sums["padded"] += batch.padded_tokens
    sums["answer_tokens"] += batch.targets.numel()
    sums["attn_pairs"] += batch.attention_pairs


@torch.no_grad()
def eval_step(
    module: torch.nn.Module,
    examples: Sequence[Any],
    cfg: TrainerConfig,
    rank: int,
    world: int,
    device: torch.device | str,
    autocast: Autocast,
    pad_id: int = 0,
) -> dict[str, float]:
    """The loss and rewards of the held-out pairs under the current policy; global sums, as train_step.

    Every rank runs the same number of forward passes (zero-weight ones where its slice ran out):
    DDP broadcasts buffers and FSDP gathers weights in each forward, and those collectives must line up."""
    n = len(examples)
    per_rank = -(-n // world)
    mine = examples[rank * per_rank : (rank + 1) * per_rank]
    m = cfg.micro_batch_size
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    was_training = module.training
    module.eval()
    try:
        for i in range(-(-per_rank // m)):
            micro = mine[i * m : (i + 1) * m]
            weight = bool(micro)
            batch = make_batch(micro or examples[:1], device, pad_id, cfg)
            policy, per_pair, chosen, rejected = _losses(module, batch, cfg, autocast, None, "dpo")
            if weight:
                _accumulate(sums, batch, policy, per_pair, chosen, rejected)
    finally:
        module.train(was_training)
    return dict(zip(SUM_KEYS, all_sum([sums[k] for k in SUM_KEYS], world, device)))


def eval_metrics(sums: dict[str, float], n: int) -> dict[str, float]:
    """The eval/... keys of metrics.jsonl (the training keys' names under eval/)."""
    values = step_metrics(sums, n, 0.0, 0.0, 1.0)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    out = {f"eval/{k}": values[k] for k in keys + ("logps/chosen", "logps/rejected")}
    out["eval/pairs"] = n
    return out


def step_metrics(
    sums: dict[str, float],
    n: int,
    grad_norm: float,
    lr: float,
    seconds: float,
    flop_shape: tuple[int, int, int, int] | None = None,
    peak_gflops: float = 0.0,
) -> dict[str, float]:
    """The keys of metrics.jsonl. With the model's flop shape and the device's float32 GEMM ceiling, `mfu`
    is the step's useful FLOPs (packing.step_flops) per second over that ceiling (as nanoGPT logs it)."""
    extra: dict[str, float] = {}
    if sums.get("padded"):
        extra["padding_waste"] = 1.0 - sums["computed"] / sums["padded"]
    if flop_shape is not None and peak_gflops > 0:
        flops = step_flops(flop_shape, sums["computed"], sums["answer_tokens"], sums["attn_pairs"])
        extra["mfu"] = flops / max(seconds, 1e-9) / (peak_gflops * 1e9)
    return extra | {
        "loss": sums["loss"] / n,
        "rewards/chosen": sums["chosen"] / n,
        "rewards/rejected": sums["rejected"] / n,
        "rewards/margins": (sums["chosen"] - sums["rejected"]) / n,
        "rewards/accuracies": sums["correct"] / n,
        "logps/chosen": sums["logps_c"] / n,
        "logps/rejected": sums["logps_r"] / n,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
        "pairs": n,
    }
