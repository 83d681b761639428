"""Checkpoints in S3, without pickle.

runs/<run>/checkpoints/step-<N>/model/...            a Hugging Face folder (safetensors in save_dtype,
                                                      config, tokenizer, README.md model card): what
                                                      users, refscore and transformers load
runs/<run>/checkpoints/step-<N>/dcp/*.safetensors    sharded layout: each rank's own shard of weights and
                                                      AdamW state (torch.distributed.checkpoint)
runs/<run>/checkpoints/step-<N>/weights/...          full layout, save_dtype not float32: the float32
                                                      weights a resume reads (model/ is rounded)
runs/<run>/checkpoints/step-<N>/adapter/...          LoRA (services/trainer/lora.py): peft's adapter folder;
                                                      the resumable state holds the adapters alone
runs/<run>/checkpoints/step-<N>/optimizer.safetensors full layout: AdamW moments and step counts
runs/<run>/checkpoints/step-<N>/rng.safetensors       torch CPU (and CUDA) generator states
runs/<run>/checkpoints/step-<N>/state.json            step, layout, scheduler, optimizer hyper-parameters,
                                                      python RNG, data position / consumed shards
runs/<run>/latest                                     {"step": N, "prefix": ...}: written last, so it
                                                      only ever points at a complete checkpoint

Two layouts (--checkpoint-format; state.json's `checkpoint_format` says which one a checkpoint has):
- full (one process, DDP; every checkpoint before issue 28): rank 0 writes the whole state.
- sharded (FSDP by default): every rank writes its own shard of the weights and optimizer state with
  torch.distributed.checkpoint (DCP) in its safetensors format (HuggingFaceStorageWriter: tensors plus
  each shard's offsets in the file header; no pickle, unlike DCP's default `.metadata` file), uploads
  it, and no rank ever holds the whole state. A resume reads the slices it needs at whatever world
  size it runs (4 -> 2, 2 -> 4, FSDP -> one process). The model/ folder is exported from the shards
  one tensor at a time (see export_model).
Either layout resumes under either mode: a full checkpoint is sharded again by an FSDP resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.optim.lr_scheduler import LRScheduler

from offdpo import errors
from offdpo.s3 import safe_key_part
from services.trainer import lora
from services.trainer.config import TrainerConfig
from services.trainer.distributed import (
    Node,
    full_state_dicts,
    hf_state_names,
    is_sharded,
    optimizer_loader,
    tied_pairs,
)
from services.trainer.infra import InfraStatus, until_done

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class Store(Protocol):
    """The object-store methods checkpoints use (offdpo.s3.ObjectStore)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...


@dataclass
class Policy:
    """The model being trained, in the forms the loop and the checkpoints need."""

    model: PreTrainedModel  # save_pretrained writes it
    module: torch.nn.Module  # what trains: its answer log-probs, wrapped for DDP or FSDP
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler


class UnsafeCheckpoint(errors.BadInput):
    """A checkpoint whose `latest` pointer or object keys lead outside the run's own prefix (a `..`
    segment, an absolute path, another run's keys): refused, never followed. Whoever can write to
    the bucket must not be able to make the trainer read another run's weights or write files
    outside the download folder."""

    error_type = "unsafe_checkpoint"


def run_prefix(run_name: str) -> str:
    return f"runs/{safe_key_part(run_name, 'run name')}"


def _unsafe_path(path: str) -> bool:
    """An absolute path, a backslash, or an empty, '.' or '..' segment."""
    return path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in path.split("/"))


def checked_prefix(run_name: str, prefix: object) -> str:
    """`prefix` if it is one checkpoint folder of this run (runs/<run>/checkpoints/<one safe name>)."""
    root = f"{run_prefix(run_name)}/checkpoints/"
    if not isinstance(prefix, str) or not prefix.startswith(root) or _unsafe_path(prefix):
        raise UnsafeCheckpoint(
            f"{run_prefix(run_name)}/latest points at {prefix!r}, which is not a checkpoint of this run "
            f"(expected {root}<name>, no '..' or absolute paths); refusing to resume from it. Check who "
            f"wrote it, then delete it or start a new --run-name"
        )
    try:
        safe_key_part(prefix[len(root) :], "checkpoint name")
    except ValueError as exc:
        raise UnsafeCheckpoint(f"{run_prefix(run_name)}/latest points at {prefix!r}: {exc}") from None
    return prefix


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's index-keyed optimizer state dict -> (safetensors tensors, JSON-able metadata)."""
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"param_groups": sd["param_groups"]}


# The order AdamW creates its per-parameter state in. safetensors hands keys back sorted, and
# torch's FSDP optimizer-state loader (set_optimizer_state_dict, torch 2.13) pairs state entries by
# position: loaded in sorted order it swapped exp_avg and exp_avg_sq of some parameters (NaN weights
# after the first resumed step). So the state is rebuilt in the optimizer's own order.
_ADAMW_STATE_ORDER = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    rank = {name: i for i, name in enumerate(_ADAMW_STATE_ORDER)}
    for k in sorted(tensors, key=lambda k: (int(k.split(".", 1)[0]), rank.get(k.split(".", 1)[1], len(rank)), k)):
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = tensors[k]
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    store: Store,
    run_name: str,
    step: int,
    model: PreTrainedModel,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    scheduler: LRScheduler,
    extra: dict[str, Any],
    model_state: dict[str, Any] | None = None,
    *,
    save_dtype: str = "bfloat16",
    export_shard_bytes: int = 2 << 30,
    card: str | None = None,
) -> str:
    """Upload everything for `step`, then move `latest`. `optimizer_state`: torch's index-keyed state
    dict (whole); `model_state`: a full model state dict (FSDP gathers both to rank 0). The model/
    folder is exported in `save_dtype`; unless that is float32, the float32 weights a resume reads
    go to weights/ (a save_pretrained folder without the tokenizer)."""
    prefix = f"{run_prefix(run_name)}/checkpoints/step-{step:08d}"
    if save_torch_dtype(save_dtype) != torch.float32:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp), safe_serialization=True, state_dict=model_state)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    store.put_bytes(f"{prefix}/{WEIGHTS}/{path.relative_to(Path(tmp))}", path.read_bytes())
    export_model(
        store, prefix, model, tokenizer, None, export_shard_bytes, dtype=save_dtype, card=card, state=model_state
    )
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
    store.put_bytes(f"{prefix}/optimizer.safetensors", save_tensors(opt_tensors))
    _write_state(store, run_name, step, prefix, scheduler, extra, {"optimizer": opt_meta})
    return prefix


def save(
    store: Store,
    cfg: TrainerConfig,
    node: Node,
    step: int,
    policy: Policy,
    tokenizer: Any,
    extra: dict[str, Any] | None,
    status: InfraStatus | None = None,
) -> None:
    """Checkpoint `step`. Every rank calls it; rank 0 writes `extra` (the data position, the reference
    fingerprint: rank 0's, None on the others) in state.json. Sharded layout: every rank writes its own
    shard; full layout: FSDP gathers the state to rank 0, which writes it."""
    if checkpoint_format(cfg, node.world) == "sharded":
        save_sharded(store, cfg, node, step, policy, tokenizer, extra, status)
        return
    if lora.is_lora(policy.model):  # one process or DDP: every rank holds the whole adapters
        if node.is_main:
            assert extra is not None, "rank 0 writes the data position with every checkpoint"
            until_done(
                f"checkpoint step {step}",
                lambda: save_lora_checkpoint(store, cfg, step, policy, tokenizer, extra),
                status or InfraStatus(),
                None,
            )
        return
    card = run_card(cfg, step, extra)
    model_state, optim_state = full_state_dicts(policy.module, policy.optimizer, cfg, node.world)
    if node.is_main:
        assert extra is not None, "rank 0 writes the data position with every checkpoint"
        full_optim = optim_state or policy.optimizer.state_dict()
        # S3 down past its own retry window is an outage, not a reason to lose the steps since the
        # last checkpoint: rank 0 retries the upload for as long as it takes (the other ranks wait at
        # the barrier after it). `latest` moves last, so a half-written attempt is never resumed from.
        until_done(
            f"checkpoint step {step}",
            lambda: save_checkpoint(
                store,
                cfg.run_name,
                step,
                policy.model,
                tokenizer,
                full_optim,
                policy.scheduler,
                extra,
                model_state,
                save_dtype=cfg.save_dtype,
                export_shard_bytes=cfg.export_shard_bytes,
                card=card,
            ),
            status or InfraStatus(),
            None,
        )


def save_lora_checkpoint(
    store: Store, cfg: TrainerConfig, step: int, policy: Policy, tokenizer: Any, extra: dict[str, Any]
) -> str:
    """The full layout under LoRA (one process, DDP): adapter/ (peft's folder: the float32 adapters a
    resume reads, and what users load on top of the base), optimizer.safetensors (the adapters' AdamW
    state only), model/ (the base with the adapters merged in, in --save-dtype), then state.json
    (with the LoRA settings) and `latest`. The base weights are not written: they are --model's."""
    prefix = step_prefix(cfg.run_name, step)
    lora.export_adapter(store, prefix, policy.model, True)
    card = run_card(cfg, step, extra)
    lora.export_merged(
        store, prefix, policy.model, tokenizer, True, cfg.export_shard_bytes, dtype=cfg.save_dtype, card=card
    )
    opt_tensors, opt_meta = _optimizer_tensors(policy.optimizer.state_dict())
    store.put_bytes(f"{prefix}/optimizer.safetensors", save_tensors(opt_tensors))
    _write_state(
        store, cfg.run_name, step, prefix, policy.scheduler, extra, {"optimizer": opt_meta, "lora": lora.describe(cfg)}
    )
    return prefix


def _write_config(store: Store, prefix: str, extra: dict[str, Any]) -> None:
    """`config.yaml` next to the checkpoint: the run's resolved configuration, which
    `offdpo train --config step-N/config.yaml` reruns (secrets are never in it). Taken out of `extra`
    so state.json stays the machine's record."""
    text = extra.pop("config_yaml", None)
    if text:
        store.put_bytes(f"{prefix}/config.yaml", text.encode(), content_type="application/yaml")


def latest_checkpoint(store: Store, run_name: str) -> str | None:
    """The checkpoint `latest` points at, checked to be one of this run's (UnsafeCheckpoint if not)."""
    key = f"{run_prefix(run_name)}/latest"
    if not store.exists(key):
        return None
    try:
        prefix = json.loads(store.get_bytes(key))["prefix"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsafeCheckpoint(f"{key} is not a checkpoint pointer ({type(exc).__name__}: {exc})") from None
    return checked_prefix(run_name, prefix)


def read_state(store: Store, prefix: str) -> dict[str, Any]:
    """state.json of a checkpoint: step, data position, fingerprint, config, ..."""
    return json.loads(store.get_bytes(f"{prefix}/state.json"))


def restore(store: Store, prefix: str, cfg: TrainerConfig, node: Node, policy: Policy) -> int:
    """Optimizer, scheduler and RNG state of the checkpoint at `prefix` (the weights were loaded with
    the model); returns its step. Every rank calls it: FSDP shards the optimizer state again."""
    state = read_state(store, prefix)
    lora.check_resume(state, cfg, prefix)
    if state.get("checkpoint_format") == "sharded":
        return restore_sharded(store, prefix, policy)
    if lora.is_lora(policy.model):  # the base came from --model; the adapters from adapter/
        lora.load_adapter_file(policy.module, store.get_bytes(f"{prefix}/adapter/adapter_model.safetensors"))
    load_optimizer = optimizer_loader(policy.module, policy.optimizer, cfg, node.world)
    return load_trainer_state(store, prefix, load_optimizer, policy.scheduler)["step"]


def download_model(store: Store, prefix: str, dest: Path) -> Path:
    """The checkpoint's model folder into `dest`. Every key must lie under `<prefix>/model/` and name a
    relative path inside `dest` (no '..', no absolute path): UnsafeCheckpoint otherwise, before
    anything is written."""
    return _download(store, prefix, "model", dest)


# Full layout, save_dtype other than float32: the float32 weights a resume reads (model/ is rounded).
WEIGHTS = "weights"


def download_weights(store: Store, prefix: str, dest: Path) -> Path:
    """The float32 weights of a full-layout checkpoint, as a Hugging Face folder in `dest`: weights/
    when the checkpoint has it, else model/ (float32 exports and every checkpoint written before
    save_dtype existed). Checked like download_model."""
    if store.list_keys(f"{prefix}/{WEIGHTS}/"):
        return _download(store, prefix, WEIGHTS, dest)
    return download_model(store, prefix, dest)


def _download(store: Store, prefix: str, folder: str, dest: Path) -> Path:
    """Every object under `<prefix>/<folder>/` into `dest`, after checking every key (see download_model)."""
    root = f"{prefix}/{folder}/"
    if _unsafe_path(prefix):
        raise UnsafeCheckpoint(f"checkpoint prefix {prefix!r} has an empty, '.' or '..' segment or is absolute")
    dest_root = dest.resolve()
    plan: list[tuple[str, Path]] = []
    for key in store.list_keys(root):
        rel = key[len(root) :]
        path = (dest / rel).resolve()
        if not key.startswith(root) or _unsafe_path(rel) or not path.is_relative_to(dest_root):
            raise UnsafeCheckpoint(
                f"checkpoint object {key!r} is not a file under {root}: refusing to download it "
                f"(it would be written outside {dest})"
            )
        plan.append((key, path))
    for key, path in plan:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(key))
    return dest


def load_trainer_state(
    store: Store, prefix: str, load_optimizer: Callable[[dict[str, Any]], None], scheduler: LRScheduler
) -> dict[str, Any]:
    """`load_optimizer` takes torch's index-keyed optimizer state dict (optimizer.load_state_dict, or
    FSDP's sharding loader)."""
    state = read_state(store, prefix)
    load_optimizer(
        _optimizer_state(load_tensors(store.get_bytes(f"{prefix}/optimizer.safetensors")), state["optimizer"])
    )
    scheduler.load_state_dict(state["scheduler"])
    rng = load_tensors(store.get_bytes(f"{prefix}/rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    return state


# -- the sharded layout (issue 28) ----------------------------------------------------------------
def checkpoint_format(cfg: TrainerConfig, world: int) -> str:
    """'sharded' or 'full': what this run writes (`--checkpoint-format auto`: sharded under FSDP)."""
    if cfg.checkpoint_format in ("sharded", "full"):
        return cfg.checkpoint_format
    return "sharded" if is_sharded(cfg, world) else "full"


def step_prefix(run_name: str, step: int) -> str:
    return f"{run_prefix(run_name)}/checkpoints/step-{step:08d}"


def _train_state(policy: Policy) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """(what DCP writes and reads, the model state dict, the optimizer state dict, tied aliases).
    Under FSDP the tensors are this rank's DTensor shards (no copy, no gather); a fresh optimizer gets
    its state allocated (torch does a zero-learning-rate step) so a load has somewhere to go. Tied
    aliases (lm_head.weight = embed_tokens.weight) are written once; param_groups (floats, lists) go
    to state.json, so every DCP entry is a tensor and fits the safetensors format. Frozen parameters
    (the base under LoRA) are left out: they are --model's, read again at every start."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy.module, policy.optimizer, options=_state_options(policy))
    tied = tied_pairs(policy.module)
    # (without frozen parameters torch may still return a frozen alias whose owner it left out)
    aliases = [(a, o) for a, o in tied if a in model_sd and o in model_sd]
    model_part = {k: v for k, v in model_sd.items() if k not in {a for a, _ in tied}}
    optim: dict[str, Any] = dict(optim_sd)
    return {"model": model_part, "optim": dict(optim["state"])}, model_sd, optim, aliases


def _state_options(policy: Policy) -> Any:
    """get/set_state_dict's options: without frozen parameters, and then a load that does not expect
    them (DCP's load has already refused a checkpoint lacking any tensor of the state asked for)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in policy.module.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def _file_plan(state: dict[str, Any], file_bytes: int) -> dict[str, int]:
    """Flattened key -> file index (1..n), in order, about `file_bytes` of this rank's data per file: a
    rank writes, uploads and frees one file at a time. The same on every rank (DCP requires it): sizes
    are global sizes over the world, not the local ones."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.tensor import DTensor

    flat, _ = flatten_state_dict(state)
    plan, index, size = {}, 1, 0
    for key, t in flat.items():
        n = t.numel() * t.element_size() if torch.is_tensor(t) else 0
        if isinstance(t, DTensor):
            n //= max(1, t.device_mesh.size())
        if size and size + n > file_bytes:
            index, size = index + 1, 0
        plan[key] = index
        size += n
    return plan


def save_sharded(
    store: Store,
    cfg: TrainerConfig,
    node: Node,
    step: int,
    policy: Policy,
    tokenizer: Any,
    extra: dict[str, Any] | None,
    status: InfraStatus | None = None,
) -> dict[str, Any]:
    """Every rank: write this rank's shard of weights and AdamW state with DCP into a local folder and
    upload it file by file; every rank: export the model/ folder (export_model); a barrier, so every
    shard is durable; then rank 0 writes rng, state.json and, last, `latest`. Returns what this rank
    wrote ({"bytes": ..., "files": ...}, for the benchmark)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    status = status or InfraStatus()
    prefix = step_prefix(cfg.run_name, step)
    state, _, optim_sd, _ = _train_state(policy)
    written = {"bytes": 0, "files": 0}
    with tempfile.TemporaryDirectory() as tmp:
        writer = HuggingFaceStorageWriter(
            tmp, fqn_to_index_mapping=_file_plan(state, cfg.checkpoint_file_bytes), save_distributed=True
        )
        dcp.save(state, storage_writer=writer)
        del state
        # What every rank's files hold (from their headers), in one small object: a resume reads it
        # and downloads only the files that overlap its own shards.
        index = _gather(_shard_index(Path(tmp)), node)
        if node.is_main:
            data = json.dumps([e for rank in index for e in rank]).encode()
            until_done(
                f"checkpoint step {step} index",
                lambda: store.put_bytes(f"{prefix}/dcp/index.json", data, content_type="application/json"),
                status,
                None,
            )
        for path in sorted(Path(tmp).glob("*.safetensors")):
            written["bytes"] += path.stat().st_size
            written["files"] += 1
            _upload_file(store, f"{prefix}/dcp/{path.name}", path, status)  # one file in memory at a time
    card = run_card(cfg, step, extra) if node.is_main else None
    if lora.is_lora(policy.model):  # every rank takes part in the gathers; rank 0 writes adapter/ and model/
        lora.export_adapter(store, prefix, policy.model, node.is_main, status)
        lora.export_merged(
            store,
            prefix,
            policy.model,
            tokenizer,
            node.is_main,
            cfg.export_shard_bytes,
            status,
            dtype=cfg.save_dtype,
            card=card,
        )
    else:
        export_model(
            store,
            prefix,
            policy.model,
            tokenizer,
            node,
            cfg.export_shard_bytes,
            status,
            dtype=cfg.save_dtype,
            card=card,
        )
    node.barrier()  # every rank's shard and the model/ folder are in S3 before `latest` can point at them
    if node.is_main:
        assert extra is not None, "rank 0 writes the data position with every checkpoint"
        until_done(
            f"checkpoint step {step}",
            lambda: _write_state(
                store,
                cfg.run_name,
                step,
                prefix,
                policy.scheduler,
                extra,
                # parameters named by their fully qualified names, as torch.distributed.checkpoint keys them
                {
                    "checkpoint_format": "sharded",
                    "optimizer": {"param_groups": optim_sd["param_groups"]},
                    "lora": lora.describe(cfg),
                },
            ),
            status,
            None,
        )
    return written


def _write_state(
    store: Store,
    run_name: str,
    step: int,
    prefix: str,
    scheduler: LRScheduler,
    extra: dict[str, Any],
    layout: dict[str, Any],
) -> None:
    """rng.safetensors, config.yaml, state.json (with the layout's own fields: the optimizer's
    metadata, the checkpoint format), then `latest`: rank 0, once the weights and optimizer state
    are durable, for both layouts."""
    rng: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    store.put_bytes(f"{prefix}/rng.safetensors", save_tensors(rng))
    _write_config(store, prefix, extra)
    py_state = random.getstate()
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "python_random": [py_state[0], list(py_state[1]), py_state[2]],
        **layout,
        **extra,
    }
    store.put_bytes(f"{prefix}/state.json", json.dumps(state, sort_keys=True).encode(), content_type="application/json")
    store.put_bytes(
        f"{run_prefix(run_name)}/latest",
        json.dumps({"step": step, "prefix": prefix}).encode(),
        content_type="application/json",
    )
    log.info("checkpoint step %d written to %s", step, prefix)


def restore_sharded(store: Store, prefix: str, policy: Policy) -> int:
    """Every rank: weights and AdamW state of a sharded checkpoint into this rank's shards, at any world
    size (DCP reads the slices of the saved shards that overlap this rank's), then scheduler and RNG;
    returns the step. A rank downloads only the shard files that overlap its own shards (dcp/index.json
    says which) to a local folder and reads them through safetensors' mmap: its memory holds its own
    shard, plus one downloaded file while it is written to disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state_json = read_state(store, prefix)
    target, model_sd, optim_sd, aliases = _train_state(policy)
    with tempfile.TemporaryDirectory() as tmp:
        dcp.load(target, storage_reader=_ShardReader(store, prefix, Path(tmp)))
    model_sd = {**target["model"], **{a: target["model"][o] for a, o in aliases}}
    optim_sd = {"state": target["optim"], "param_groups": state_json["optimizer"]["param_groups"]}
    set_state_dict(
        policy.module,
        policy.optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=_state_options(policy),
    )
    policy.scheduler.load_state_dict(state_json["scheduler"])
    _restore_rng(store, prefix, state_json)
    return int(state_json["step"])


def _restore_rng(store: Store, prefix: str, state: dict[str, Any]) -> None:
    rng = load_tensors(store.get_bytes(f"{prefix}/rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))


# -- the exported model folder (issue 28 item 3, issue 32 item 4) ------------------------------------
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def save_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `save_dtype` name; BadInput naming the choices otherwise."""
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise errors.BadInput(f"save_dtype {name!r}: use one of {', '.join(SAVE_DTYPES)}") from None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in the export dtype (round to nearest); integer buffers as they are."""
    return t.to(dtype) if t.is_floating_point() else t


def write_model_folder(
    folder: Path,
    names: list[str],
    shapes: dict[str, tuple[torch.Size, torch.dtype]],
    tensor: Callable[[str], torch.Tensor | None],
    meta: ModelMeta,
    *,
    dtype: str,
    shard_bytes: int,
    emit: Callable[[Path], None] = lambda path: None,
) -> None:
    """A Hugging Face model folder in `folder`, one tensor at a time: `tensor(name)` is called once per
    name in order (on every rank: it may be a collective) and returns the whole tensor on the writing
    rank (None elsewhere: then nothing is written). Floating tensors are cast to `dtype` and grouped
    into safetensors files of at most `shard_bytes` (model.safetensors, or model-0000i-of-0000n and
    the index transformers reads); each file is written, handed to `emit` (which may upload and delete
    it) and freed before the next. Then config.json (its dtype set to `dtype`), generation_config.json,
    the tokenizer files and README.md (the model card) when `meta` has them."""
    from safetensors.torch import save_file

    torch_dtype = save_torch_dtype(dtype)

    def nbytes(k: str) -> int:
        shape, source = shapes[k]
        item = torch_dtype.itemsize if source.is_floating_point else source.itemsize
        return shape.numel() * item

    files: list[list[str]] = [[]]
    total = 0
    for k in names:
        if files[-1] and total + nbytes(k) > shard_bytes:
            files.append([])
            total = 0
        files[-1].append(k)
        total += nbytes(k)
    n = len(files)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    writing = True
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, keys in zip(file_names, files):
        tensors: dict[str, torch.Tensor] = {}
        for k in keys:
            full = tensor(k)
            if full is None:
                writing = False
                continue
            tensors[k] = _cast(full.detach().cpu(), torch_dtype).contiguous()
            del full
        if writing:
            path = folder / file_name
            save_file(tensors, str(path), metadata={"format": "pt"})
            tensors.clear()
            emit(path)
    if not writing:
        return
    meta_files = meta.write(folder, dtype)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(k) for k in names)},
            "weight_map": {k: f for f, keys in zip(file_names, files) for k in keys},
        }
        path = folder / "model.safetensors.index.json"
        path.write_text(json.dumps(index, indent=2, sort_keys=True))
        meta_files.append(path)
    for path in meta_files:
        emit(path)


@dataclass
class ModelMeta:
    """What an exported folder holds besides the weights."""

    config: Any  # a transformers PretrainedConfig
    generation_config: Any = None
    tokenizer: Any = None  # anything with save_pretrained(folder), or a folder to copy tokenizer files from
    card: str | None = None  # README.md

    def write(self, folder: Path, dtype: str) -> list[Path]:
        """config.json (dtype = the weights' dtype; use_cache on, which the trainer turns off for
        training only), generation_config.json, tokenizer files, README.md; returns the files written."""
        import copy

        before = {p for p in folder.rglob("*") if p.is_file()}
        config = copy.deepcopy(self.config)
        config.dtype = save_torch_dtype(dtype)
        if hasattr(config, "use_cache"):
            config.use_cache = True
        config.save_pretrained(folder)
        conf_path = folder / "config.json"
        conf = json.loads(conf_path.read_text())
        # transformers 5 reads `dtype`; older transformers and serving engines read `torch_dtype`
        conf["dtype"] = conf["torch_dtype"] = dtype
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)
        if isinstance(self.tokenizer, (str, Path)):
            import shutil

            for path in sorted(Path(self.tokenizer).iterdir()):
                if path.is_file() and (
                    path.name.startswith(("tokenizer", "special_tokens")) or path.name in TOKENIZER_FILES
                ):
                    shutil.copyfile(path, folder / path.name)
        elif self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        if self.card is not None:
            (folder / "README.md").write_text(self.card, encoding="utf-8")
        return sorted(p for p in folder.rglob("*") if p.is_file() and p not in before)


# Files a tokenizer folder holds besides tokenizer*.json / special_tokens_map.json.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "added_tokens.json")


def model_meta(model: PreTrainedModel, tokenizer: Any, card: str | None) -> ModelMeta:
    generation = model.generation_config if model.can_generate() else None
    return ModelMeta(model.config, generation, tokenizer, card)


def export_model(
    store: Store,
    prefix: str,
    model: PreTrainedModel,
    tokenizer: Any,
    node: Node | None,
    shard_bytes: int,
    status: InfraStatus | None = None,
    *,
    dtype: str = "bfloat16",
    card: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The Hugging Face folder `<prefix>/model/` in `dtype`, with no rank holding the model: every rank
    gathers one tensor at a time (`full_tensor`, a collective), and rank 0 (or the one caller, `node`
    None) casts it and collects them into files of at most `shard_bytes` (write_model_folder), uploading
    and freeing each before the next. Rank 0's extra memory: one file's tensors, then its bytes. The
    names are the ones save_pretrained uses (a tied LM head once). `state`: a whole state dict to export
    instead of the model's own (the full layout under FSDP, gathered to rank 0, which alone calls this)."""
    from torch.distributed.tensor import DTensor

    status = status or InfraStatus()
    sd = state if state is not None else model.state_dict()
    names = [k for k in hf_state_names(model) if k in sd]
    is_main = node is None or node.is_main

    def tensor(k: str) -> torch.Tensor | None:
        t = sd[k].detach()
        full = t.full_tensor() if isinstance(t, DTensor) else t  # every rank takes part
        return full if is_main else None

    def upload(path: Path) -> None:
        _upload_file(store, f"{prefix}/model/{path.relative_to(folder)}", path, status)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_model_folder(
            folder,
            names,
            {k: (sd[k].shape, sd[k].dtype) for k in names},
            tensor,
            model_meta(model, tokenizer, card),
            dtype=dtype,
            shard_bytes=shard_bytes,
            emit=upload,
        )


def run_card(cfg: TrainerConfig, step: int, extra: dict[str, Any] | None) -> str | None:
    """Rank 0 (the one with `extra`): the model card of checkpoint `step` of this run, from the state
    state.json is about to record and the run's local logs (metrics.jsonl, trained_pairs.jsonl,
    skipped_pairs.jsonl under log_dir/run_name, up to `step`)."""
    import dataclasses

    from services.trainer.model_card import base_model_license, card_facts, model_card, offdpo_build

    if extra is None:
        return None
    logs = Path(cfg.log_dir) / cfg.run_name

    def read(name: str) -> str | None:
        path = logs / name
        return path.read_text() if path.is_file() else None

    version, commit = offdpo_build()
    state = {"step": step, "config": dataclasses.asdict(cfg), **extra}
    facts = card_facts(
        state,
        metrics_jsonl=read("metrics.jsonl"),
        trained_pairs_jsonl=read("trained_pairs.jsonl"),
        skipped_pairs_jsonl=read("skipped_pairs.jsonl"),
        save_dtype=cfg.save_dtype,
        topic=_shards_topic(extra.get("config_yaml")),
        license=base_model_license(cfg.model) if cfg.model else None,
        offdpo_version=version,
        offdpo_commit=commit,
    )
    return model_card(facts)


def _shards_topic(config_yaml: str | None) -> str:
    """The shard-ready topic a continuous run followed, from its resolved config.yaml (the kafka section)."""
    import yaml

    try:
        kafka = (yaml.safe_load(config_yaml or "") or {}).get("kafka") or {}
    except yaml.YAMLError:
        return ""
    return str(kafka.get("shards_topic", "")) if isinstance(kafka, dict) else ""


def export_checkpoint(
    store: Store,
    prefix: str,
    out: Path,
    *,
    dtype: str,
    shard_bytes: int = 2 << 30,
    card: Callable[[dict[str, Any]], str | None] = lambda state: None,
    hub_ready: bool = False,
) -> dict[str, Any]:
    """The model folder of the checkpoint at `prefix` (either layout) written into `out` in `dtype`,
    from the float32 state it resumes from (a sharded checkpoint's dcp/ shards; a full one's weights/,
    or model/ where that is float32), one tensor at a time, in one process without a GPU or a process
    group. config, generation config and tokenizer come from the checkpoint's own model/ folder;
    `card(state.json)` gives README.md. `hub_ready`: also what the Hub's model page expects beyond the
    loadable folder (generation_config.json is always copied when present; with hub_ready the folder
    is refused if it would have no README.md, config.json or tokenizer). Returns a summary."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    state = read_state(store, prefix)
    if state.get("lora"):
        # A LoRA checkpoint's resumable state is the adapters alone; the base is the run's --model.
        raise errors.BadInput(
            f"{prefix} is a LoRA checkpoint (r={state['lora'].get('r')}): its exports are already there, "
            f"{prefix}/model/ (the merged model, in the run's save_dtype) and {prefix}/adapter/ (peft's folder, "
            "PeftModel.from_pretrained(base, ...)); offdpo export rebuilds only full fine-tuning checkpoints"
        )
    with tempfile.TemporaryDirectory() as tmp:
        meta_dir = Path(tmp) / "meta"
        meta_dir.mkdir()
        model_root = f"{prefix}/model/"
        for key in store.list_keys(model_root):
            name = key[len(model_root) :]
            if "/" in name or _unsafe_path(name) or name.endswith(".safetensors") or name.endswith(".index.json"):
                continue  # the weights come from the resumable state; nested files are not needed
            (meta_dir / name).write_bytes(store.get_bytes(key))
        if not (meta_dir / "config.json").is_file():
            raise errors.BadInput(f"{prefix} has no model/config.json: is it a trainer checkpoint (step-N/)?")
        config = AutoConfig.from_pretrained(meta_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        names = hf_state_names(skeleton)
        meta_sd = skeleton.state_dict()
        generation = (
            GenerationConfig.from_pretrained(meta_dir) if (meta_dir / "generation_config.json").is_file() else None
        )
        has_tokenizer = any(p.name.startswith("tokenizer") for p in meta_dir.iterdir())
        if hub_ready and not has_tokenizer:
            raise errors.BadInput(f"{prefix}/model/ has no tokenizer files: a Hub-ready folder needs them")
        source, read = _float32_source(store, prefix, state, Path(tmp) / "src")
        shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        for k in names:
            shapes[k] = (meta_sd[k].shape, torch.float32 if meta_sd[k].is_floating_point() else meta_sd[k].dtype)
        card_text = card(state)
        if hub_ready and card_text is None:
            raise errors.BadInput("a Hub-ready folder needs a model card")
        out.mkdir(parents=True, exist_ok=True)
        write_model_folder(
            out,
            names,
            shapes,
            read,
            ModelMeta(config, generation, meta_dir if has_tokenizer else None, card_text),
            dtype=dtype,
            shard_bytes=shard_bytes,
        )
    return {"path": str(out), "step": state["step"], "source": source, "dtype": dtype, "tensors": len(names)}


def _float32_source(
    store: Store, prefix: str, state: dict[str, Any], local: Path
) -> tuple[str, Callable[[str], torch.Tensor]]:
    """(where the float32 weights come from, a reader of one whole tensor by its Hugging Face name)."""
    from safetensors import safe_open

    local.mkdir(parents=True, exist_ok=True)
    if state.get("checkpoint_format") == "sharded":
        index = _ShardReader(store, prefix, local).index  # checked file names
        pieces: dict[str, list[dict[str, Any]]] = {}
        for e in index:
            # DCP keys: "model." + the trained module's names ("model." + the Hugging Face name)
            if e["key"].startswith("model."):
                pieces.setdefault(e["key"].removeprefix("model.").removeprefix("model."), []).append(e)

        def read_sharded(name: str) -> torch.Tensor:
            if name not in pieces:
                raise errors.BadInput(f"{prefix}/dcp/ holds no weights for {name!r}: not this model's checkpoint")
            full: torch.Tensor | None = None
            for e in pieces[name]:
                path = local / e["file"]
                if not path.exists():
                    path.write_bytes(store.get_bytes(f"{prefix}/dcp/{e['file']}"))
                with safe_open(str(path), "pt") as f:
                    part = f.get_tensor(e["key"])
                if full is None:
                    size = [0] * part.dim()
                    for p in pieces[name]:
                        size = [max(a, o + n) for a, o, n in zip(size, p["offsets"], p["shape"])]
                    full = torch.empty(size, dtype=part.dtype)
                full[tuple(slice(o, o + n) for o, n in zip(e["offsets"], e["shape"]))] = part
            assert full is not None
            return full

        return f"{prefix}/dcp/", read_sharded
    folder = download_weights(store, prefix, local)
    where: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))  # noqa: SIM118 (a safe_open handle, not a dict)

    def read_full(name: str) -> torch.Tensor:
        if name not in where:
            raise errors.BadInput(f"{prefix}'s weights hold no tensor {name!r}: not this model's checkpoint")
        with safe_open(str(where[name]), "pt") as f:
            t = f.get_tensor(name)
        if t.is_floating_point() and t.dtype != torch.float32:
            log.warning("%s: %s is stored in %s, not float32 (an export of an export)", prefix, name, t.dtype)
        return t

    sub = WEIGHTS if store.list_keys(f"{prefix}/{WEIGHTS}/") else "model"
    return f"{prefix}/{sub}/", read_full


def _upload_file(store: Store, key: str, path: Path, status: InfraStatus) -> None:
    data = path.read_bytes()
    until_done(f"upload {key}", lambda: store.put_bytes(key, data), status, None)
    os.unlink(path)


_SHARD_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")


def _shard_index(folder: Path) -> list[dict[str, Any]]:
    """What each DCP safetensors file in `folder` holds, read from the headers only: one entry per
    tensor piece (file, flattened key, offsets in the whole tensor, shape, safetensors dtype)."""
    from safetensors import safe_open

    entries = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            sharding = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                piece = f.get_slice(key)
                shape = list(piece.get_shape())
                offsets = sharding.get(key, {}).get("saved_offsets", [0] * len(shape))
                entries.append(
                    {"file": path.name, "key": key, "offsets": offsets, "shape": shape, "dtype": piece.get_dtype()}
                )
    return entries


def _gather(obj: Any, node: Node) -> list[Any]:
    """Every rank's `obj` on rank 0 (a collective); [obj] in one process."""
    import torch.distributed as dist

    if node.world == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * node.world if node.is_main else []
    dist.gather_object(obj, out if node.is_main else None, dst=0)
    return out


class _ShardReader(HuggingFaceStorageReader):
    """DCP's safetensors reader over a checkpoint in the object store: the metadata comes from
    dcp/index.json (no file is opened for it), and `read_data` first downloads, into `local`, only
    the files this rank's read plan touches (checked names, one file in memory at a time)."""

    def __init__(self, store: Store, prefix: str, local: Path):
        super().__init__(str(local))
        self.store, self.prefix, self.local = store, prefix, local
        self.index = json.loads(store.get_bytes(f"{prefix}/dcp/index.json"))
        for e in self.index:  # checked here: DCP would wrap an error raised inside its own steps
            if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not _SHARD_FILE.match(e["file"]):
                raise UnsafeCheckpoint(
                    f"{prefix}/dcp/index.json names {e.get('file') if isinstance(e, dict) else e!r}, not a shard "
                    f"file of this checkpoint: refusing to read it"
                )

    def read_metadata(self) -> Any:
        from safetensors.torch import _getdtype
        from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        tensors: dict[str, Any] = {}
        storage: dict[Any, Any] = {}
        for e in self.index:
            shape, offsets, dtype = torch.Size(e["shape"]), torch.Size(e["offsets"]), _getdtype(e["dtype"])
            end = [o + n for o, n in zip(offsets, shape)]
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=shape)
            md = tensors.get(e["key"])
            if md is None:
                tensors[e["key"]] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(end), [chunk])
            else:
                md.chunks.append(chunk)
                md.size = torch.Size([max(a, b) for a, b in zip(md.size, end)])
            storage[MetadataIndex(fqn=e["key"], offset=offsets)] = _HFStorageInfo(
                relative_path=str(self.local / e["file"]), shape=shape, dtype=dtype
            )
        metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        for name in sorted({Path(self.storage_data[item.storage_index].relative_path).name for item in plan.items}):
            path = self.local / name
            if not path.exists():
                path.write_bytes(self.store.get_bytes(f"{self.prefix}/dcp/{name}"))
        return super().read_data(plan, planner)
