"""Processes and devices: one plain process, or one rank of a torchrun launch (DDP or FSDP2).

Rank 0 alone reads data, writes checkpoints and metrics; what every rank must agree on (the plan,
each step's batch) travels from rank 0 by `Node.broadcast`. Under FSDP the checkpoint state is
gathered to rank 0 in the one-process layout, so a checkpoint does not depend on how it was trained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from services.trainer.config import TrainerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from services.trainer.losses import AnswerLogps

StateDict = dict[str, Any]


@dataclass(frozen=True)
class Node:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (what the other ranks pass is ignored). It crossed a process
        boundary as a pickle, so the receiver checks its type (messages.py)."""
        box = [obj]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup() -> Node:
    """The process group under torchrun (nccl on GPUs, gloo on CPUs); a plain process has none."""
    if dist.is_available() and dist.is_initialized():  # the caller (a test, a notebook) set it up
        return Node(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python -m services.trainer`
        return Node(0, 1, torch.device("cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return Node(dist.get_rank(), dist.get_world_size(), device)


def finish() -> None:
    """Every rank is done communicating before any tears its process group down."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], world: int, device: torch.device | str) -> list[float]:
    """Element-wise sums over the ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def wrap(model: PreTrainedModel, cfg: TrainerConfig, world: int, device: torch.device | str) -> torch.nn.Module:
    """The module that trains: answer log-probs of `model`, replicated (DDP) or sharded (FSDP2)."""
    module = AnswerLogps(model, chunk_size=cfg.logprob_chunk_size, chunk_bytes=cfg.logprob_chunk_bytes)
    if world == 1:
        return module
    if cfg.distributed == "fsdp":
        # FSDP2: weights, gradients and AdamW state sharded over the ranks, one unit per decoder
        # layer so only one layer is gathered at a time; gradients are averaged over ranks as DDP does.
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(module)  # turns `module` itself into an FSDP module
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(device)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def _param_names(module: torch.nn.Module) -> list[str]:
    """Parameter names in the optimizer's order (it was built from module.parameters())."""
    return [name for name, _ in module.named_parameters()]


def _sharded(cfg: TrainerConfig, world: int) -> bool:
    return world > 1 and cfg.distributed == "fsdp"


def full_state_dicts(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainerConfig, world: int
) -> tuple[StateDict | None, StateDict | None]:
    """FSDP: (full model state dict, full optimizer state dict in torch's index-keyed layout), gathered
    to rank 0 (a collective: every rank calls it). Otherwise (None, None): the live objects are whole."""
    if not _sharded(cfg, world):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() != 0:
        return None, None
    index = {name: i for i, name in enumerate(_param_names(module))}
    by_name: dict[str, Any] = dict(optim_sd)  # FSDP keys the optimizer state by parameter name
    optim_full = {
        "state": {index[name]: st for name, st in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }
    # Tied weights come back under both names; keep the names save_pretrained itself would write.
    inner = module.model  # the causal LM inside AnswerLogps
    assert isinstance(inner, torch.nn.Module)
    own = {name for name, _ in inner.named_parameters()} | {name for name, _ in inner.named_buffers()}
    model_full = {k.removeprefix("model."): v for k, v in model_sd.items() if k.removeprefix("model.") in own}
    return model_full, optim_full


def optimizer_loader(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainerConfig, world: int
) -> Callable[[StateDict], None]:
    """How a checkpoint's full optimizer state goes back in: FSDP shards it over the ranks."""
    if not _sharded(cfg, world):
        return optimizer.load_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module)

    def load(full: StateDict) -> None:
        by_name: Any = {
            "state": {names[i]: st for i, st in full["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]],
        }
        set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    return load
