"""Processes and devices: one plain process, or one rank of a torchrun launch (DDP or FSDP2).

Rank 0 alone reads data and writes metrics; what every rank must agree on (the plan, each step's
batch) travels from rank 0 by `Node.broadcast`. Under FSDP no rank holds the whole model or optimizer
state at any phase: the model is built on the meta device and each rank reads its own slices of the
weights (build_sharded), and checkpoints are written shard by shard by every rank (checkpoint.py).
The full-state helpers below serve the older one-process checkpoint layout (DDP, one process, and an
FSDP run resuming such a checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


def mixed_precision(cfg: TrainerConfig, device: torch.device | str) -> Any:
    """FSDP2's MixedPrecisionPolicy (bfloat16 parameters and compute, float32 gradient reduction; the
    optimizer keeps float32 master weights, the sharded parameters), or None for float32 throughout."""
    on = cfg.fsdp_mixed_precision == "on" or (
        cfg.fsdp_mixed_precision == "auto" and torch.device(device).type == "cuda"
    )
    if not on:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _fully_shard(
    module: torch.nn.Module, model: PreTrainedModel, cfg: TrainerConfig, device: torch.device | str
) -> None:
    # FSDP2: weights, gradients and AdamW state sharded over the ranks, one unit per decoder layer so
    # only one layer is gathered at a time; gradients are averaged over ranks as DDP does. The root
    # unit holds the rest (embedding, final norm, LM head): a tied embedding and LM head stay one
    # parameter, sharded once.
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(cfg, device)
    kw: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    for layer in model.get_decoder().layers:  # under LoRA: each layer's adapters in its unit too
        fully_shard(layer, **kw)
    fully_shard(module, **kw)  # turns `module` itself into an FSDP module


def wrap(model: PreTrainedModel, cfg: TrainerConfig, world: int, device: torch.device | str) -> torch.nn.Module:
    """The module that trains: answer log-probs of `model`, replicated (DDP) or sharded (FSDP2). Under
    LoRA `model` is the PeftModel and the module wraps the causal LM inside it (lora.base_model), so
    parameter names do not depend on the wrapper; FSDP2 then shards each decoder layer's adapters with
    its frozen weights, and DDP hooks only the adapters (the parameters that require a gradient)."""
    from services.trainer import lora

    module = AnswerLogps(lora.base_model(model), chunk_size=cfg.logprob_chunk_size, chunk_bytes=cfg.logprob_chunk_bytes)
    if world == 1:
        return module
    if cfg.distributed == "fsdp":
        _fully_shard(module, model, cfg, device)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(device)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


# -- sharded load (FSDP): no rank ever holds the whole model ---------------------------------------
def is_sharded(cfg: TrainerConfig, world: int) -> bool:
    """FSDP over more than one rank: weights and optimizer state live only as per-rank shards."""
    return world > 1 and cfg.distributed == "fsdp"


def build_sharded(
    config_dir: str | Path, cfg: TrainerConfig, device: torch.device | str, weights: str | Path | None
) -> tuple[PreTrainedModel, torch.nn.Module]:
    """The FSDP policy with each rank holding only its shard: the model is built on the meta device
    (no memory), sharded, given empty storage for its own shard only, then filled from `weights` (a
    Hugging Face folder) or left for a sharded checkpoint to fill (`weights=None`).

    How the weights arrive: every rank reads only its own slices of the safetensors files through
    DCP's HuggingFaceStorageReader (safetensors' mmap'd get_slice), so a rank's peak is its shard, not
    the model (bench/scale.py: peak RSS while loading a 590M model, 4 ranks / 1 rank = 0.33). Chosen
    over rank 0 reading the state dict and `set_model_state_dict(..., broadcast_from_rank0=True)`,
    which holds the whole model on rank 0 (a 70B model is 280 GB in float32; not measured here, it
    is what that API takes) and sends every byte through one rank even when streamed tensor by
    tensor. The cost: the model folder must be readable on every node, as it already is (a volume or
    a download per pod). Under LoRA (--lora-r) the model returned is peft's PeftModel around it (lora.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(config_dir)
    conf.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    tied = tied_pairs(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from services.trainer import lora

    # LoRA: the adapters go in on the meta device, before sharding, so FSDP shards them with their layer.
    policy = lora.apply(model, cfg)
    module = AnswerLogps(model, chunk_size=cfg.logprob_chunk_size, chunk_bytes=cfg.logprob_chunk_bytes)
    _fully_shard(module, model, cfg, device)
    module.to_empty(device=device)  # this rank's shards only (DTensor local parts), uninitialised
    _init_non_persistent_buffers(model)
    for a, b in tied:  # to_empty swaps tensors in place (FSDP2 turns on swap_tensors): ties survive
        if model.get_parameter(a) is not model.get_parameter(b):
            raise RuntimeError(f"{a} and {b} are tied in the model's config but came apart under FSDP")
    if weights is not None:
        (lora.load_base_weights if lora.is_lora(policy) else load_hf_weights)(model, weights)
    lora.init_adapters(policy, cfg.seed)  # they had no values on the meta device
    model.train()
    return policy, module


def tied_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(alias, owner) for every parameter reachable under two names (a tied embedding and LM head)."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return pairs


def _init_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Buffers that no checkpoint holds (rotary inv_freq) are computed, not loaded: after `to_empty`
    they hold garbage until the model's own initialiser recomputes them for the modules that own them."""
    for module in model.modules():
        own: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        if own and not any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)


def hf_state_names(model: torch.nn.Module) -> list[str]:
    """The keys save_pretrained writes: every parameter once (a tied alias dropped) and persistent buffers."""
    aliases = {a for a, _ in tied_pairs(model)}
    return [k for k in model.state_dict() if k not in aliases]


def load_hf_weights(model: PreTrainedModel, folder: str | Path) -> None:
    """Each rank reads its own slices of a Hugging Face safetensors folder into its shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    full = model.state_dict()
    state = {k: full[k] for k in hf_state_names(model)}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))


def _param_names(module: torch.nn.Module) -> list[str]:
    """Parameter names in the optimizer's order (it was built from the trainable module.parameters():
    all of them, or the adapters under LoRA)."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def full_state_dicts(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainerConfig, world: int
) -> tuple[StateDict | None, StateDict | None]:
    """FSDP: (full model state dict, full optimizer state dict in torch's index-keyed layout), gathered
    to rank 0 (a collective: every rank calls it). Otherwise (None, None): the live objects are whole."""
    if not is_sharded(cfg, world):
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
    if not is_sharded(cfg, world):
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
