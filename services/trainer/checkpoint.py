"""Checkpoints in S3, without pickle.

runs/<run>/checkpoints/step-<N>/model/...            save_pretrained (safetensors, config, tokenizer)
runs/<run>/checkpoints/step-<N>/optimizer.safetensors AdamW moments and step counts
runs/<run>/checkpoints/step-<N>/rng.safetensors       torch CPU (and CUDA) generator states
runs/<run>/checkpoints/step-<N>/state.json            step, scheduler, optimizer hyper-parameters,
                                                      python RNG, data position / consumed shards
runs/<run>/latest                                     {"step": N, "prefix": ...}: written last, so it
                                                      only ever points at a complete checkpoint

The layout is the one-process layout whatever the run's world size or DDP/FSDP mode: FSDP gathers
weights and optimizer state to rank 0 before they are written, and shards them again on resume.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.optim.lr_scheduler import LRScheduler

from offdpo import errors
from offdpo.s3 import safe_key_part
from services.trainer.config import TrainerConfig
from services.trainer.data import InfraStatus, until_done
from services.trainer.distributed import Node, full_state_dicts, optimizer_loader

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
) -> str:
    """Upload everything for `step`, then move `latest`. `optimizer_state`: torch's index-keyed state
    dict (whole); `model_state`: a full model state dict (FSDP gathers both to rank 0)."""
    prefix = f"{run_prefix(run_name)}/checkpoints/step-{step:08d}"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model", safe_serialization=True, state_dict=model_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(Path(tmp) / "model")
        for path in sorted((Path(tmp) / "model").rglob("*")):
            if path.is_file():
                store.put_bytes(f"{prefix}/model/{path.relative_to(Path(tmp) / 'model')}", path.read_bytes())
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
    store.put_bytes(f"{prefix}/optimizer.safetensors", save_tensors(opt_tensors))
    rng: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    store.put_bytes(f"{prefix}/rng.safetensors", save_tensors(rng))
    py_state = random.getstate()
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "optimizer": opt_meta,
        "python_random": [py_state[0], list(py_state[1]), py_state[2]],
        **extra,
    }
    store.put_bytes(f"{prefix}/state.json", json.dumps(state, sort_keys=True).encode(), content_type="application/json")
    store.put_bytes(
        f"{run_prefix(run_name)}/latest",
        json.dumps({"step": step, "prefix": prefix}).encode(),
        content_type="application/json",
    )
    log.info("checkpoint step %d written to %s", step, prefix)
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
    """Checkpoint `step`. Every rank calls it (FSDP gathers the state to rank 0); rank 0 writes, with
    `extra` (the data position, the reference fingerprint: rank 0's, None on the others) in state.json."""
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
                store, cfg.run_name, step, policy.model, tokenizer, full_optim, policy.scheduler, extra, model_state
            ),
            status or InfraStatus(),
            None,
        )


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
    load_optimizer = optimizer_loader(policy.module, policy.optimizer, cfg, node.world)
    return load_trainer_state(store, prefix, load_optimizer, policy.scheduler)["step"]


def download_model(store: Store, prefix: str, dest: Path) -> Path:
    """The checkpoint's model folder into `dest`. Every key must lie under `<prefix>/model/` and name a
    relative path inside `dest` (no '..', no absolute path): UnsafeCheckpoint otherwise, before
    anything is written."""
    root = f"{prefix}/model/"
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
