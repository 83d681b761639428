"""Trainer benchmark on real shapes: this trainer's layouts against TRL's DPOTrainer, per workload.

    python -m bench.trainer            # writes bench/results/trainer.json   (make bench-trainer)
    python -m bench.trainer --quick    # the tiny model, small workloads, one step: checks the machinery

Model: localdev.testmodel "bench-qwen-vocab" (the `bench` body, hidden 512, 8 layers, with Qwen2.5-0.5B's
vocabulary: 151,936 rows, tied embeddings; ~102M parameters), float32 weights on the CPU. Token ids are
spread over the whole vocabulary, so the LM head costs what it costs in a real model.

Workloads (deterministic; the same pairs, in the same steps, for every method):
  current      prompt 32, answers 89-96 tokens (the earlier benchmark's shape)
  chat_like    prompts 50-600, answers 20-1,500 (log-normal: a long tail), chosen and rejected lengths differ
  long_prompt  prompts 1,000-3,000 (retrieval / multi-turn context), answers 50-400

Methods (services.trainer.step.train_step unless TRL):
  offline_dpo                 stored reference log-probs, the padded layout (chosen rows + rejected rows)
  offline_dpo_shared_prefix   + one sequence [prompt, chosen, rejected] per pair (prompt computed once)
  offline_dpo_packed          + padding-free packing: all optimisations on (the trainer's default)
  live_ref_dpo                all on, but a frozen copy of the policy computes the reference every step
  sft                         all on, NLL on the same chosen + rejected tokens (the cost floor)
  trl_live_ref                TRL 1.16 DPOTrainer, its default live reference
  trl_precompute              TRL with precompute_ref_log_probs=True: its training steps only
  trl_precompute_incl_pass    the same run, its reference pass counted (pro rata over the timed steps)
  *_bf16                      bf16 autocast (CPU: AVX-512 BF16), TRL's DPOConfig(bf16=True); skipped in the
                              default matrix where the measured bf16 GEMM ceiling is below float32's
  *_gc                        gradient checkpointing (non-reentrant) in both trainers: memory for compute
Each (method, workload) runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. tokens/s counts
the same logical tokens for every method (prompt + answer for each answer: a shared prompt counts twice),
so a method that computes fewer positions for the same pairs shows as faster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import cpu_name, stamp

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"
OURS = ("offline_dpo", "offline_dpo_shared_prefix", "offline_dpo_packed", "live_ref_dpo", "sft")
TRL = ("trl_live_ref", "trl_precompute")  # trl_precompute_incl_pass comes from the trl_precompute run
WORKLOADS = ("current", "chat_like", "long_prompt")
# (pairs per step) for the default run; the matrix of methods per workload keeps `make bench-trainer` bounded.
PAIRS = {"current": 8, "chat_like": 4, "long_prompt": 2}
DEFAULT_MATRIX = {
    "chat_like": OURS
    + TRL
    + ("offline_dpo_packed_bf16", "trl_precompute_bf16", "offline_dpo_packed_gc", "trl_precompute_gc"),
    "long_prompt": ("offline_dpo", "offline_dpo_shared_prefix", "offline_dpo_packed", "trl_precompute"),
    "current": ("offline_dpo", "offline_dpo_packed", "sft", "trl_precompute"),
}
TARGETS = {
    "vs_trl_precompute": 1.5,
    "mem_vs_trl_precompute": 0.5,  # at most
    "vs_trl_live_ref": 2.0,
    "shared_prefix_long_prompt": 1.4,
    "shared_prefix_chat_like": 1.05,
    "packing_chat_like": 1.3,
    "fraction_of_ceiling": 0.5,
    "ratio_vs_sft": 0.95,
}


def _lengths(workload: str, rng: random.Random, scale: float) -> tuple[int, int, int]:
    if workload == "current":
        p, c, r = 32, 96 - rng.randrange(0, 8), 96 - rng.randrange(0, 8)
    elif workload == "chat_like":
        p = min(600, max(50, int(rng.lognormvariate(math.log(180), 0.7))))
        c, r = (min(1500, max(20, int(rng.lognormvariate(math.log(200), 0.9)))) for _ in range(2))
    elif workload == "long_prompt":
        p, c, r = rng.randint(1000, 3000), rng.randint(50, 400), rng.randint(50, 400)
    else:
        raise ValueError(workload)
    return max(2, int(p * scale)), max(1, int(c * scale)), max(1, int(r * scale))


def workload_batches(workload: str, n_batches: int, pairs: int, vocab: int, scale: float = 1.0, seed: int = 0):
    """Deterministic steps of pairs; ids spread over the whole vocabulary (0-3 left to special tokens)."""
    from services.trainer.examples import Example

    rng = random.Random(f"{workload}-{seed}")
    out = []
    for b in range(n_batches):
        batch = []
        for i in range(pairs):
            p, c, r = _lengths(workload, rng, scale)
            ids = [rng.randrange(4, vocab) for _ in range(p + c + r)]
            batch.append(
                Example(f"{workload}-{b}-{i}", [1] + ids[1:p], ids[p : p + c], ids[p + c :], [-2.0] * c, [-2.0] * r)
            )
        out.append(batch)
    return out


def logical_tokens(batch) -> int:
    return sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in batch)


def padding_waste(batches, row_tokens: int = 4096) -> dict:
    """Share of computed positions that are padding: the padded layout (what TRL also does) vs packed."""
    from services.trainer.packing import Layout, make_layout_batch

    out = {}
    for name, layout in (
        ("padded", Layout(False, False)),
        ("shared_prefix", Layout(True, False)),
        ("packed", Layout(True, True, row_tokens, pack_mode="mask")),
        ("packed_segments", Layout(True, True, pack_mode="segments")),
    ):
        computed = padded = 0
        for batch in batches:
            b = make_layout_batch(batch, layout)
            computed, padded = computed + b.computed_tokens, padded + b.padded_tokens
        out[name] = 1 - computed / padded
    return out


def bf16_native(ceiling: dict) -> bool:
    """Whether bf16 matmuls beat float32 here (AVX-512 BF16 / AMX, or a GPU); without them (e.g. AVX2 only)
    torch emulates bf16 at a fraction of float32's speed (measured 21 vs 175 GFLOP/s on an AVX2 EPYC)."""
    return ceiling.get("bf16", 0.0) > ceiling.get("fp32", 0.0)


def optimizer_step(module, batch, cfg, opt, autocast, ref_module=None, objective: str = "dpo") -> dict:
    """One timed unit of the benchmarks: forward/backward (services.trainer.step.train_step), clip, AdamW."""
    import torch

    from services.trainer.step import train_step

    sums = train_step(module, batch, cfg, 0, 1, "cpu", autocast, ref_module=ref_module, objective=objective)
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sums


def variant(worker: str) -> tuple[str, bool, bool]:
    """'offline_dpo_packed_gc' -> ('offline_dpo_packed', bf16 False, gradient checkpointing True)."""
    gc = worker.endswith("_gc")
    worker = worker.removesuffix("_gc")
    return worker.removesuffix("_bf16"), worker.endswith("_bf16"), gc


# -- one (method, workload) in its own process -------------------------------------------------------------
def _ours(args, batches, model_path: str, bf16: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.config import TrainerConfig
    from services.trainer.losses import AnswerLogps
    from services.trainer.packing import model_flop_shape, step_flops

    method, _, gc = variant(args.worker)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    if gc:  # what OFFDPO_TRAINER_GRADIENT_CHECKPOINTING does in services/trainer/train.py
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = AnswerLogps(model)
    ref = None
    if method == "live_ref_dpo":
        ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        ref = AnswerLogps(ref_model.requires_grad_(False))
    share, pack = {"offline_dpo": (False, False), "offline_dpo_shared_prefix": (True, False)}.get(method, (True, True))
    # offline_dpo_packed is the trainer's default (its layout chosen per micro-batch by layout_min_saving);
    # the padded and shared-prefix methods are held to their layout.
    cfg = TrainerConfig(
        model=model_path, micro_batch_size=args.pairs, global_batch_size=args.pairs, share_prefix=share, pack=pack
    )
    if method != "offline_dpo_packed":
        cfg = dataclasses.replace(cfg, layout_min_saving=0.0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-6)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    shape = model_flop_shape(model)
    tokens, seconds, flops, computed, padded = 0, 0.0, 0.0, 0, 0
    step_s = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        sums = optimizer_step(module, batch, cfg, opt, autocast, ref, "sft" if method == "sft" else "dpo")
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            step_s.append(dt)
            seconds += dt
            tokens += int(sums["tokens"])
            flops += step_flops(shape, sums["computed"], sums["answer_tokens"], sums["attn_pairs"])
            computed, padded = computed + int(sums["computed"]), padded + int(sums["padded"])
    from services.trainer.packing import uses_varlen
    from services.trainer.step import layout_of

    layout = layout_of(cfg)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "step_seconds": step_s,
        "useful_flops": flops,
        "padding_waste": 1 - computed / padded,
        # how packed / shared-prefix rows were attended (services.trainer.packing.Layout.attention)
        "attention": ("varlen" if uses_varlen(layout, "cpu") else "mask")
        if layout.pack or layout.share_prefix
        else None,
    }


def _trl(args, batches, model_path: str, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    method, _, gc = variant(args.worker)
    precompute = method == "trl_precompute"
    pass_s: list[float] = []

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids: no re-tokenising

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)  # step i = our step i

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            pass_s.append(time.perf_counter() - t0)
            return out

    step_s: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_s.append(time.perf_counter() - self.t0)

    rows = [e for batch in batches for e in batch]
    data = Dataset.from_dict(
        {
            "prompt_ids": [e.prompt for e in rows],
            "chosen_ids": [e.chosen for e in rows],
            "rejected_ids": [e.rejected for e in rows],
        }
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    config = DPOConfig(
        output_dir=str(Path(args.tmp) / f"trl-{args.worker}-{args.workload}"),
        beta=0.1,
        learning_rate=1e-6,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        use_cpu=True,
        seed=0,
        max_length=None,
        precompute_ref_log_probs=precompute,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = BenchDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    timed = step_s[args.warmup :]
    tokens = sum(logical_tokens(b) for b in batches[args.warmup :])
    all_tokens = sum(logical_tokens(b) for b in batches)
    out = {"tokens": tokens, "seconds": sum(timed), "step_seconds": timed}
    if precompute:
        out["precompute_pass_seconds"] = sum(pass_s)
        out["precompute_pass_seconds_timed_share"] = sum(pass_s) * tokens / all_tokens
    return out


def worker(args) -> dict:
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch

    torch.manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    batches = workload_batches(args.workload, args.steps + args.warmup, args.pairs, vocab, args.scale)
    bf16 = variant(args.worker)[1]
    res = (_trl if args.worker.startswith("trl_") else _ours)(args, batches, args.model, bf16)
    res.update(
        method=args.worker,
        workload=args.workload,
        tokens_per_s=res["tokens"] / res["seconds"],
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_at_start_bytes=rss_start,
    )
    if variant(args.worker)[0] == "offline_dpo_packed":
        # The LM head's transient per micro-batch (issue 29): fused head vs the old one, on the last step's
        # answer tokens; after the peak RSS above is taken, so it does not move it.
        from bench.head import head_peaks

        conf = AutoConfig.from_pretrained(args.model)
        answers = [t for e in batches[-1] for t in (*e.chosen, *e.rejected)]
        res.update(head_peaks(answers, conf.vocab_size, conf.hidden_size, bf16=bf16))
    return res


# -- the driver ------------------------------------------------------------------------------------------
def device_name() -> str:
    return f"CPU: {cpu_name()}, {os.cpu_count()} logical cores visible"


def resolve_model(path: str | Path, size: str) -> Path:
    """A loadable model folder is used as it is; the benchmark's own model is built only under .cache/models."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.resolve().is_relative_to(MODEL_CACHE.resolve()):
        from localdev.testmodel import ensure_test_model

        return ensure_test_model(path, size=size)
    raise SystemExit(
        f"bench.trainer: {path} is not a model directory (no config.json) and not under {MODEL_CACHE}; "
        f"pass a Hugging Face model folder, or leave --model out to build the test model in the cache"
    )


def _run_one(args, model_dir: Path, method: str, workload: str, pairs: int) -> dict:
    cmd = [sys.executable, "-m", "bench.trainer", "--worker", method, "--workload", workload]
    cmd += ["--model", str(model_dir), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--pairs", str(pairs), "--scale", str(args.scale), "--tmp", args.tmp]
    env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if a and b else None


def headline(by: dict, fraction: dict) -> dict:
    def tps(w, m):
        return by.get(w, {}).get(m, {}).get("tokens_per_s")

    def mem(w, m):
        return by.get(w, {}).get(m, {}).get("peak_mem_bytes")

    h = {
        "vs_trl_precompute": _ratio(tps("chat_like", "offline_dpo_packed"), tps("chat_like", "trl_precompute")),
        "vs_trl_precompute_bf16": _ratio(
            tps("chat_like", "offline_dpo_packed_bf16"), tps("chat_like", "trl_precompute_bf16")
        ),
        "mem_vs_trl_precompute": _ratio(mem("chat_like", "offline_dpo_packed"), mem("chat_like", "trl_precompute")),
        # both with gradient checkpointing (opt-in in each trainer): memory and speed, like with like
        "mem_vs_trl_precompute_gc": _ratio(
            mem("chat_like", "offline_dpo_packed_gc"), mem("chat_like", "trl_precompute_gc")
        ),
        "vs_trl_precompute_gc": _ratio(
            tps("chat_like", "offline_dpo_packed_gc"), tps("chat_like", "trl_precompute_gc")
        ),
        "vs_trl_live_ref": _ratio(tps("chat_like", "offline_dpo_packed"), tps("chat_like", "trl_live_ref")),
        "shared_prefix_long_prompt": _ratio(
            tps("long_prompt", "offline_dpo_shared_prefix"), tps("long_prompt", "offline_dpo")
        ),
        "shared_prefix_chat_like": _ratio(
            tps("chat_like", "offline_dpo_shared_prefix"), tps("chat_like", "offline_dpo")
        ),
        "packing_chat_like": _ratio(
            tps("chat_like", "offline_dpo_packed"), tps("chat_like", "offline_dpo_shared_prefix")
        ),
        # issue 29's definition: packed vs padded, same pairs; the packed rows attended as the trainer's
        # default does on this device (Layout.attention "auto": per segment on the CPU, no 4-D mask)
        "packing_chat_like_vs_padded": _ratio(tps("chat_like", "offline_dpo_packed"), tps("chat_like", "offline_dpo")),
        "packing_chat_like_attention": by.get("chat_like", {}).get("offline_dpo_packed", {}).get("attention"),
        "fraction_of_ceiling": fraction.get("chat_like", {}).get("offline_dpo_packed"),
        "fraction_of_ceiling_bf16": fraction.get("chat_like", {}).get("offline_dpo_packed_bf16"),
        "ratio_vs_sft": _ratio(tps("chat_like", "offline_dpo_packed"), tps("chat_like", "sft")),
        # the LM head's transient bytes per micro-batch (bench.head.head_peaks), fused head / the old head
        "head_peak_bytes": by.get("chat_like", {}).get("offline_dpo_packed", {}).get("head_peak_bytes"),
        "head_peak_ratio_vs_old": _ratio(
            by.get("chat_like", {}).get("offline_dpo_packed", {}).get("head_peak_bytes"),
            by.get("chat_like", {}).get("offline_dpo_packed", {}).get("head_peak_bytes_old"),
        ),
    }
    met = {}
    for k, target in TARGETS.items():
        v = h.get(k)
        met[k] = None if v is None else (v <= target if k.startswith("mem_") else v >= target)
    h["targets_met"] = met
    return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="chat_like", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=str(REPO / ".cache" / "bench-trainer"), help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=0, help="pairs per step (default: per workload)")
    p.add_argument("--model", default=str(MODEL_CACHE / "bench-qwen-vocab"))
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--methods", default="", help="comma-separated: run these on every workload (default: a matrix)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (method, workload) process")
    p.add_argument("--quick", action="store_true", help="tiny model, workloads scaled to 1/20, one step: a test")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "trainer.json"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep what --out already holds (same machine only) and add or replace this run's methods: "
        "finishes a run cut short, or adds methods, without redoing the rest",
    )
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    size = "bench-qwen-vocab"
    if args.quick:
        args.model, size = str(MODEL_CACHE / "tiny"), "tiny"
        args.steps, args.warmup, args.scale = 1, 0, 0.05
    model_dir = resolve_model(args.model, size)
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig

    from bench.ceiling import measure
    from localdev.testmodel import SIZES

    cfg = AutoConfig.from_pretrained(model_dir)
    ceiling = measure()
    workloads = [w for w in args.workloads.split(",") if w]
    by: dict[str, dict] = {}
    fraction: dict[str, dict] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    waste: dict[str, dict] = {}
    started = stamp()  # the commit and machine, as the run began
    earlier: list[dict] = []  # the runs a --merge keeps measurements of
    earlier_workloads: dict[str, dict] = {}
    model_name = f"localdev.testmodel size={size}" if SIZES.get(size) else str(model_dir)
    if args.merge and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        for what, theirs, ours in (
            ("machine", previous.get("machine"), started["machine"]),
            ("model", previous.get("model", {}).get("name"), model_name),
        ):
            if theirs != ours:
                raise SystemExit(
                    f"--merge: {args.out} was measured with {what} {theirs!r}, this run has {ours!r}; not merged"
                )
        earlier_workloads = previous.get("workload", {})
        by, fraction, waste = (
            previous.get("by_workload", {}),
            previous.get("fraction_of_ceiling", {}),
            previous.get("padding_waste", {}),
        )
        errors, skipped = previous.get("errors", {}), previous.get("skipped", {})
        earlier = [*previous.get("merged_runs", []), {k: previous.get(k) for k in ("commit", "date", "status")}]

    def write_result(done: bool, pending: str = "") -> dict:
        """The results file, rewritten after every method so that a run cut short keeps what it measured."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in meta.parameters())  # a tied head counted once
        out = {
            **started,
            "status": "complete" if done else f"PARTIAL: the run has not finished; the last method done: {pending}",
            # --merge: earlier runs whose measurements this file keeps where this run did not redo them
            "merged_runs": earlier,
            "by_workload": by,
            "padding_waste": waste,
            "fraction_of_ceiling": fraction,
            "headline": headline(by, fraction),
            "targets": TARGETS,
            "model": {
                "name": model_name,
                "vocab_size": cfg.vocab_size,
                "tie_word_embeddings": cfg.tie_word_embeddings,
                "hidden_size": cfg.hidden_size,
                "layers": cfg.num_hidden_layers,
                "parameters": n_params,
                "dtype": "float32 weights",
            },
            "ceiling_gflops": {"fp32": ceiling["fp32"], "bf16": ceiling["bf16"]},
            "device": device_name(),
            "load_average_at_end": os.getloadavg(),
            "workload": earlier_workloads
            | {
                w: {
                    "pairs_per_step": args.pairs or PAIRS[w],
                    "timed_steps": args.steps,
                    "warmup_steps": args.warmup,
                    "scale": args.scale,
                }
                for w in workloads
            },
            "errors": errors,
            "skipped": skipped,
            "method": (
                "each (method, workload) alone in a fresh subprocess: warm-up steps, then timed optimizer steps "
                "(forward, backward, clip, AdamW); tokens_per_s = logical tokens (prompt + answer for each answer) / "
                "timed seconds; peak_mem_bytes = the process's RSS high-water mark (getrusage ru_maxrss). "
                "fraction_of_ceiling = useful FLOPs (services.trainer.packing.step_flops: 6 x body params per computed "
                "token, 6 x head params per answer token, 12 x layers x width per attended pair; a shared prompt once) "
                "per second / the fp32 GEMM ceiling (bench.ceiling). trl_precompute_incl_pass adds TRL's reference "
                "pass pro rata to the timed steps' tokens. TRL: DPOTrainer 1.16 on the same token ids (no "
                "re-tokenising), sequential sampler (step i = our step i), bf16 as the method name says."
            ),
            "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        return out

    for w in workloads:
        methods = args.methods.split(",") if args.methods else DEFAULT_MATRIX[w]
        pairs = args.pairs or PAIRS[w]
        waste[w] = padding_waste(
            workload_batches(w, args.steps + args.warmup, pairs, cfg.vocab_size, args.scale)[args.warmup :]
        )
        for m in methods:
            if variant(m)[1] and not args.methods and not bf16_native(ceiling):
                skipped[f"{w}/{m}"] = (
                    f"this CPU has no native bfloat16 GEMM (measured {ceiling['bf16']:.0f} GFLOP/s against float32's "
                    f"{ceiling['fp32']:.0f}): bf16 autocast would only be slower; name the method in --methods to run it"
                )
                print(f"{w:12s} {m:27s} skipped: {skipped[f'{w}/{m}']}", file=sys.stderr)
                continue
            res = _run_one(args, model_dir, m, w, pairs)
            errors.pop(f"{w}/{m}", None)
            skipped.pop(f"{w}/{m}", None)
            if "error" in res:
                errors[f"{w}/{m}"] = res["error"]
                print(f"{w:12s} {m:27s} FAILED\n{res['error']}", file=sys.stderr)
                continue
            entry = {"tokens_per_s": res["tokens_per_s"], "peak_mem_bytes": res["peak_rss_bytes"]}
            entry["step_seconds"] = [round(s, 2) for s in res["step_seconds"]]
            for k in ("head_peak_bytes", "head_peak_bytes_old", "head_answer_positions", "attention"):
                if k in res:
                    entry[k] = res[k]
            by.setdefault(w, {})[m] = entry
            if "useful_flops" in res:
                peak = ceiling["bf16" if m.endswith("_bf16") else "fp32"] * 1e9
                fraction.setdefault(w, {})[m] = res["useful_flops"] / res["seconds"] / (ceiling["fp32"] * 1e9)
                if m.endswith("_bf16"):
                    fraction[w][m + "_of_bf16_ceiling"] = res["useful_flops"] / res["seconds"] / peak
            if "precompute_pass_seconds" in res:
                name = m.replace("trl_precompute", "trl_precompute_incl_pass")
                secs = res["seconds"] + res["precompute_pass_seconds_timed_share"]
                by[w][name] = {
                    "tokens_per_s": res["tokens"] / secs,
                    "peak_mem_bytes": res["peak_rss_bytes"],
                    "precompute_pass_seconds": round(res["precompute_pass_seconds"], 2),
                }
            print(
                f"{w:12s} {m:27s} {res['tokens_per_s']:8.1f} tokens/s  peak RSS {res['peak_rss_bytes'] / 2**30:6.2f} GiB",
                file=sys.stderr,
            )
            write_result(False, f"{w}/{m}")
    out = write_result(True)
    print(json.dumps(out["headline"], indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
