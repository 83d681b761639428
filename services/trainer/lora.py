"""LoRA (issue 28 item 5): train low-rank adapters of a frozen policy, through Hugging Face peft.

`--lora-r R` puts peft's LoRA layers on the `--lora-targets` linear layers (the attention and MLP
projections by default): each target's output becomes W x + (alpha / r) B A x, with A (r x in) and
B (out x r) the only trainable parameters; W, the embeddings, norms and LM head are frozen. peft is
imported only then (the `lora` extra: pip install 'offdpo[lora]').

Where it fits in the trainer:
- the policy: `apply` wraps the causal LM in peft's PeftModel (the layers are replaced in place, so the
  causal LM object itself carries them); `policy.model` is that PeftModel, `AnswerLogps` wraps the
  causal LM underneath (`base_model`), so the trained module's parameter names, and with them the
  sharded checkpoints' keys, are the same with and without a wrapper, at any world size.
- FSDP2: the adapters go in before `fully_shard` (distributed.build_sharded, on the meta device), so
  each decoder layer's unit shards its adapters along with its frozen weights; FSDP2 keeps frozen and
  trainable parameters in one unit and reduce-scatters only the gradients that exist (the adapters').
  The root unit (embeddings, final norm, LM head) is all frozen. DDP: only parameters that require a
  gradient get its hooks, so it all-reduces the adapters' gradients alone.
- memory: the frozen base is held in bfloat16 when the policy computes in bfloat16 (`frozen_dtype`),
  float32 on the CPU; the optimizer gets `trainable(module)`: AdamW state exists only for the adapters.
- the reference: DPO with LoRA needs the log-probs of the base model, which is exactly what refscore
  stored in the shards (it scored the initial policy); nothing about the reference changes here.
- checkpoints (checkpoint.py) hold the adapters and their AdamW state only: the base weights are
  `--model` itself at every step, read again on resume. `export_adapter` writes the adapter folder
  peft and transformers load (adapter_config.json + adapter_model.safetensors); `merged_state` gives
  the base weights with the adapters merged in (W + (alpha / r) B A), for the model/ export.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from offdpo.errors import ConfigError
from services.trainer.config import TrainerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER = "default"  # peft's adapter name; the adapter folder's keys drop it
EXTRA = "lora"  # pip install 'offdpo[lora]'


def settings_problems(cfg: TrainerConfig) -> list[str]:
    """What is wrong with the LoRA settings (empty when LoRA is off or they are fine)."""
    if cfg.lora_r == 0:
        return []
    problems = []
    if cfg.lora_r < 0:
        problems.append(f"--lora-r {cfg.lora_r}: use a rank > 0, or 0 for full fine-tuning")
    if cfg.lora_alpha <= 0:
        problems.append(f"--lora-alpha {cfg.lora_alpha}: must be positive")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    if not cfg.lora_targets:
        problems.append("--lora-targets is empty: name the linear layers to adapt (e.g. q_proj,v_proj)")
    if cfg.distributed == "fsdp" and cfg.checkpoint_format == "full":
        problems.append(
            "--checkpoint-format full with --lora-r under FSDP: use sharded (or auto); the full layout gathers "
            "the whole model to rank 0, which LoRA checkpoints do not need"
        )
    return problems


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"--lora-r needs the peft library, which is not installed: pip install 'offdpo[{EXTRA}]' "
            "(or --lora-r 0 to fine-tune every weight)"
        ) from None
    return peft


def is_lora(model: Any) -> bool:
    """Whether `model` is a policy wrapped by `apply` (peft's PeftModel; peft is not imported for this)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: Any) -> PreTrainedModel:
    """The causal LM that computes (with the adapters in place under LoRA): what AnswerLogps wraps."""
    return model.get_base_model() if is_lora(model) else model


def apply(model: PreTrainedModel, cfg: TrainerConfig) -> Any:
    """`model` with LoRA adapters on `cfg.lora_targets` (peft's PeftModel; the layers are replaced in
    the causal LM itself), every base parameter frozen; `model` itself when `cfg.lora_r` is 0. A model
    on the meta device (FSDP's sharded build) gets meta adapters: `init_adapters` gives them values
    once the shards have storage. Either way `init_adapters` sets the adapters' starting values."""
    if cfg.lora_r == 0:
        return model
    problems = settings_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    peft = _peft()
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(cfg.lora_targets) - present)
    if missing:
        raise ConfigError(
            f"--lora-targets {','.join(missing)}: no linear layer of that name in {type(model).__name__} "
            f"(its linear layers: {', '.join(sorted(present))})"
        )
    lora_config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    on_meta = any(p.is_meta for p in model.parameters())
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        wrapped = peft.get_peft_model(model, lora_config)
    dtype = frozen_dtype(cfg)
    for p in wrapped.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    init_adapters(wrapped, cfg.seed)
    return wrapped


def frozen_dtype(cfg: TrainerConfig) -> torch.dtype:
    """The frozen base's dtype: bfloat16 where the policy computes in bfloat16 (--precision bf16, or auto
    on a GPU, as train.py resolves it: autocast, FSDP's bf16 policy), so it takes 2 bytes per parameter
    instead of 4 (a frozen weight needs no float32 master copy: nothing updates it); float32 otherwise.
    The adapters stay float32 (their AdamW updates are small). FSDP2 accepts the mix in one unit: only
    trainable parameters must share a dtype."""
    on = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if on else torch.float32


def lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(name in the causal LM, peft LoRA layer) for every adapted layer."""
    from peft.tuners.lora import LoraLayer

    for name, m in base_model(model).named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield name, m


@torch.no_grad()
def init_adapters(model: Any, seed: int) -> None:
    """peft's default initialisation (A: kaiming-uniform as nn.Linear's, B: zeros, so training starts
    from the base model exactly), drawn from a generator seeded by `seed` and the layer's name: the
    same values at every world size, sharded or not. Under FSDP each rank copies its own rows."""
    if not is_lora(model) or any(p.is_meta for p in model.parameters()):
        return  # meta: no storage yet (build_sharded calls this again after to_empty)
    for name, layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full_a = torch.empty(a.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=g)
        _copy_full(a, full_a)
        _copy_full(b, torch.zeros(b.shape, dtype=torch.float32))


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `param`, or into this rank's shard of it (a DTensor: its own rows,
    no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or only the adapters under LoRA."""
    return [p for p in module.parameters() if p.requires_grad]


def trainable_fraction(module: torch.nn.Module) -> float:
    """Trainable / all parameters (each counted once; global sizes under FSDP)."""
    seen: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad) / max(1, total)


def describe(cfg: TrainerConfig) -> dict[str, Any] | None:
    """The LoRA settings a checkpoint records (None: full fine-tuning); a resume must match them."""
    if cfg.lora_r == 0:
        return None
    return {
        "r": cfg.lora_r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "targets": sorted(cfg.lora_targets),
    }


# -- the full layout's adapter tensors, base weights under LoRA -------------------------------------
def hf_name(name: str) -> str | None:
    """A causal-LM parameter name with the adapters in place -> the name in a Hugging Face folder
    (`...q_proj.base_layer.weight` -> `...q_proj.weight`); None for the adapters' own tensors."""
    if ".lora_" in name or name.startswith("lora_"):
        return None
    return name.replace(".base_layer.", ".")


def load_base_weights(model: Any, folder: str | Path) -> None:
    """distributed.load_hf_weights for a model with adapters in place: each rank reads its own slices
    of the Hugging Face safetensors in `folder` into the frozen base weights (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from services.trainer.distributed import tied_pairs

    base = base_model(model)
    aliases = {a for a, _ in tied_pairs(base)}
    state: dict[str, torch.Tensor] = {}
    for k, v in base.state_dict().items():
        name = hf_name(k)
        if name is not None and k not in aliases:
            state[name] = v
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))


# -- exports ----------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapters' whole tensors on the CPU, keyed as in the PeftModel's state dict. Under FSDP every
    rank calls it (one gather per tensor, in the same order everywhere); the adapters are small."""
    return {
        k: _full(v.detach()).cpu()
        for k, v in model.state_dict().items()
        if ".lora_" in k and f".{ADAPTER}." in k  # peft's own keys carry the adapter name
    }


def export_adapter(
    store: Any, prefix: str, model: Any, is_main: bool, status: Any = None, folder: str = "adapter"
) -> dict[str, torch.Tensor]:
    """`<prefix>/<folder>/`: peft's adapter folder (adapter_config.json, adapter_model.safetensors,
    README.md), written by PeftModel.save_pretrained, so `PeftModel.from_pretrained(base, folder)`
    and transformers (with peft installed) load it. Every rank calls it under FSDP (the gathers);
    the rank with `is_main` writes and uploads. Returns the adapter tensors (PeftModel keys)."""
    from services.trainer.infra import InfraStatus

    state = adapter_state(model)
    if not is_main:
        return state
    status = status or InfraStatus()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                _put(store, f"{prefix}/{folder}/{path.relative_to(tmp)}", path.read_bytes(), status)
    return state


def load_adapter_file(module: torch.nn.Module, data: bytes) -> None:
    """The adapters of an adapter_model.safetensors (peft's keys, no adapter name) into the trained
    module (AnswerLogps, whatever wraps it: DDP, FSDP shards); every rank calls it with the same bytes."""
    from safetensors.torch import load as load_tensors

    tensors = load_tensors(data)
    want = {_module_key(k): v for k, v in tensors.items()}
    params = {name: p for name, p in _unwrapped(module).named_parameters() if p.requires_grad}
    have = set(params)
    if set(want) != have:
        raise ConfigError(
            f"the checkpoint's adapters ({len(want)} tensors) are not this run's ({len(have)}): "
            f"missing {sorted(have - set(want))[:3]}, unexpected {sorted(set(want) - have)[:3]}; "
            "resume with the --lora-r/--lora-targets the run was started with"
        )
    with torch.no_grad():  # each rank copies its own rows of each whole tensor: no communication
        for name, p in params.items():
            _copy_full(p, want[name].to(p.dtype))


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(module, "module", module)  # DDP
    assert isinstance(inner, torch.nn.Module)
    return inner


def _module_key(peft_key: str) -> str:
    """`base_model.model.<name>.lora_A.weight` (the adapter file) -> `model.<name>.lora_A.default.weight`
    (AnswerLogps' parameter name: its `model` is the causal LM)."""
    name = peft_key.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.", f".{part}.{ADAPTER}.")
    return f"model.{name}"


class MergedState(Mapping[str, torch.Tensor]):
    """The policy's weights with the adapters merged in, under the names a Hugging Face folder uses
    (save_pretrained's: a tied LM head once), one tensor at a time: `state[name]` computes it when
    asked. An adapted weight is W + (alpha / r) B A (peft's own `get_delta_weight`, what
    `merge_and_unload` adds), returned whole (under FSDP gathered: every rank asks for the same names
    in the same order); any other tensor is the model's own (a DTensor shard under FSDP). `shapes()`
    gives every name's shape and dtype without computing anything."""

    def __init__(self, model: Any):
        from services.trainer.distributed import tied_pairs

        self.base = base_model(model)
        aliases = {a for a, _ in tied_pairs(self.base)}
        self.sd = self.base.state_dict()
        self.layers = dict(lora_layers(model))
        self.names: dict[str, str] = {}  # HF name -> state-dict name
        for k in self.sd:
            name = hf_name(k)
            if name is not None and k not in aliases:
                self.names[name] = k

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.names[name]
        layer_name, _, leaf = key.rpartition(".base_layer.")
        if leaf == "weight" and layer_name in self.layers:
            layer = self.layers[layer_name]
            with torch.no_grad():
                a, b = _full(layer.lora_A[ADAPTER].weight.detach()), _full(layer.lora_B[ADAPTER].weight.detach())
                delta = _delta(layer, a, b)
                return _full(self.sd[key].detach()) + delta
        return self.sd[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {name: (self.sd[k].shape, self.sd[k].dtype) for name, k in self.names.items()}


def _delta(layer: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """peft's get_delta_weight on whole (gathered) A and B: (alpha / r) B A, transposed for a
    fan-in-fan-out layer, exactly as merge_and_unload adds it."""
    from peft.utils.other import transpose

    return transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[ADAPTER]


def merged_state(model: Any) -> MergedState:
    """The merged model's state for the model/ export (see MergedState); `model` is the PeftModel."""
    return MergedState(model)


def check_resume(state: Mapping[str, Any], cfg: TrainerConfig, prefix: str) -> None:
    """A checkpoint continues only under the LoRA settings it was trained with (state.json's `lora`;
    none: full fine-tuning): adapters cannot resume a full fine-tune, nor the reverse."""
    have, want = state.get("lora"), describe(cfg)
    if have != want:

        def say(d: Any) -> str:
            return (
                "full fine-tuning"
                if d is None
                else f"LoRA r={d['r']} alpha={d['alpha']} targets={','.join(d['targets'])}"
            )

        raise ConfigError(
            f"checkpoint {prefix} was trained with {say(have)}, this run asks for {say(want)}: resume with the "
            "settings it was started with (--lora-r/--lora-alpha/--lora-targets), or start a new --run-name"
        )


def export_merged(
    store: Any,
    prefix: str,
    model: Any,
    tokenizer: Any,
    is_main: bool,
    shard_bytes: int,
    status: Any = None,
    *,
    dtype: str = "bfloat16",
    card: str | None = None,
) -> None:
    """`<prefix>/model/`: the merged model (base + adapters) as a Hugging Face folder in `dtype`, written
    one tensor at a time by checkpoint.write_model_folder, as export_model writes a fully trained one:
    under FSDP every rank calls it (each tensor gathered in turn), rank 0 (`is_main`) writes and uploads."""
    import os

    from services.trainer import checkpoint as ckpt
    from services.trainer.infra import InfraStatus

    status = status or InfraStatus()
    state = merged_state(model)

    def tensor(name: str) -> torch.Tensor | None:
        full = _full(state[name].detach())  # every rank takes part
        return full if is_main else None

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def upload(path: Path) -> None:
            _put(store, f"{prefix}/model/{path.relative_to(folder)}", path.read_bytes(), status)
            os.unlink(path)

        ckpt.write_model_folder(
            folder,
            list(state),
            state.shapes(),
            tensor,
            ckpt.model_meta(state.base, tokenizer, card),
            dtype=dtype,
            shard_bytes=shard_bytes,
            emit=upload,
        )


def _put(store: Any, key: str, data: bytes, status: Any) -> None:
    """One upload, retried through an outage as checkpoint uploads are (data.until_done)."""
    from services.trainer.infra import until_done

    until_done(f"upload {key}", lambda: store.put_bytes(key, data), status, None)
