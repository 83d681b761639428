"""Sharded checkpoints (issue 28): every rank writes and reads only its own shard of weights and AdamW
state (torch.distributed.checkpoint, safetensors files), a resume at another world size continues
where an uninterrupted run goes, an older one-process checkpoint still resumes, and the exported
model/ folder loads in transformers.

The multi-rank tests run real gloo process groups (spawned processes on the CPU) over a store kept in
a directory that every process sees; they are marked integration (several processes, ~10-40 s each).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.trainer import checkpoint as ckpt
from services.trainer import distributed
from services.trainer.config import TrainerConfig
from services.trainer.distributed import Node
from services.trainer.examples import Example
from services.trainer.messages import Plan
from services.trainer.step import train_step
from services.trainer.train import build_policy
from tests.fakes import FakeObjectStore

TOTAL_STEPS = 4


class DirStore:
    """The object-store methods checkpoints use, over a directory: every spawned rank sees the same
    objects, as every pod sees the same bucket."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # an object appears whole, as in S3

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        return (self.root / key).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)).startswith(prefix)
        )


def examples(step: int) -> list[Example]:
    """Global batch of 4 pairs for `step` (different pairs every step)."""
    return [
        Example(
            f"s{step}p{i}",
            [1, 500 + 7 * step + i],
            [100 + i, 101 + step],
            [300 + i, 301 + step],
            [-2.0, -2.1],
            [-2.5, -2.4],
        )
        for i in range(4)
    ]


def config(model: str | Path, run: str, **kw: Any) -> TrainerConfig:
    # save_dtype float32: the exported model/ is compared with the trained weights exactly.
    base = dict(
        model=str(model),
        run_name=run,
        lr=1e-3,
        warmup_steps=1,
        micro_batch_size=2,
        global_batch_size=4,
        save_dtype="float32",
    )
    return TrainerConfig(**{**base, **kw})


def train(policy: ckpt.Policy, cfg: TrainerConfig, node: Node, first: int, last: int) -> None:
    """Optimizer steps first+1 .. last on this rank's slice of each global batch."""
    for step in range(first, last):
        train_step(policy.module, examples(step), cfg, node.rank, node.world, node.device, contextlib.nullcontext)
        torch.nn.utils.clip_grad_norm_(policy.module.parameters(), cfg.max_grad_norm)
        policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)


def session(store: Any, cfg: TrainerConfig, node: Node, first: int, last: int, resume: bool) -> None:
    """One run of the trainer's own pieces: build (resuming from `latest` if asked), train, checkpoint."""
    prefix = ckpt.latest_checkpoint(store, cfg.run_name) if resume else None
    policy = build_policy(cfg, node, store, Plan(TOTAL_STEPS, "fp", prefix))
    step = ckpt.restore(store, prefix, cfg, node, policy) if prefix else 0
    assert step == first, (step, first)
    train(policy, cfg, node, first, last)
    extra = {"data": {"index": last}, "fingerprint": "fp", "world_size": node.world} if node.is_main else None
    ckpt.save(store, cfg, node, last, policy, None, extra)
    node.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        fn(Node(rank, world, torch.device("cpu")), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Any, *args: Any) -> None:
    """`fn(node, *args)` on `world` gloo ranks (spawned processes); raises if any rank fails."""
    mp.start_processes(_rank_main, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn")


def run_session(node: Node, root: str, cfg: TrainerConfig, first: int, last: int, resume: bool) -> None:
    session(DirStore(root), cfg, node, first, last, resume)


def exported(store: Any, run: str) -> dict[str, torch.Tensor]:
    """The weights of the latest checkpoint's model/ folder, through transformers."""
    from transformers import AutoModelForCausalLM

    prefix = ckpt.latest_checkpoint(store, run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, prefix, Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"max abs difference {worst} > {atol}"


# -- fast tier: one process --------------------------------------------------------------------------
NODE = Node(0, 1, torch.device("cpu"))


def test_sharded_layout_round_trip_in_one_process(tiny_model):
    """The sharded layout written by one process (DCP without a process group) restores weights,
    AdamW moments and step counts exactly, and the next steps match the straight run's."""
    store = FakeObjectStore()
    cfg = config(tiny_model, "one", checkpoint_format="sharded", checkpoint_file_bytes=64 << 10)
    torch.manual_seed(0)
    policy = build_policy(cfg, NODE, store, Plan(TOTAL_STEPS, "fp", None))
    train(policy, cfg, NODE, 0, 2)
    ckpt.save(store, cfg, NODE, 2, policy, None, {"data": {"index": 2}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "one")
    assert prefix == "runs/one/checkpoints/step-00000002"
    state = ckpt.read_state(store, prefix)
    assert state["checkpoint_format"] == "sharded" and state["data"] == {"index": 2}
    shards = [k for k in store.objects if k.startswith(f"{prefix}/dcp/")]
    assert len(shards) > 1, "64 KiB per file: the state is split over several files"
    assert not any(k.endswith("optimizer.safetensors") for k in store.objects)
    # `latest` is the last object written
    assert [k for op, k in store.calls if op == "put"][-1] == "runs/one/latest"

    resumed = build_policy(cfg, NODE, store, Plan(TOTAL_STEPS, "fp", prefix))
    assert ckpt.restore(store, prefix, cfg, NODE, resumed) == 2
    for (name, a), b in zip(policy.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    sa, sb = policy.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert resumed.scheduler.state_dict() == policy.scheduler.state_dict()
    train(policy, cfg, NODE, 2, 4)
    train(resumed, cfg, NODE, 2, 4)
    for (name, a), b in zip(policy.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0), name
    # The exported folder is what transformers loads, tied head included.
    ckpt.save(store, cfg, NODE, 4, resumed, None, {"data": {"index": 4}, "fingerprint": "fp"})
    got = exported(store, "one")
    assert_close(got, {k: v.detach() for k, v in resumed.model.state_dict().items()}, 0.0)


def test_sharded_checkpoint_refuses_unsafe_shard_names(tiny_model):
    """A shard index naming a file outside the checkpoint's dcp/ folder is refused before any read."""
    store = FakeObjectStore()
    cfg = config(tiny_model, "evil", checkpoint_format="sharded")
    policy = build_policy(cfg, NODE, store, Plan(TOTAL_STEPS, "fp", None))
    ckpt.save(store, cfg, NODE, 1, policy, None, {"data": {}, "fingerprint": "fp"})
    prefix = ckpt.latest_checkpoint(store, "evil")
    assert prefix is not None
    index = json.loads(store.objects[f"{prefix}/dcp/index.json"])
    index[0]["file"] = "../../../other-run/x.safetensors"
    store.objects[f"{prefix}/dcp/index.json"] = json.dumps(index).encode()
    with pytest.raises(ckpt.UnsafeCheckpoint):
        ckpt.restore(store, prefix, cfg, NODE, policy)


# -- several gloo ranks --------------------------------------------------------------------------------
@pytest.mark.integration
def test_fsdp_resumes_at_another_world_size_and_from_a_one_process_checkpoint(tiny_model, tmp_path):
    """Straight: one process, 4 steps. Resharded: 2 FSDP ranks, 2 steps, sharded checkpoint (each rank
    its own shard file), then 1 process resumes it for the last 2. Old layout: one process writes a
    full checkpoint after 2 steps, 2 FSDP ranks resume it. All three end at the same weights; the
    FSDP export (several files + index) loads in transformers and gives the straight run's logits."""
    root = str(tmp_path / "bucket")
    store = DirStore(root)
    run_session(NODE, root, config(tiny_model, "straight"), 0, 4, False)
    straight = exported(store, "straight")

    # gradient checkpointing (enabled on the meta model before sharding) recomputes the same numbers
    fsdp = config(tiny_model, "reshard", distributed="fsdp", export_shard_bytes=256 << 10, gradient_checkpointing=True)
    spawn(2, run_session, root, fsdp, 0, 2, False)
    prefix = ckpt.latest_checkpoint(store, "reshard")
    shards = [k for k in store.list_keys(f"{prefix}/dcp/") if k.endswith(".safetensors")]
    assert store.exists(f"{prefix}/dcp/index.json")
    assert {Path(k).name.split("-")[1] for k in shards} == {"00001", "00002"}, shards  # one set per rank
    assert ckpt.read_state(store, prefix)["world_size"] == 2
    assert store.exists(f"{prefix}/model/model.safetensors.index.json")
    run_session(NODE, root, config(tiny_model, "reshard", distributed="fsdp"), 2, 4, True)
    assert_close(exported(store, "reshard"), straight, 1e-5)

    old = config(tiny_model, "old")  # the full layout, as every checkpoint before issue 28
    run_session(NODE, root, old, 0, 2, False)
    assert ckpt.read_state(store, ckpt.latest_checkpoint(store, "old")).get("checkpoint_format") is None
    spawn(2, run_session, root, config(tiny_model, "old", distributed="fsdp"), 2, 4, True)
    from_old = exported(store, "old")
    assert_close(from_old, straight, 1e-5)

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, ckpt.latest_checkpoint(store, "old"), Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        ref.load_state_dict(straight)
        ids = torch.tensor([[1, 500, 501, 100, 101, 300]])
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
        assert float(diff) <= 1e-4


def grow(node: Node, root: str, cfg: TrainerConfig, out: str) -> None:
    """4 ranks resume a 2-rank checkpoint and write their weights' full copy (rank 0) to `out`."""
    session(DirStore(root), cfg, node, 2, 4, True)


@pytest.mark.integration
def test_fsdp_two_ranks_to_four(tiny_model, tmp_path):
    root = str(tmp_path / "bucket")
    store = DirStore(root)
    run_session(NODE, root, config(tiny_model, "straight"), 0, 4, False)
    spawn(2, run_session, root, config(tiny_model, "grow", distributed="fsdp"), 0, 2, False)
    spawn(4, run_session, root, config(tiny_model, "grow", distributed="fsdp"), 2, 4, True)
    assert ckpt.read_state(store, ckpt.latest_checkpoint(store, "grow"))["world_size"] == 4
    assert_close(exported(store, "grow"), exported(store, "straight"), 1e-5)


def _sharded_load_matches(node: Node, model_dir: str, out: str) -> None:
    """Each rank builds the model on meta, shards it and reads its slices; the gathered weights equal
    the folder's, and the tied embedding and LM head are one parameter."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    cfg = config(model_dir, "load", distributed="fsdp")
    model, module = distributed.build_sharded(model_dir, cfg, node.device, model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = load_file(str(Path(model_dir) / "model.safetensors"))
    worst = 0.0
    for k, v in model.state_dict().items():
        local = v.to_local() if isinstance(v, DTensor) else v
        full = v.full_tensor() if isinstance(v, DTensor) else v
        key = "model.embed_tokens.weight" if k == "lm_head.weight" else k
        worst = max(worst, float((full - want[key]).abs().max()))
        if isinstance(v, DTensor) and v.shape[0] >= node.world:
            assert local.shape[0] < v.shape[0], f"{k}: rank {node.rank} holds the whole tensor"
    inv = model.model.rotary_emb.inv_freq
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(inv, ref.model.rotary_emb.inv_freq), "rotary buffers recomputed after to_empty"
    if node.is_main:
        Path(out).write_text(json.dumps({"worst": worst}))


@pytest.mark.integration
def test_sharded_load_reads_each_ranks_slices(tiny_model, tmp_path):
    out = tmp_path / "out.json"
    spawn(2, _sharded_load_matches, str(tiny_model), str(out))
    assert json.loads(out.read_text())["worst"] == 0.0


def _losses(node: Node, model_dir: str, mp_setting: str, out: str) -> None:
    """5 FSDP steps on the same pairs; rank 0 writes the global losses and the final dtype of the weights."""
    cfg = config(model_dir, "mp", distributed="fsdp", fsdp_mixed_precision=mp_setting, lr=1e-2)
    policy = build_policy(cfg, node, FakeObjectStore(), Plan(5, "fp", None))
    losses = []
    for step in range(5):
        sums = train_step(
            policy.module, examples(step), cfg, node.rank, node.world, node.device, contextlib.nullcontext
        )
        losses.append(sums["loss"] / 4)
        policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)
    dtypes = sorted({str(p.dtype) for p in policy.module.parameters()})
    if node.is_main:
        Path(out).write_text(json.dumps({"losses": losses, "dtypes": dtypes}))


@pytest.mark.integration
def test_fsdp_bfloat16_mixed_precision_tracks_float32(tiny_model, tmp_path):
    """FSDP2's MixedPrecisionPolicy on the CPU over gloo: bfloat16 parameters and compute, float32
    gradient reduction and float32 sharded master weights. 5 steps on the same pairs follow float32's
    losses within 0.02 (bfloat16 has 8 bits of mantissa: ~0.4% relative per operation) and differ
    from them at all (the policy is really applied)."""
    got = {}
    for setting in ("on", "off"):
        out = tmp_path / f"{setting}.json"
        spawn(2, _losses, str(tiny_model), setting, str(out))
        got[setting] = json.loads(out.read_text())
    assert got["on"]["dtypes"] == got["off"]["dtypes"] == ["torch.float32"], "master weights stay float32"
    diffs = [abs(a - b) for a, b in zip(got["on"]["losses"], got["off"]["losses"])]
    assert max(diffs) <= 0.02, (diffs, got)
    assert max(diffs) > 0, "bfloat16 compute must change the losses a little"
    assert got["off"]["losses"][-1] < got["off"]["losses"][0], "the steps train"
