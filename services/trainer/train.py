"""Offline DPO training: only the policy in memory; the reference log-probs come with the data.

One CPU process (replay 2 epochs of everything refscore wrote for a fingerprint):
    python -m services.trainer --model models/tiny --run-name demo --prefix scores/<fingerprint_id>/ --epochs 2

Continuous (follow the shard-ready topic; stop after 60 s without new shards):
    python -m services.trainer --model models/tiny --run-name live --mode continuous --stop-when-idle-s 60

N GPUs (or N CPU processes with gloo) on one machine, same flags:
    torchrun --nproc_per_node=N -m services.trainer --model ... --run-name ... [--distributed fsdp]

Several nodes (run on each node; node 0's address as the rendezvous endpoint):
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=<node0>:29500 \
             --rdzv-id=<run_name> -m services.trainer --model ... --run-name ...

Every flag is also an environment variable (OFFDPO_TRAINER_*; see config.py). Rerunning the same
command resumes from runs/<run_name>/latest in S3: weights, optimizer, scheduler, RNG and the data
position, so each pair is trained exactly once per epoch. SIGTERM or SIGINT (a preempted pod, Ctrl-C):
the current step finishes, a checkpoint is saved (continuous mode: and the offsets it covers are
committed), and the process exits 143 or 130 so a Job does not count it as done; a second signal kills.

The loop, top to bottom: set up (distributed, model, optimizer, data source, resume), then per step
take one global batch on rank 0, broadcast it, each rank trains its contiguous slice with gradient
accumulation, all-reduce (DDP/FSDP), clip, AdamW step, log; checkpoint every --save-every steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from offdpo.config import KafkaConfig, S3Config
from offdpo.s3 import ObjectStore, safe_key_part
from offdpo.shutdown import StopOnSignals
from services.trainer import checkpoint as ckpt
from services.trainer.config import LOSS_TYPES, TrainerConfig
from services.trainer.data import DataError, ReplaySource, StreamSource
from services.trainer.losses import AnswerLogps, answer_logps, make_batch, preference_loss, sft_loss

log = logging.getLogger("offdpo.trainer")


def commit_offsets(source, attempts: int = 5) -> None:
    """Commit the stream positions a written checkpoint covers, retrying with backoff.

    A commit fails while the broker is down or the group rebalances after an outage. The checkpoint
    already holds the trained pair ids, so a commit that still fails is deferred to the next
    checkpoint: events redelivered after a restart are filtered, never trained twice."""
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from offdpo.kafka import GROUP_CHANGED

    offsets = {
        TopicPartition(source.topic, p): OffsetAndMetadata(o, "", -1) for p, o in source.commit_offsets().items()
    }
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            source.consumer.commit(offsets)
            return
        except GROUP_CHANGED as exc:
            # Only the next poll() completes a rebalance: sleeping here would hold it up.
            log.warning(
                "offset commit refused by a group rebalance (%s); deferred to the next checkpoint", type(exc).__name__
            )
            return
        except KafkaError as exc:
            if attempt == attempts:
                log.warning("offset commit failed %d times (%s); deferred to the next checkpoint", attempts, exc)
                return
            log.warning("offset commit failed (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[TrainerConfig, argparse.Namespace]:
    base = TrainerConfig.from_env()
    p = argparse.ArgumentParser(
        prog="python -m services.trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(TrainerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        help_ = f"{f.metadata['help']} [{f.metadata['env']}={default!r}]"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, dest=f.name, action="append", default=None, help=help_ + " (repeatable)")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=default, help=help_)
    # Fault injection for the crash/resume test: SIGKILL ourselves right after this optimizer step.
    p.add_argument("--fault-kill-after-step", type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainerConfig)}
    values["allow_fingerprint"] = tuple(values["allow_fingerprint"] or base.allow_fingerprint)
    return validate(TrainerConfig(**values)), ns


def validate(cfg: TrainerConfig) -> TrainerConfig:
    problems = []
    if not cfg.model:
        problems.append("--model (OFFDPO_TRAINER_MODEL) is required: the initial policy's directory")
    try:
        safe_key_part(cfg.run_name, "run name")
    except ValueError as exc:
        problems.append(str(exc))
    checks = [
        (cfg.mode in ("replay", "continuous"), f"--mode {cfg.mode!r}: use 'replay' or 'continuous'"),
        (cfg.loss_type in LOSS_TYPES, f"--loss-type {cfg.loss_type!r}: use one of {LOSS_TYPES}"),
        (
            cfg.truncation in ("refuse", "truncate_answers"),
            f"--truncation {cfg.truncation!r}: use 'refuse' or 'truncate_answers'",
        ),
        (cfg.precision in ("auto", "bf16", "fp32"), f"--precision {cfg.precision!r}: use auto, bf16 or fp32"),
        (cfg.distributed in ("ddp", "fsdp"), f"--distributed {cfg.distributed!r}: use ddp or fsdp"),
        (cfg.global_batch_size > 0 and cfg.micro_batch_size > 0, "batch sizes must be positive"),
        (cfg.beta > 0, "--beta must be positive"),
        (0 <= cfg.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)"),
        (cfg.max_length > 1, "--max-length must be > 1"),
        (cfg.save_every > 0, "--save-every must be positive"),
    ]
    problems += [msg for ok, msg in checks if not ok]
    if problems:
        raise SystemExit("trainer configuration: " + "; ".join(problems))
    return cfg


# -- distributed helpers --------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python -m services.trainer`: one process, no process group
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def bcast(obj, world: int):
    """Rank 0's object on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], world: int, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def lr_lambda(warmup: int, total: int | None, min_ratio: float):
    """Linear warmup, then cosine to min_ratio over `total` steps (constant when total is unknown)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not total or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# -- one optimizer step ---------------------------------------------------------------------------
def train_step(
    module,
    batch_examples: list,
    cfg: TrainerConfig,
    rank: int,
    world: int,
    device,
    autocast,
    ref_module=None,
    objective: str = "dpo",
    pad_id: int = 0,
) -> dict:
    """Forward/backward over this rank's slice of the global batch; returns global sums.

    The loss of each micro-batch is sum(per-pair loss) / global_pairs * world: DDP averages gradients
    over ranks, so the update equals one process's mean over the same global batch.
    """
    n = len(batch_examples)
    per_rank = -(-n // world)
    mine = batch_examples[rank * per_rank : (rank + 1) * per_rank]
    m = cfg.micro_batch_size
    n_micro = -(-per_rank // m)  # the same on every rank: collectives must line up
    sums = dict(loss=0.0, chosen=0.0, rejected=0.0, correct=0.0, logps_c=0.0, logps_r=0.0, tokens=0.0)
    for i in range(n_micro):
        micro = mine[i * m : (i + 1) * m]
        weight = 1.0
        if not micro:  # this rank ran out (short last batch): a zero-weight pass keeps DDP in step
            micro, weight = batch_examples[:1], 0.0
        batch = make_batch(micro, device, pad_id)
        sync = contextlib.nullcontext() if (i == n_micro - 1 or not hasattr(module, "no_sync")) else module.no_sync()
        with sync:
            with autocast():
                policy = answer_logps(module, batch)
            if objective == "sft":
                losses = sft_loss(policy, batch.answer_lengths)
                cr = rr = torch.zeros(batch.num_pairs)
                per_pair = losses[: batch.num_pairs] + losses[batch.num_pairs :]
            else:
                ref = batch.ref_logps
                if ref_module is not None:  # the "live reference" baseline: a frozen model's forward per step
                    with torch.no_grad(), autocast():
                        ref = answer_logps(ref_module, batch)
                per_pair, cr, rr = preference_loss(
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
            (per_pair.sum() * (weight * world / n)).backward()
        if weight:
            B = batch.num_pairs
            sums["loss"] += per_pair.detach().sum().item()
            sums["chosen"] += cr.sum().item()
            sums["rejected"] += rr.sum().item()
            sums["correct"] += (cr > rr).float().sum().item()
            sums["logps_c"] += policy[:B].detach().sum().item()
            sums["logps_r"] += policy[B:].detach().sum().item()
            sums["tokens"] += batch.num_tokens
    keys = list(sums)
    return dict(zip(keys, all_sum([sums[k] for k in keys], world, device)))


def step_metrics(sums: dict, n: int, grad_norm: float, lr: float, seconds: float) -> dict:
    return {
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


# -- setup helpers --------------------------------------------------------------------------------
def expected_fingerprint(cfg: TrainerConfig):
    import transformers

    from offdpo.fingerprint import model_fingerprint

    ref_dir = Path(cfg.reference_model or cfg.model)
    dtype = cfg.reference_dtype
    if not dtype:
        import json

        conf = json.loads((ref_dir / "config.json").read_text())
        dtype = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return model_fingerprint(
        ref_dir,
        dtype=dtype,
        engine="transformers",
        engine_version=transformers.__version__,
        model_id=cfg.reference_model_id or None,
    )


def load_policy(path, cfg: TrainerConfig, device):
    from transformers import AutoModelForCausalLM

    # Master weights in float32; bf16 only inside autocast (GPU), so optimizer updates do not underflow.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def wrap(model, cfg: TrainerConfig, world: int, device):
    module = AnswerLogps(model, chunk_size=cfg.logprob_chunk_size)
    if world == 1:
        return module
    if cfg.distributed == "fsdp":
        # FSDP2: weights, gradients and AdamW state sharded over the ranks, one unit per decoder
        # layer so only one layer is gathered at a time; gradients are averaged over ranks as DDP does.
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def _param_names(module) -> list[str]:
    """Parameter names in the optimizer's order (it was built from module.parameters())."""
    return [name for name, _ in module.named_parameters()]


def full_state_dicts(module, optimizer, cfg: TrainerConfig, world: int) -> tuple[dict | None, dict | None]:
    """FSDP: (full model state dict, full optimizer state dict in torch's index-keyed layout), gathered
    to rank 0 (a collective: every rank calls it). Otherwise (None, None): the live objects are whole."""
    if not (world > 1 and cfg.distributed == "fsdp"):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() != 0:
        return None, None
    index = {name: i for i, name in enumerate(_param_names(module))}
    optim_sd = {
        "state": {index[name]: st for name, st in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in optim_sd["param_groups"]],
    }
    # Tied weights come back under both names; keep the names save_pretrained itself would write.
    own = {name for name, _ in module.model.named_parameters()} | {name for name, _ in module.model.named_buffers()}
    return {k.removeprefix("model."): v for k, v in model_sd.items() if k.removeprefix("model.") in own}, optim_sd


def optimizer_loader(module, optimizer, cfg: TrainerConfig, world: int):
    """How a checkpoint's full optimizer state goes back in: FSDP shards it over the ranks."""
    if not (world > 1 and cfg.distributed == "fsdp"):
        return optimizer.load_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(module)

    def load(full: dict) -> None:
        by_name = {
            "state": {names[i]: st for i, st in full["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]],
        }
        set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    return load


# -- the run --------------------------------------------------------------------------------------
def run(
    cfg: TrainerConfig, s3: S3Config | None = None, kafka: KafkaConfig | None = None, fault_kill_after_step: int = 0
) -> dict:
    """Train; returns a summary. Raises DataError when data is refused (replay mode).
    Stopped by SIGTERM/SIGINT, it checkpoints and returns with `stopped_by` set to the signal's name."""
    # A preempted pod resumes where it stopped instead of at the last periodic checkpoint.
    with StopOnSignals("stopping after the current step and saving a checkpoint") as stop:
        return _run(cfg, s3, kafka, fault_kill_after_step, stop)


def _run(
    cfg: TrainerConfig, s3: S3Config | None, kafka: KafkaConfig | None, fault_kill_after_step: int, stop: StopOnSignals
) -> dict:
    s3 = s3 or S3Config.from_env()
    kafka = kafka or KafkaConfig.from_env()
    rank, world, device = (
        setup_distributed()
        if not (dist.is_available() and dist.is_initialized())
        else (dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    torch.manual_seed(cfg.seed)
    store = ObjectStore(s3)
    if rank == 0:
        store.ensure_bucket()

    # Resume point (rank 0 decides; everyone loads the same checkpoint).
    resume_prefix = bcast(ckpt.latest_checkpoint(store, cfg.run_name) if (cfg.resume and rank == 0) else None, world)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # Data source on rank 0; its errors are broadcast so every rank stops with the same message.
    source, setup = None, None
    if rank == 0:
        try:
            expected = expected_fingerprint(cfg)
            allowed = set(cfg.allow_fingerprint)
            if cfg.mode == "replay":
                source = ReplaySource(
                    store, cfg.prefix, cfg.epochs, cfg.seed, expected, allowed, cfg.max_length, cfg.truncation
                )
                total = cfg.epochs * source.steps_per_epoch(cfg.global_batch_size)
                total = min(total, cfg.max_steps) if cfg.max_steps else total
            else:
                from offdpo.kafka import DeadLetterSink, make_consumer, make_producer

                group = cfg.consumer_group or f"offdpo-trainer-{cfg.run_name}"
                consumer = make_consumer(kafka, group, [kafka.shards_topic])
                sink = DeadLetterSink(make_producer(kafka, f"trainer-{cfg.run_name}"), kafka, "trainer")
                source = StreamSource(
                    store,
                    consumer,
                    sink,
                    expected,
                    allowed,
                    cfg.max_length,
                    cfg.truncation,
                    cfg.poll_timeout_ms,
                    cfg.stop_when_idle_s,
                    kafka.shards_topic,
                )
                source.stop_requested = stop.requested
                total = cfg.max_steps or None
            setup = {"total": total, "fingerprint": expected.fingerprint_id}
        except DataError as exc:
            setup = {"error": str(exc)}
    setup = bcast(setup, world)
    if "error" in setup:
        raise DataError(setup["error"])

    with tempfile.TemporaryDirectory() as tmp:
        weights = ckpt.download_model(store, resume_prefix, Path(tmp)) if resume_prefix else cfg.model
        model = load_policy(weights, cfg, device)
    module = wrap(model, cfg, world, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_steps, setup["total"], cfg.min_lr_ratio)
    )
    step = 0
    if resume_prefix:
        state = ckpt.load_trainer_state(
            store, resume_prefix, optimizer_loader(module, optimizer, cfg, world), scheduler
        )
        if state["fingerprint"] != setup["fingerprint"]:
            raise DataError(
                f"checkpoint {resume_prefix} was trained against reference {state['fingerprint']}, "
                f"this run expects {setup['fingerprint']}"
            )
        step = state["step"]
        if rank == 0:
            source.load_state(state["data"])
        log.info("resumed from %s at step %d", resume_prefix, step)

    metrics = None
    if rank == 0:
        from services.trainer.metrics import MetricsLog

        metrics = MetricsLog(
            Path(cfg.log_dir) / cfg.run_name,
            step,
            cfg.metrics_port,
            cfg.progress and sys.stderr.isatty(),
            setup["total"],
        )

    def save(step: int) -> None:
        model_sd, optim_sd = full_state_dicts(module, optimizer, cfg, world)
        if rank == 0:
            extra = {
                "data": source.state(),
                "fingerprint": setup["fingerprint"],
                "config": dataclasses.asdict(cfg),
                "world_size": world,
            }
            ckpt.save_checkpoint(
                store,
                cfg.run_name,
                step,
                model,
                tokenizer,
                optim_sd or optimizer.state_dict(),
                scheduler,
                extra,
                model_sd,
            )
            if cfg.mode == "continuous":  # only now may Kafka forget the events this checkpoint covers
                commit_offsets(source)
        if world > 1:
            dist.barrier()

    saved_step, stopped_by = step, None
    try:
        while not (cfg.max_steps and step >= cfg.max_steps):
            # 1. rank 0 takes the next global batch; everyone gets it.
            #    Rank 0's signal decides for everyone (torchrun signals every rank, not at the same instant).
            batch = None
            if rank == 0:
                try:
                    batch = None if stop.requested.is_set() else source.next_batch(cfg.global_batch_size)
                except DataError as exc:
                    batch = {"error": str(exc)}
                if batch is None and stop.requested.is_set():
                    batch = {"stop": stop.name}
            batch = bcast(batch, world)
            if isinstance(batch, dict):
                if "stop" in batch:
                    stopped_by = batch["stop"]
                    break
                raise DataError(batch["error"])
            if batch is None:
                break
            # 2. forward/backward on this rank's slice, gradients all-reduced.
            t0 = time.perf_counter()
            sums = train_step(module, batch, cfg, rank, world, device, autocast, pad_id=pad_id)
            # 3. clip, update, schedule.
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            values = step_metrics(
                sums,
                len(batch),
                float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                lr,
                time.perf_counter() - t0,
            )
            if rank == 0:
                if cfg.mode == "continuous":
                    source.mark_trained(batch)
                metrics.log(step, values, [e.pair_id for e in batch])
            if fault_kill_after_step and step == fault_kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)
            # 4. checkpoint.
            if step % cfg.save_every == 0:
                save(step)
                saved_step = step
        if step > saved_step:
            save(step)
        if stopped_by:
            log.warning("%s: checkpoint saved at step %d; rerun the same command to resume", stopped_by, step)
        summary = {"step": step, "run": cfg.run_name, "stopped_by": stopped_by}
        if rank == 0:
            metrics.close()
            png = metrics.plot()
            prefix = ckpt.run_prefix(cfg.run_name)
            for path in (metrics.path, metrics.pairs_path, png):
                if path is not None and path.exists():
                    store.put_bytes(f"{prefix}/{path.name}", path.read_bytes())
            summary.update(metrics_path=str(metrics.path), plot=str(png) if png else None)
        return summary
    finally:
        if rank == 0 and source is not None:
            source.close()
        if metrics is not None:
            metrics.close()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, ns = parse_args(argv)
    try:
        summary = run(cfg, fault_kill_after_step=ns.fault_kill_after_step)
        log.info("done: %s", summary)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank is done communicating before any tears its process group down
        if summary.get("stopped_by"):
            # Not 0: a Job must not count a stopped run as completed (128 + signal, as the shell reports it).
            return 128 + signal.Signals[summary["stopped_by"]].value
        return 0
    except DataError as exc:
        log.error("refused: %s", exc)
        print(f"trainer: data refused: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
