"""LoRA through peft (issue 28 item 5): only the adapters train, are optimised and are checkpointed;
a resume continues exactly; the adapter folder and the merged model/ export load in peft and
transformers and compute what the trained policy computes; the memory planner's count of adapter
parameters is the one peft builds.

Fast tier: one process on the tiny model. The FSDP test (two gloo ranks, spawned) is marked integration.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from offdpo.errors import ConfigError
from services.trainer import checkpoint as ckpt
from services.trainer import lora
from services.trainer.config import TrainerConfig
from services.trainer.distributed import Node
from services.trainer.messages import Plan
from services.trainer.step import train_step
from services.trainer.train import build_policy
from tests.fakes import FakeObjectStore
from tests.trainer.test_sharded_checkpoint import DirStore, examples, spawn

pytest.importorskip("peft")

NODE = Node(0, 1, torch.device("cpu"))
TOTAL = 6


def config(model: str | Path, run: str, **kw: Any) -> TrainerConfig:
    base = dict(
        model=str(model),
        run_name=run,
        lr=2e-2,
        warmup_steps=1,
        micro_batch_size=2,
        global_batch_size=4,
        lora_r=4,
        lora_alpha=8.0,
        save_dtype="float32",
    )
    return TrainerConfig(**{**base, **kw})


def train(policy: ckpt.Policy, cfg: TrainerConfig, node: Node, first: int, last: int) -> list[dict[str, float]]:
    out = []
    for step in range(first, last):
        sums = train_step(
            policy.module, examples(step), cfg, node.rank, node.world, node.device, contextlib.nullcontext
        )
        torch.nn.utils.clip_grad_norm_(policy.module.parameters(), cfg.max_grad_norm)
        policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)
        out.append(sums)
    return out


def adapters(policy: ckpt.Policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.module.named_parameters() if v.requires_grad}


def frozen(policy: ckpt.Policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.module.named_parameters() if not v.requires_grad}


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits
    model.train(was)
    return out


IDS = torch.tensor([[1, 500, 501, 100, 101, 300, 301, 7]])


# -- fast tier ---------------------------------------------------------------------------------------
def test_lora_trains_only_the_adapters(tiny_model):
    """Base weights bit-identical after steps, every adapter changed, AdamW holds only adapter state,
    and the DPO reward margin on the trained pairs moves up."""
    cfg = config(tiny_model, "lora-train")
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, FakeObjectStore(), Plan(TOTAL, "fp", None))
    assert lora.is_lora(policy.model)
    names = [k for k, p in policy.module.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names), names
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in names}
    assert targets == set(cfg.lora_targets)
    n_opt = sum(len(g["params"]) for g in policy.optimizer.param_groups)
    assert n_opt == len(names), "the optimizer gets only the adapters"
    assert 0 < lora.trainable_fraction(policy.module) < 0.2
    base0, lora0 = frozen(policy), adapters(policy)
    assert all(float(v.abs().max()) == 0 for k, v in lora0.items() if ".lora_B." in k), "B starts at zero"

    sums = train(policy, cfg, NODE, 0, 4)
    for k, v in frozen(policy).items():
        assert torch.equal(v, base0[k]), f"{k}: a frozen base weight changed"
    changed = [k for k, v in adapters(policy).items() if not torch.equal(v, lora0[k])]
    assert len(changed) == len(lora0), sorted(set(lora0) - set(changed))[:4]
    assert all(len(st) > 0 for st in policy.optimizer.state.values())
    assert len(policy.optimizer.state) == len(names)
    # the first step's pairs again: a lower loss and a larger reward margin than before training on them
    again = train_step(policy.module, examples(0), cfg, 0, 1, NODE.device, contextlib.nullcontext)
    policy.optimizer.zero_grad(set_to_none=True)
    assert again["loss"] < sums[0]["loss"], (again["loss"], sums[0]["loss"])
    assert again["chosen"] - again["rejected"] > sums[0]["chosen"] - sums[0]["rejected"]


def test_lora_full_layout_checkpoint_holds_only_adapters_and_resumes_exactly(tiny_model):
    store = FakeObjectStore()
    cfg = config(tiny_model, "lora-full")
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(policy, cfg, NODE, 0, 2)
    ckpt.save(store, cfg, NODE, 2, policy, None, {"data": {"index": 2}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "lora-full")
    assert prefix is not None
    keys = {k.removeprefix(prefix + "/") for k in store.objects if k.startswith(prefix + "/")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors"} <= keys
    assert not any(k.startswith(("weights/", "dcp/")) for k in keys), keys
    saved = load_tensors(store.objects[f"{prefix}/adapter/adapter_model.safetensors"])
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert len(saved) == len(adapters(policy))
    opt = load_tensors(store.objects[f"{prefix}/optimizer.safetensors"])
    assert len({k.split(".")[0] for k in opt}) == len(saved), "AdamW state for the adapters only"
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    model_params = sum(p.numel() for p in policy.module.parameters())
    assert adapter_bytes < 0.2 * 4 * model_params
    state = ckpt.read_state(store, prefix)
    assert state["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": sorted(cfg.lora_targets)}

    resumed = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", prefix))
    assert ckpt.restore(store, prefix, cfg, NODE, resumed) == 2
    for k, v in adapters(resumed).items():
        assert torch.equal(v, adapters(policy)[k]), k
    train(policy, cfg, NODE, 2, 4)
    train(resumed, cfg, NODE, 2, 4)
    for k, v in adapters(resumed).items():
        assert torch.equal(v, adapters(policy)[k]), f"{k}: the resumed run went elsewhere"

    # a full fine-tune cannot resume LoRA adapters, nor another rank
    with pytest.raises(ConfigError, match="trained with LoRA r=4"):
        build_policy(config(tiny_model, "lora-full", lora_r=0), NODE, store, Plan(TOTAL, "fp", prefix))
    with pytest.raises(ConfigError, match="this run asks for LoRA r=8"):
        build_policy(config(tiny_model, "lora-full", lora_r=8), NODE, store, Plan(TOTAL, "fp", prefix))


def test_lora_sharded_layout_in_one_process_holds_only_adapters(tiny_model):
    store = FakeObjectStore()
    cfg = config(tiny_model, "lora-dcp", checkpoint_format="sharded")
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(policy, cfg, NODE, 0, 2)
    ckpt.save(store, cfg, NODE, 2, policy, None, {"data": {}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "lora-dcp")
    assert prefix is not None
    index = json.loads(store.objects[f"{prefix}/dcp/index.json"])
    model_keys = {e["key"] for e in index if e["key"].startswith("model.")}
    assert model_keys == {f"model.{k}" for k in adapters(policy)}, "DCP holds the adapters, no base weight"
    optim_keys = {e["key"].split(".", 1)[1].rsplit(".", 1)[0] for e in index if e["key"].startswith("optim.")}
    assert optim_keys == set(adapters(policy))
    assert f"{prefix}/adapter/adapter_model.safetensors" in store.objects

    resumed = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", prefix))
    assert ckpt.restore(store, prefix, cfg, NODE, resumed) == 2
    train(policy, cfg, NODE, 2, 4)
    train(resumed, cfg, NODE, 2, 4)
    for k, v in adapters(resumed).items():
        assert torch.equal(v, adapters(policy)[k]), k


def test_lora_exports_load_in_peft_and_transformers(tiny_model, tmp_path):
    """model/ (the merged model) loads in transformers with the trained policy's logits (1e-5); the
    merged weights are merge_and_unload's; adapter/ loads in peft on top of the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = FakeObjectStore()
    cfg = config(tiny_model, "lora-export")
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(policy, cfg, NODE, 0, 3)
    want = logits(policy.model, IDS)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), IDS)
    assert float((want - base_logits).abs().max()) > 1e-3, "the adapters changed the policy"

    merged = dict(lora.merged_state(policy.model))
    peft_copy: Any = copy.deepcopy(policy.model)
    reference = peft_copy.merge_and_unload().state_dict()
    assert set(merged) <= set(reference)
    for k, v in merged.items():
        assert torch.allclose(v, reference[k], atol=1e-6, rtol=0), k

    ckpt.save(store, cfg, NODE, 3, policy, None, {"data": {}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "lora-export")
    assert prefix is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, prefix, Path(tmp))
        exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert float((logits(exported, IDS) - want).abs().max()) <= 1e-5
    adapter_dir = tmp_path / "adapter"
    for key, data in store.objects.items():
        if key.startswith(f"{prefix}/adapter/"):
            (adapter_dir / key.removeprefix(f"{prefix}/adapter/")).parent.mkdir(parents=True, exist_ok=True)
            (adapter_dir / key.removeprefix(f"{prefix}/adapter/")).write_bytes(data)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir)
    assert float((logits(with_adapter, IDS) - want).abs().max()) <= 1e-5


def _bf16() -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def bf16_train(policy: ckpt.Policy, cfg: TrainerConfig, node: Node, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        sums = train_step(policy.module, examples(step), cfg, node.rank, node.world, node.device, _bf16)
        policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)
        losses.append(sums["loss"])
    return losses


def test_lora_in_bfloat16_holds_the_frozen_base_in_bfloat16(tiny_model):
    """--precision bf16: the frozen base takes 2 bytes per parameter (it is only ever used in bfloat16),
    the adapters and their AdamW state stay float32; the steps train (autocast, as the trainer runs them)
    and the full-layout checkpoint resumes to the same adapters."""
    store = FakeObjectStore()
    cfg = config(tiny_model, "lora-bf16", precision="bf16")
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    dtypes = {(p.requires_grad, p.dtype) for p in policy.module.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, dtypes
    lora0 = adapters(policy)
    bf16_train(policy, cfg, NODE, 0, 2)
    assert all(not torch.equal(v, lora0[k]) for k, v in adapters(policy).items() if ".lora_B." in k)
    ckpt.save(store, cfg, NODE, 2, policy, None, {"data": {}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "lora-bf16")
    assert prefix is not None
    resumed = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", prefix))
    assert ckpt.restore(store, prefix, cfg, NODE, resumed) == 2
    assert bf16_train(policy, cfg, NODE, 2, 3) == bf16_train(resumed, cfg, NODE, 2, 3)


def test_planner_state_bytes_match_a_lora_step(tiny_model):
    """The planner's LoRA weights + gradients + AdamW bytes (float32, one process) against a real step's."""
    from offdpo import memplan

    cfg = config(tiny_model, "plan-bytes", lora_r=8)
    policy = build_policy(cfg, NODE, FakeObjectStore(), Plan(TOTAL, "fp", None))
    train(policy, cfg, NODE, 0, 1)
    # measured before zero_grad would drop the gradients: one more backward, no step
    train_step(policy.module, examples(1), cfg, 0, 1, NODE.device, contextlib.nullcontext)
    measured = memplan.measure_state_bytes(policy.module, policy.optimizer)
    conf = json.loads((Path(tiny_model) / "config.json").read_text())
    cmp = memplan.measured_vs_planned(conf, measured, world=1, strategy="ddp", precision="fp32", lora_r=8)
    assert cmp.rel_error <= 0.01, cmp.as_dict() if hasattr(cmp, "as_dict") else cmp


def test_lora_settings_are_checked(tiny_model, monkeypatch):
    with pytest.raises(ConfigError, match="no linear layer of that name"):
        build_policy(
            config(tiny_model, "x", lora_targets=("q_proj", "qkv")), NODE, FakeObjectStore(), Plan(1, "f", None)
        )
    assert lora.settings_problems(config(tiny_model, "x", lora_alpha=0.0, lora_dropout=1.0)) == [
        "--lora-alpha 0.0: must be positive",
        "--lora-dropout 1.0: must be in [0, 1)",
    ]
    assert lora.settings_problems(config(tiny_model, "x", distributed="fsdp", checkpoint_format="full"))
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if the `lora` extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'offdpo\[lora\]'"):
        build_policy(config(tiny_model, "x"), NODE, FakeObjectStore(), Plan(1, "f", None))


def test_lora_flags_and_environment():
    from services.trainer.train import parse_args

    cfg, _ = parse_args(["--model", "m", "--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "q_proj,v_proj"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_targets) == (8, 16.0, ("q_proj", "v_proj"))
    env = TrainerConfig.from_env({"OFFDPO_TRAINER_LORA_R": "4", "OFFDPO_TRAINER_LORA_TARGETS": "o_proj, down_proj"})
    assert (env.lora_r, env.lora_targets) == (4, ("o_proj", "down_proj"))
    assert TrainerConfig().lora_r == 0, "full fine-tuning unless asked"


def test_planner_counts_the_adapters_peft_builds(tiny_model):
    """offdpo plan --lora r: its trainable-parameter count equals the parameters peft makes trainable,
    for the default targets and a subset."""
    from offdpo import memplan

    conf = json.loads((Path(tiny_model) / "config.json").read_text())
    shape = memplan.ModelShape.from_config(conf)
    for r, targets in ((4, TrainerConfig.lora_targets), (8, ("q_proj", "v_proj"))):
        policy = build_policy(
            config(tiny_model, "plan", lora_r=r, lora_targets=targets), NODE, FakeObjectStore(), Plan(1, "f", None)
        )
        measured = sum(p.numel() for p in policy.module.parameters() if p.requires_grad)
        assert shape.lora_params(r, tuple(targets)) == measured
        est = memplan.estimate_trainer(shape, world=1, strategy="ddp", precision="fp32", lora_r=r)
        if targets == TrainerConfig.lora_targets:
            assert est.trainable_params == measured


# -- several gloo ranks --------------------------------------------------------------------------------
def _fsdp_session(node: Node, root: str, cfg: TrainerConfig, first: int, last: int, out: str) -> None:
    from torch.distributed.tensor import DTensor

    store = DirStore(root)
    prefix = ckpt.latest_checkpoint(store, cfg.run_name) if first else None
    policy = build_policy(cfg, node, store, Plan(TOTAL, "fp", prefix))
    if prefix:
        assert ckpt.restore(store, prefix, cfg, node, policy) == first
    sharded = sorted(k for k, p in policy.module.named_parameters() if isinstance(p, DTensor))
    train(policy, cfg, node, first, last)
    extra = {"data": {}, "fingerprint": "fp", "world_size": node.world} if node.is_main else None
    ckpt.save(store, cfg, node, last, policy, None, extra)
    node.barrier()
    if node.is_main:
        Path(out).write_text(
            json.dumps(
                {
                    "params": len(list(policy.module.parameters())),
                    "sharded": len(sharded),
                    "lora_sharded": sum(".lora_" in k for k in sharded),
                    "trainable": [k for k, p in policy.module.named_parameters() if p.requires_grad],
                }
            )
        )


@pytest.mark.integration
def test_lora_under_fsdp_two_ranks_matches_one_process(tiny_model, tmp_path):
    """2 FSDP ranks (adapters sharded with their decoder layer), 2 steps, sharded checkpoint; one
    process resumes it for 2 more: the adapters and the merged export equal a straight one-process
    LoRA run's (1e-5), and the base weights in the export are the base model's plus the adapters."""
    root = str(tmp_path / "bucket")
    store = DirStore(root)
    straight_cfg = config(tiny_model, "straight")
    torch.manual_seed(0)
    straight = build_policy(straight_cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(straight, straight_cfg, NODE, 0, 4)
    want = adapters(straight)

    out = tmp_path / "fsdp.json"
    fsdp = config(tiny_model, "fsdp", distributed="fsdp")
    spawn(2, _fsdp_session, root, fsdp, 0, 2, str(out))
    info = json.loads(out.read_text())
    assert info["sharded"] == info["params"], "FSDP2 shards every parameter, frozen and adapters alike"
    assert info["lora_sharded"] == len(want)
    assert sorted(info["trainable"]) == sorted(want)
    prefix = ckpt.latest_checkpoint(store, "fsdp")
    index = json.loads(store.get_bytes(f"{prefix}/dcp/index.json"))
    assert {e["key"] for e in index if e["key"].startswith("model.")} == {f"model.{k}" for k in want}

    _fsdp_session(NODE, root, config(tiny_model, "fsdp", distributed="fsdp"), 2, 4, str(out))
    prefix = ckpt.latest_checkpoint(store, "fsdp")
    assert prefix is not None
    got = {
        lora._module_key(k): v
        for k, v in load_tensors(store.get_bytes(f"{prefix}/adapter/adapter_model.safetensors")).items()
    }
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, worst

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, prefix, Path(tmp))
        exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert float((logits(exported, IDS) - logits(straight.model, IDS)).abs().max()) <= 1e-4


@pytest.mark.integration
def test_lora_fsdp_resumes_a_one_process_full_layout_checkpoint(tiny_model, tmp_path):
    """One process, 2 steps, full layout (adapter/ + optimizer.safetensors); 2 FSDP ranks resume it for
    2 more (the index-keyed AdamW state mapped onto the adapters' names): the straight run's adapters."""
    root = str(tmp_path / "bucket")
    store = DirStore(root)
    cfg = config(tiny_model, "straight")
    torch.manual_seed(0)
    straight = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(straight, cfg, NODE, 0, 4)
    out = str(tmp_path / "info.json")
    _fsdp_session(NODE, root, config(tiny_model, "old"), 0, 2, out)
    assert ckpt.read_state(store, str(ckpt.latest_checkpoint(store, "old"))).get("checkpoint_format") is None
    spawn(2, _fsdp_session, root, config(tiny_model, "old", distributed="fsdp"), 2, 4, out)
    prefix = ckpt.latest_checkpoint(store, "old")
    assert prefix is not None
    got = {
        lora._module_key(k): v
        for k, v in load_tensors(store.get_bytes(f"{prefix}/adapter/adapter_model.safetensors")).items()
    }
    want = adapters(straight)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-5


@pytest.mark.integration
def test_lora_under_ddp_two_ranks_matches_one_process(tiny_model, tmp_path):
    """DDP over 2 gloo ranks (hooks on the adapters only), 2 steps, full-layout checkpoint, 2 more steps
    resumed: the straight one-process run's adapters."""
    root = str(tmp_path / "bucket")
    store = DirStore(root)
    cfg = config(tiny_model, "straight")
    torch.manual_seed(0)
    straight = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(straight, cfg, NODE, 0, 4)
    out = str(tmp_path / "info.json")
    ddp = config(tiny_model, "ddp", distributed="ddp")
    spawn(2, _fsdp_session, root, ddp, 0, 2, out)
    spawn(2, _fsdp_session, root, ddp, 2, 4, out)
    prefix = ckpt.latest_checkpoint(store, "ddp")
    assert prefix is not None
    got = {
        lora._module_key(k): v
        for k, v in load_tensors(store.get_bytes(f"{prefix}/adapter/adapter_model.safetensors")).items()
    }
    want = adapters(straight)
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-5


def _fsdp_export(node: Node, root: str, cfg: TrainerConfig) -> None:
    """2 FSDP ranks train 2 steps and checkpoint: adapter/ and the merged model/ come from the shards."""
    _fsdp_session(node, root, cfg, 0, 2, str(Path(root) / "info.json"))


@pytest.mark.integration
def test_lora_fsdp_export_equals_one_process(tiny_model, tmp_path):
    """The merged model/ folder written by 2 FSDP ranks (each adapted weight gathered and merged in
    turn) loads in transformers with a one-process LoRA run's logits."""
    from transformers import AutoModelForCausalLM

    root = str(tmp_path / "bucket")
    store = DirStore(root)
    cfg = config(tiny_model, "straight2")
    torch.manual_seed(0)
    straight = build_policy(cfg, NODE, store, Plan(TOTAL, "fp", None))
    train(straight, cfg, NODE, 0, 2)
    spawn(2, _fsdp_export, root, config(tiny_model, "fsdp2", distributed="fsdp", export_shard_bytes=256 << 10))
    prefix = ckpt.latest_checkpoint(store, "fsdp2")
    assert prefix is not None
    assert store.exists(f"{prefix}/model/model.safetensors.index.json"), "several files at 256 KiB each"
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, prefix, Path(tmp))
        exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert float((logits(exported, IDS) - logits(straight.model, IDS)).abs().max()) <= 1e-4


def _fsdp_bf16(node: Node, root: str, cfg: TrainerConfig, out: str) -> None:
    from torch.distributed.tensor import DTensor

    store = DirStore(root)
    policy = build_policy(cfg, node, store, Plan(TOTAL, "fp", None))
    dtypes = sorted({f"{p.requires_grad}:{p.dtype}" for p in policy.module.parameters()})
    local = sum(p.to_local().numel() for p in policy.module.parameters() if isinstance(p, DTensor))
    losses = bf16_train(policy, cfg, node, 0, 3)
    extra = {"data": {}, "fingerprint": "fp", "world_size": node.world} if node.is_main else None
    ckpt.save(store, cfg, node, 3, policy, None, extra)
    node.barrier()
    if node.is_main:
        Path(out).write_text(json.dumps({"dtypes": dtypes, "losses": losses, "local": local}))


@pytest.mark.integration
def test_lora_fsdp_bfloat16_base_and_float32_adapters_in_one_unit(tiny_model, tmp_path):
    """FSDP2 with the bf16 policy on gloo: bfloat16 frozen shards and float32 adapter shards in the same
    decoder-layer unit (FSDP2 requires one dtype among trainable parameters only); it trains, and the
    sharded checkpoint and merged export are written."""
    out = tmp_path / "bf16.json"
    cfg = config(tiny_model, "fsdp-bf16", distributed="fsdp", precision="bf16", fsdp_mixed_precision="on")
    spawn(2, _fsdp_bf16, str(tmp_path / "bucket"), cfg, str(out))
    got = json.loads(out.read_text())
    assert got["dtypes"] == ["False:torch.bfloat16", "True:torch.float32"], got
    assert all(x == x for x in got["losses"]) and got["losses"][-1] < got["losses"][0], got["losses"]
    store = DirStore(tmp_path / "bucket")
    prefix = ckpt.latest_checkpoint(store, "fsdp-bf16")
    assert prefix is not None and store.exists(f"{prefix}/model/config.json")
    assert store.exists(f"{prefix}/adapter/adapter_model.safetensors")


def test_the_training_loop_runs_lora_and_resumes(tiny_model, tmp_path, monkeypatch):
    """train.run end to end (replay over an in-memory store): a LoRA run of 2 epochs stopped after
    3 steps and rerun finishes where an uninterrupted run does, its checkpoints hold adapters only,
    and the reward accuracy on the training pairs goes up."""
    from services.trainer import train as train_mod

    from .conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards

    fp = reference_fingerprint(tiny_model)
    rows = scored_pairs(tiny_model, synthetic_tokens(32, seed=5), fp)

    def run(run_name: str, max_steps: int) -> tuple[dict[str, Any], FakeObjectStore]:
        store = stores.setdefault(run_name, FakeObjectStore())
        if not store.objects:
            upload_shards(store, rows, fp, "loratopic", per_shard=8)
        monkeypatch.setattr(train_mod, "ObjectStore", lambda cfg: store)
        cfg = config(
            tiny_model,
            run_name,
            prefix="scores/",
            epochs=2,
            log_dir=str(tmp_path / "runs"),
            progress=False,
            global_batch_size=8,
            micro_batch_size=4,
            max_steps=max_steps,
            save_every=2,
            warmup_steps=0,
            min_lr_ratio=1.0,  # a constant rate: --max-steps changes a schedule's length, not this
        )
        return train_mod.run(cfg), store

    stores: dict[str, FakeObjectStore] = {}
    straight, store = run("loop", 0)
    assert straight["step"] == 8
    run("resumed", 3)
    resumed, store2 = run("resumed", 0)
    assert resumed["step"] == 8
    last = ckpt.latest_checkpoint(store, "loop")
    assert last is not None
    a = load_tensors(store.objects[f"{last}/adapter/adapter_model.safetensors"])
    b = load_tensors(store2.objects[f"{last.replace('/loop/', '/resumed/')}/adapter/adapter_model.safetensors"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("/weights/" in k or k.endswith("/model/adapter_config.json") for k in store.objects)
    lines = [json.loads(x) for x in (tmp_path / "runs" / "loop" / "metrics.jsonl").read_text().splitlines()]
    acc = [x["rewards/accuracies"] for x in lines if "rewards/accuracies" in x]
    assert acc[-1] > acc[0], acc
