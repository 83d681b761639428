"""Sharded state at every phase (issue 28): per-rank memory of FSDP over gloo at world sizes 1, 2, 4.

    make bench-scale                       # -> bench/results/scale.json and scale.png
    python -m bench.scale --quick          # a ~10M model, 1 step: checks the machinery

What runs: a Qwen2-shaped model of about 600M parameters (built locally with random weights, tied
embedding and LM head, as `offdpo model build` builds its models), trained by the trainer's own pieces
(services/trainer: build_sharded, train_step, AdamW, save_sharded / restore_sharded, export_model)
under FSDP2 over the gloo backend, with 1, 2 and 4 ranks on this machine's CPU (the same code at every
world size; world 1 is FSDP over one rank). The object store is a local folder. Per rank:
  load     building the model on the meta device, sharding it, reading this rank's slices of the
           safetensors folder (peak RSS, seconds)
  step     forward/backward/AdamW steps (peak RSS; exact bytes of parameters + gradients + AdamW state
           this rank holds)
  save     the sharded checkpoint: DCP shard files written and uploaded by each rank, and the model/
           export (peak RSS, seconds, bytes this rank wrote)
  restore  reading the checkpoint back into the shards (peak RSS, seconds)
Peak RSS is sampled from /proc/self/status (VmRSS) every 5 ms by a thread in each rank, the peak
reset at each phase's start (getrusage's maxrss only ever grows). Each phase's peak includes what
the process already holds (Python, torch, transformers: `baseline_rss`).

LoRA (`lora_*`, world 1 only): the same model, steps and batch with `--lora-r` adapters (peft, the
attention and MLP projections; services/trainer/lora.py): the fraction of parameters that train, and
the step's peak RSS and parameters + gradients + AdamW bytes against full fine-tuning's at world 1.

`reshard_resume_max_abs_diff`: a smaller model (the `bench` size, ~24M parameters, so 4 ranks on 2
cores finish in minutes) trained 4 steps by one process, vs 2 steps on 4 FSDP ranks, a sharded
checkpoint, and 2 more steps on 2 FSDP ranks; the exported weights compared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.machine import stamp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GIB = 1 << 30


# -- the model -------------------------------------------------------------------------------------
def build_model(out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> Path:
    """A Qwen2-shaped model with random weights (seed 0) and the test tokenizer; kept once built."""
    from localdev import testmodel

    marker = out / "offdpo_model.json"
    spec = {"hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads, "kv": kv_heads}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return out
    import torch
    from transformers import Qwen2ForCausalLM

    size = testmodel.ModelSize(hidden, intermediate, layers, heads, kv_heads, 4096, 4096)
    tokenizer = testmodel.build_tokenizer(size.vocab_size)
    config = testmodel._config(size, tokenizer)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps({"builder": "bench.scale", "spec": spec}) + "\n")
    return out


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shape = h.get_slice(k).get_shape()
                c = 1
                for d in shape:
                    c *= d
                n += c
    return n


# -- per-rank measurement ---------------------------------------------------------------------------
def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def release_free_heap() -> None:
    """Hand glibc's freed-but-kept heap back to the system (malloc_trim), so a phase's peak is what that
    phase holds and allocates, not what an earlier phase freed (the step's activations and gradients)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """A thread sampling VmRSS; `phase()` resets the peak and returns it at the phase's end."""

    def __init__(self, interval_s: float = 0.005):
        self.peak = rss_bytes()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    @contextlib.contextmanager
    def phase(self, into: dict[str, Any], name: str):
        release_free_heap()
        self.peak = rss_bytes()
        t0 = time.perf_counter()
        yield
        into[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        into[f"{name}_peak_rss"] = max(self.peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class DirStore:
    """The object-store methods checkpoints use, over a folder every rank sees."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)

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


def examples(step: int, pairs: int, prompt: int, answer: int):
    from services.trainer.examples import Example

    def ids(base: int, n: int) -> list[int]:
        return [(base + 37 * j) % 2600 + 100 for j in range(n)]

    return [
        Example(
            f"s{step}p{i}",
            [1] + ids(step * 101 + i, prompt - 1),
            ids(step * 7 + i + 1000, answer),
            ids(step * 13 + i + 2000, answer),
            [-2.0] * answer,
            [-2.5] * answer,
        )
        for i in range(pairs)
    ]


def local_bytes(t: Any) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(policy: Any) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients (before zero_grad) and AdamW state."""
    params = sum(local_bytes(p) for p in policy.module.parameters())
    grads = sum(local_bytes(p.grad) for p in policy.module.parameters())
    optim = sum(local_bytes(v) for st in policy.optimizer.state.values() for v in st.values() if hasattr(v, "numel"))
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim}


def make_cfg(model_dir: str, run: str, **kw: Any):
    from services.trainer.config import TrainerConfig

    base = dict(
        model=model_dir,
        run_name=run,
        distributed="fsdp",
        lr=1e-3,
        warmup_steps=1,
        global_batch_size=4,
        micro_batch_size=1,
        checkpoint_format="sharded",
    )
    return TrainerConfig(**{**base, **kw})


def make_policy(cfg: Any, node: Any, total_steps: int, weights: str | None):
    import torch

    from services.trainer import checkpoint as ckpt
    from services.trainer import lora
    from services.trainer.distributed import build_sharded
    from services.trainer.schedule import lr_schedule

    model, module = build_sharded(cfg.model, cfg, node.device, weights)
    optimizer = torch.optim.AdamW(lora.trainable(module), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return ckpt.Policy(model, module, optimizer, scheduler)


def one_step(policy: Any, cfg: Any, node: Any, batch: list, measure: dict | None = None) -> float:
    import torch

    from services.trainer.step import train_step

    sums = train_step(policy.module, batch, cfg, node.rank, node.world, node.device, contextlib.nullcontext)
    torch.nn.utils.clip_grad_norm_(policy.module.parameters(), cfg.max_grad_norm)
    policy.optimizer.step()
    policy.scheduler.step()
    if measure is not None:
        measure.update(state_bytes(policy))
    policy.optimizer.zero_grad(set_to_none=True)
    return sums["loss"] / len(batch)


# -- the ranks ----------------------------------------------------------------------------------------
def scale_rank(node: Any, args: dict) -> dict:
    """One rank of the scale run: load, steps, save, restore; what it measured."""
    import torch

    from services.trainer import checkpoint as ckpt

    meter = PeakRSS()
    out: dict[str, Any] = {"rank": node.rank, "baseline_rss": rss_bytes()}
    store = DirStore(args["bucket"])
    cfg = make_cfg(args["model"], f"scale-w{node.world}", checkpoint_file_bytes=256 << 20, export_shard_bytes=64 << 20)
    with meter.phase(out, "load"):
        policy = make_policy(cfg, node, args["steps"] + 1, args["model"])
    losses = []
    with meter.phase(out, "step"):
        state: dict[str, int] = {}
        for step in range(args["steps"]):
            batch = examples(step, 4, args["prompt"], args["answer"])
            losses.append(one_step(policy, cfg, node, batch, state))
    out["state_bytes"] = state
    out["losses"] = losses
    extra = {"data": {}, "fingerprint": "bench", "world_size": node.world} if node.is_main else None
    with meter.phase(out, "save"):
        written = ckpt.save_sharded(store, cfg, node, args["steps"], policy, None, extra)
        node.barrier()  # rank 0 writes `latest` after the shards; the trainer waits here too
    out["bytes_written"] = written["bytes"]
    out["files_written"] = written["files"]
    prefix = ckpt.latest_checkpoint(store, cfg.run_name)
    assert prefix is not None
    with meter.phase(out, "restore"):
        ckpt.restore_sharded(store, prefix, policy)
    torch.distributed.barrier()
    meter.close()
    return out


def lora_rank(node: Any, args: dict) -> dict:
    """The scale run's load and steps with LoRA adapters (--lora-r): peak RSS, state bytes, trainable share."""
    from services.trainer import lora

    meter = PeakRSS()
    out: dict[str, Any] = {"rank": node.rank, "baseline_rss": rss_bytes()}
    cfg = make_cfg(args["model"], f"lora-w{node.world}", lora_r=args["lora_r"], lora_alpha=2.0 * args["lora_r"])
    with meter.phase(out, "load"):
        policy = make_policy(cfg, node, args["steps"] + 1, args["model"])
    out["trainable_fraction"] = lora.trainable_fraction(policy.module)
    out["trainable_params"] = sum(p.numel() for p in lora.trainable(policy.module))
    losses = []
    with meter.phase(out, "step"):
        state: dict[str, int] = {}
        for step in range(args["steps"]):
            losses.append(one_step(policy, cfg, node, examples(step, 4, args["prompt"], args["answer"]), state))
    out["state_bytes"] = state
    out["losses"] = losses
    meter.close()
    return out


def reshard_rank(node: Any, args: dict) -> dict:
    """Steps first+1..last of run `run`, resuming its sharded checkpoint when first > 0, then a checkpoint."""
    from services.trainer import checkpoint as ckpt

    store = DirStore(args["bucket"])
    cfg = make_cfg(args["model"], args["run"], lr=args["lr"])
    first, last = args["first"], args["last"]
    prefix = ckpt.latest_checkpoint(store, cfg.run_name) if first else None
    policy = make_policy(cfg, node, 4, None if prefix else args["model"])
    if prefix:
        assert ckpt.restore_sharded(store, prefix, policy) == first
    for step in range(first, last):
        one_step(policy, cfg, node, examples(step, 4, 8, 8))
    extra = {"data": {}, "fingerprint": "bench", "world_size": node.world} if node.is_main else None
    ckpt.save_sharded(store, cfg, node, last, policy, None, extra)
    node.barrier()
    return {}


def _rank_main(rank: int, world: int, port: int, fn_name: str, args: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from services.trainer.distributed import Node

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        result = globals()[fn_name](Node(rank, world, torch.device("cpu")), args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn_name: str, args: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, port, fn_name, args, out), nprocs=world, start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def straight_weights(model_dir: str, bucket: str, lr: float):
    """One process, no FSDP, 4 steps: the trainer's plain path (what test_subprocess compares with)."""
    import torch

    from services.trainer.distributed import Node
    from services.trainer.messages import Plan
    from services.trainer.train import build_policy

    node = Node(0, 1, torch.device("cpu"))
    cfg = make_cfg(model_dir, "straight", distributed="ddp", checkpoint_format="full", lr=lr)
    torch.manual_seed(0)
    policy = build_policy(cfg, node, DirStore(bucket), Plan(4, "bench", None))
    for step in range(4):
        one_step(policy, cfg, node, examples(step, 4, 8, 8))
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def exported_weights(bucket: str, run: str):
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer import checkpoint as ckpt

    store = DirStore(bucket)
    prefix = ckpt.latest_checkpoint(store, run)
    assert prefix is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.download_model(store, prefix, Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reshard_diff(model_dir: str, work: Path, lr: float) -> dict[str, float]:
    """4 ranks x 2 steps -> sharded checkpoint -> 2 ranks x 2 steps, vs one process x 4 steps; and, as
    the noise floor of float32 sums in another order, 4 ranks x 4 steps uninterrupted vs the same."""
    bucket = str(work / f"reshard-bucket-{lr}")
    common = {"bucket": bucket, "model": model_dir, "lr": lr}
    spawn(4, "reshard_rank", {**common, "run": "reshard", "first": 0, "last": 2})
    spawn(2, "reshard_rank", {**common, "run": "reshard", "first": 2, "last": 4})
    spawn(4, "reshard_rank", {**common, "run": "fsdp4", "first": 0, "last": 4})
    want = straight_weights(model_dir, bucket, lr)
    initial = exported_weights_from(model_dir)

    def worst(got: dict) -> float:
        assert got.keys() == want.keys()
        return max(float((got[k] - want[k]).abs().max()) for k in got)

    return {
        "lr": lr,
        "resharded_vs_one_process": worst(exported_weights(bucket, "reshard")),
        "uninterrupted_4_ranks_vs_one_process": worst(exported_weights(bucket, "fsdp4")),
        "max_weight_change": max(float((want[k] - initial[k]).abs().max()) for k in want),
    }


def exported_weights_from(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the results -------------------------------------------------------------------------------------
def planner_estimate(model_dir: str, by_world: dict[str, Any]) -> tuple[float | None, str, list[dict]]:
    """The memory planner's per-rank state bytes (offdpo/memplan.py) vs every rank's measured ones."""
    from offdpo.errors import ConfigError

    try:
        from offdpo import memplan
    except ImportError:
        return None, "no planner module (offdpo/memplan.py) yet", []
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        rows = []
        for w, run in by_world.items():
            for r in run["ranks"]:
                st = r["state_bytes"]
                measured = memplan.StateBytes(st["params"], st["grads"], st["optimizer"])
                cmp = memplan.measured_vs_planned(config, measured, world=int(w), strategy="fsdp", precision="fp32")
                rows.append(
                    {"world": int(w), "rank": r["rank"], "measured": measured.total, "planned": cmp.planned.state}
                    | {"rel_error": round(cmp.rel_error, 5)}
                )
    except (AttributeError, TypeError, KeyError, ValueError, ConfigError) as exc:  # say why, do not fail
        return None, f"offdpo.memplan did not answer: {type(exc).__name__}: {exc}", []
    note = "memplan.measured_vs_planned (FSDP, float32) against each rank's parameters + gradients + AdamW bytes"
    return max(row["rel_error"] for row in rows), note, rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [int(w) for w in result["by_world"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    phases = ["load_peak_rss", "step_peak_rss", "save_peak_rss"]
    for i, phase in enumerate(phases):
        values = [max(r[phase] for r in result["by_world"][str(w)]["ranks"]) / GIB for w in worlds]
        ax.bar([x + i * width for x in range(len(worlds))], values, width, label=phase.replace("_", " "))
    state = [max(r["state_bytes"]["total"] for r in result["by_world"][str(w)]["ranks"]) / GIB for w in worlds]
    ax.bar([x + 3 * width for x in range(len(worlds))], state, width, label="params+grads+AdamW (exact)")
    ax.set_xticks([x + 1.5 * width for x in range(len(worlds))], [f"world {w}" for w in worlds])
    ax.set_ylabel("GiB per rank (largest rank)")
    ax.set_title(f"FSDP over gloo, {result['model']['parameters'] / 1e6:.0f}M parameters, float32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~10M model, 1 step, no reshard run")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the world-1 LoRA run (0: skip it)")
    p.add_argument("--out", default=str(RESULTS / "scale.json"))
    p.add_argument("--models", default=str(REPO / "models"), help="where the bench models are built (kept)")
    args = p.parse_args(argv)
    started = stamp()
    worlds = [int(w) for w in args.worlds.split(",")]
    shape = (
        dict(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2)
        if args.quick
        else (dict(hidden=1536, intermediate=4096, layers=24, heads=24, kv_heads=4))
    )
    name = "scale-quick" if args.quick else "scale-600m"
    model_dir = build_model(Path(args.models) / name, **shape)
    params = parameter_count(model_dir)
    steps = 1 if args.quick else args.steps
    by_world: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("OFFDPO_BENCH_TMP")) as work:
        diff, reshard = None, []
        if not args.quick:  # first: the small model's minutes, before the long runs
            from localdev.testmodel import ensure_test_model

            small = ensure_test_model(Path(args.models) / "bench", size="bench")
            # AdamW lr 1e-4 (the trainer's default is 1e-6): Adam's update m/sqrt(v) turns float32
            # summation-order differences in near-zero gradients into weight differences that grow
            # with the learning rate (the noise floor below measures them without a checkpoint).
            reshard = [reshard_diff(str(small), Path(work), lr) for lr in (1e-4,)]
            diff = reshard[0]["resharded_vs_one_process"]
            print(f"reshard 4 -> 2 ranks: {json.dumps(reshard)}", flush=True)
        for w in worlds:
            bucket = Path(work) / f"bucket-w{w}"
            t0 = time.perf_counter()
            ranks = spawn(
                w,
                "scale_rank",
                {"bucket": str(bucket), "model": str(model_dir), "steps": steps, "prompt": 32, "answer": 32},
            )
            by_world[str(w)] = {"ranks": ranks, "wall_s": round(time.perf_counter() - t0, 1)}
            print(
                f"world {w}: "
                + json.dumps(
                    {
                        k: [r[k] for r in ranks]
                        for k in ("load_peak_rss", "step_peak_rss", "save_peak_rss", "bytes_written")
                    }
                ),
                flush=True,
            )
            import shutil

            shutil.rmtree(bucket, ignore_errors=True)
        lora_run: dict[str, Any] | None = None
        if args.lora_r and 1 in worlds:
            args_lora = {"model": str(model_dir), "steps": steps, "prompt": 32, "answer": 32, "lora_r": args.lora_r}
            lora_run = spawn(1, "lora_rank", args_lora)[0]
            print(
                f"LoRA r={args.lora_r}, world 1: "
                + json.dumps({k: lora_run[k] for k in ("step_peak_rss", "trainable_fraction")}),
                flush=True,
            )

    def worst(w: int, key: str) -> float:
        return max(r[key] for r in by_world[str(w)]["ranks"])

    def ratio(key: str) -> float | None:
        if "1" not in by_world or "4" not in by_world:
            return None
        return round(worst(4, key) / worst(1, key), 4)

    def state_ratio() -> float | None:
        if "1" not in by_world or "4" not in by_world:
            return None
        s4 = max(r["state_bytes"]["total"] for r in by_world["4"]["ranks"])
        s1 = max(r["state_bytes"]["total"] for r in by_world["1"]["ranks"])
        return round(s4 / s1, 4)

    def lora_vs_full(key: str) -> float | None:
        if lora_run is None:
            return None
        full = by_world["1"]["ranks"][0]
        value = lora_run["state_bytes"]["total"] if key == "state" else lora_run[key]
        return round(value / (full["state_bytes"]["total"] if key == "state" else full[key]), 4)

    planner, planner_note, planner_rows = planner_estimate(str(model_dir), by_world)
    headline = {
        "load_peak_ratio_w4": ratio("load_peak_rss"),
        "step_state_ratio_w4": state_ratio(),
        "save_peak_ratio_w4": ratio("save_peak_rss"),
        "reshard_resume_max_abs_diff": diff,
        "planner_max_rel_error": planner,
        "lora_trainable_fraction": round(lora_run["trainable_fraction"], 6) if lora_run else None,
        "lora_step_peak_rss_vs_full_w1": lora_vs_full("step_peak_rss"),
    }
    targets = {
        "load_peak_ratio_w4": 0.4,
        "step_state_ratio_w4": 0.3,
        "save_peak_ratio_w4": 0.4,
        "reshard_resume_max_abs_diff": 1e-5,
        "planner_max_rel_error": 0.15,
    }
    result = {
        **started,
        "command": "python -m bench.scale" + (" --quick" if args.quick else ""),
        "headline": headline,
        "targets": targets,
        "met": {k: (v is not None and v <= targets[k]) for k, v in headline.items() if k in targets},
        "notes": {
            "planner_max_rel_error": planner_note,
            "ratios": "largest rank's figure at world 4 over world 1's; peaks are VmRSS sampled every 5 ms (file "
            "pages of the mmap'd safetensors a rank reads included) and include the process's baseline (Python, "
            "torch: baseline_rss); glibc's freed heap is handed back (malloc_trim) at each phase's start",
            "step_state_ratio_w4": "exact bytes of parameters + gradients + AdamW state a rank holds after a step",
            "lora": "world 1, the same model, steps and batch, LoRA adapters (peft, r = `lora.r`, alpha 2r) on the "
            "attention and MLP projections; the float32 base stays in memory (frozen: no gradient, no AdamW state). "
            "lora_trainable_fraction: adapter parameters / all; lora_step_peak_rss_vs_full_w1: the step's peak RSS "
            "(baseline included) over full fine-tuning's; `lora.state_vs_full_w1`: parameters + gradients + AdamW "
            "bytes over full fine-tuning's. Reported, no target in the issue",
            "reshard_resume_max_abs_diff": "the `bench` test model (~24M parameters), not the big one: 4 FSDP "
            "ranks x 2 steps -> sharded checkpoint -> 2 FSDP ranks x 2 steps, vs one process x 4 steps, AdamW lr "
            "1e-4; exported model/ weights, max |difference|. `reshard` also has the weights' largest change over "
            "the run (the comparison's power) and the noise floor: 4 ranks uninterrupted vs one process "
            "(float32 sums in another order, amplified by Adam's normalisation)",
        },
        "model": {
            "path": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
            "parameters": params,
            **shape,
            "vocab": 4096,
            "tied_embeddings": True,
            "dtype": "float32",
        },
        "workload": {
            "steps": steps,
            "pairs_per_step": 4,
            "prompt_tokens": 32,
            "answer_tokens": 32,
            "micro_batch": 1,
            "checkpoint_file_bytes": 256 << 20,
            "export_shard_bytes": 64 << 20,
            "store": "a local folder (DirStore)",
        },
        "reshard": reshard,
        "lora": None
        if lora_run is None
        else {"r": args.lora_r, "alpha": 2.0 * args.lora_r, "state_vs_full_w1": lora_vs_full("state"), **lora_run},
        "planner": planner_rows,
        "by_world": by_world,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"headline": headline, "met": result["met"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
