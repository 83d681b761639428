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

The loop (`_run`), top to bottom: set up (process group, data source and resume point on rank 0,
model, optimizer, schedule), then per step rank 0 takes one global batch and broadcasts it, each rank
trains its contiguous slice with gradient accumulation, DDP/FSDP all-reduce the gradients, clip,
AdamW step, log; checkpoint every --save-every steps and at the end.

Outages and bad data: a shard S3 cannot deliver (unreachable, AccessDenied, any error but NoSuchKey)
stops progress on its event and is retried with backoff for as long as it takes (a log line per
step; Prometheus offdpo_trainer_infra_errors_total, offdpo_trainer_backoff_seconds and
offdpo_trainer_waiting_on_infra_seconds); so is a checkpoint upload. After OFFDPO_TRAINER_OUTAGE_READY_S of
such waiting the health port (OFFDPO_TRAINER_HEALTH_PORT, grpc.health.v1 service 'readiness') answers
NOT_SERVING, and SERVING again once it resumes; liveness ('') never depends on S3 or Kafka. Only wrong
data is dead-lettered, poisoned rows included (token ids outside the model's vocabulary, NaN or
infinite reference log-probs). A step whose loss or gradient norm is not
finite is not applied (counted as skipped_nonfinite_steps, its pairs in skipped_pairs.jsonl), and a
checkpoint of non-finite weights is refused.

Evaluation: --eval-fraction F holds out the pairs whose salted pair-id hash falls under F (never
trained; the first --eval-max-pairs kept) and evaluates them every --eval-every steps and at the end:
eval/loss, eval/rewards/{chosen,rejected,margins,accuracies}, eval/logps/{chosen,rejected} on lines
of their own in metrics.jsonl, as Prometheus gauges (offdpo_trainer_eval_*) and in curves.png.

Where the pieces live: data.py (sources, checks, dead letters, offset commits), messages.py (what
rank 0 broadcasts), distributed.py (process group, DDP/FSDP), step.py (one step's forward/backward),
losses.py, schedule.py (learning rate), checkpoint.py (S3 layout, save and resume), metrics.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from offdpo.config import (
    ConfigError,
    ConfigFile,
    KafkaConfig,
    S3Config,
    add_setting_flags,
    parse_settings,
    resolved_config_yaml,
)
from offdpo.errors import BadInput
from offdpo.health import LoopHealth, LoopHealthServer
from offdpo.records import ReferenceFingerprint
from offdpo.s3 import ObjectStore, safe_key_part
from offdpo.shutdown import StopOnSignals
from services.trainer import checkpoint as ckpt
from services.trainer import distributed
from services.trainer.config import LOSS_TYPES, TrainerConfig
from services.trainer.data import Source, open_source
from services.trainer.distributed import Node, all_sum, wrap
from services.trainer.infra import InfraStatus
from services.trainer.messages import (
    Batch,
    Evaluate,
    Failure,
    Plan,
    Setup,
    Step,
    Stop,
    as_evaluate,
    as_setup,
    as_step,
)
from services.trainer.metrics import MetricsLog
from services.trainer.packing import matmul_ceiling_gflops, model_flop_shape
from services.trainer.schedule import lr_schedule
from services.trainer.shards import DataError, ObjectReader
from services.trainer.step import eval_metrics, eval_step, step_metrics, train_step
from services.trainer.trackers import TrackerConfig, check_installed, open_trackers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("offdpo.trainer")


# -- command line ---------------------------------------------------------------------------------
# The config file: the trainer's own settings at its top level, then these sections (offdpo.config.ConfigFile).
CONFIG_SECTIONS = {"kafka": KafkaConfig, "s3": S3Config, "trackers": TrackerConfig}
SETTINGS_LISTING = "`offdpo train --print-config` (or python -m services.trainer --print-config)"
CONFIG_FILE = ConfigFile(service="trainer", top=TrainerConfig, sections=CONFIG_SECTIONS, listing=SETTINGS_LISTING)


def parse_args(
    argv: list[str] | None = None, prog: str = "python -m services.trainer"
) -> tuple[TrainerConfig, argparse.Namespace]:
    """The trainer's settings: defaults < --config FILE < OFFDPO_* environment variables < flags. The
    namespace also carries the resolved s3_config, kafka_config and tracker_config (the file's `s3:`,
    `kafka:` and `trackers:` sections under their environment variables and flags). Bad settings raise
    ConfigError (one line naming the setting)."""

    def build(bases: Any) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        CONFIG_FILE.add_arguments(p)
        add_setting_flags(p, TrainerConfig, bases[TrainerConfig])
        trackers = p.add_argument_group("experiment trackers (the `trackers:` section)")
        add_setting_flags(trackers, TrackerConfig, bases[TrackerConfig])
        # Fault injection for the crash/resume tests, off unless given: SIGKILL ourselves right after
        # this optimizer step, or right after the checkpoint of this step is written and before its
        # offsets are committed; or answer every shard read with S3's AccessDenied for this many
        # seconds after the first one (a credential rotation, without touching the real credentials).
        p.add_argument("--fault-kill-after-step", type=int, default=0, help=argparse.SUPPRESS)
        p.add_argument("--fault-kill-after-checkpoint", type=int, default=0, help=argparse.SUPPRESS)
        p.add_argument("--fault-deny-shard-reads-s", type=float, default=0.0, help=argparse.SUPPRESS)
        return p

    settings, ns = parse_settings(argv, CONFIG_FILE, build, flagged=(TrainerConfig, TrackerConfig))
    ns.tracker_config = settings.of(TrackerConfig)
    ns.kafka_config = settings.of(KafkaConfig)
    ns.s3_config = settings.of(S3Config)
    return validate(settings.of(TrainerConfig), require_model=not ns.print_config), ns


def validate(cfg: TrainerConfig, *, require_model: bool = True) -> TrainerConfig:
    """Refuse settings that cannot work together; ConfigError lists every problem on one line."""
    from services.trainer import lora

    problems = lora.settings_problems(cfg)
    if require_model and not cfg.model:
        problems.append(
            "model is required (`model:` in --config, --model or OFFDPO_TRAINER_MODEL): the initial policy's directory"
        )
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
        (
            cfg.save_dtype in ("bfloat16", "float32", "float16"),
            f"--save-dtype {cfg.save_dtype!r}: use bfloat16, float32 or float16",
        ),
        (
            cfg.fsdp_mixed_precision in ("auto", "on", "off"),
            f"--fsdp-mixed-precision {cfg.fsdp_mixed_precision!r}: use auto, on or off",
        ),
        (
            cfg.checkpoint_format in ("auto", "sharded", "full"),
            f"--checkpoint-format {cfg.checkpoint_format!r}: use auto, sharded or full",
        ),
        (
            cfg.checkpoint_file_bytes > 0 and cfg.export_shard_bytes > 0,
            "--checkpoint-file-bytes and --export-shard-bytes must be positive",
        ),
        (cfg.global_batch_size > 0 and cfg.micro_batch_size > 0, "batch sizes must be positive"),
        (cfg.beta > 0, "--beta must be positive"),
        (0 <= cfg.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)"),
        (cfg.max_length > 1, "--max-length must be > 1"),
        (cfg.save_every > 0, "--save-every must be positive"),
        (cfg.max_poll_records > 0, "--max-poll-records must be positive"),
        (cfg.max_shard_bytes > 0, "--max-shard-bytes must be positive"),
        (cfg.shuffle_pairs > 0, "--shuffle-pairs must be positive"),
        (cfg.dedup_window >= 0, "--dedup-window must be >= 0"),
        (0 <= cfg.eval_fraction < 1, "--eval-fraction must be in [0, 1)"),
        (cfg.eval_every > 0 and cfg.eval_max_pairs > 0, "--eval-every and --eval-max-pairs must be positive"),
    ]
    problems += [msg for ok, msg in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


# -- fault injection (tests only; every hook off by default) --------------------------------------
@dataclasses.dataclass(frozen=True)
class Faults:
    kill_after_step: int = 0  # SIGKILL right after this optimizer step
    kill_after_checkpoint: int = 0  # SIGKILL after this step's checkpoint is written, before its commit
    deny_shard_reads_s: float = 0.0  # shard reads answer AccessDenied for this long after the first one


class _DeniedReads:
    """An object store whose reads fail with S3's AccessDenied for `seconds` from the first one, as
    after a credential rotation; listing and everything else pass through."""

    def __init__(self, inner: ObjectReader, seconds: float):
        self.inner, self.seconds, self.bucket = inner, seconds, inner.bucket
        self.first: float | None = None

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        from minio.error import S3Error

        self.first = self.first or time.monotonic()
        if time.monotonic() - self.first < self.seconds:
            raise S3Error(None, "AccessDenied", "Access Denied (injected)", key, "", "", self.bucket, key)  # type: ignore[arg-type]
        return self.inner.get_bytes(key, max_bytes)

    def list_keys(self, prefix: str) -> list[str]:
        return self.inner.list_keys(prefix)


# -- setup ----------------------------------------------------------------------------------------
def expected_fingerprint(cfg: TrainerConfig) -> ReferenceFingerprint:
    """The fingerprint refscore stamps on scores of this run's reference model."""
    import transformers

    from offdpo.fingerprint import model_fingerprint

    ref_dir = Path(cfg.reference_model or cfg.model)
    dtype = cfg.reference_dtype
    if not dtype:
        conf = json.loads((ref_dir / "config.json").read_text())
        dtype = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return model_fingerprint(
        ref_dir,
        dtype=dtype,
        engine="transformers",
        engine_version=transformers.__version__,
        model_id=cfg.reference_model_id or None,
    )


def load_policy(path: str | Path, cfg: TrainerConfig, device: torch.device | str) -> PreTrainedModel:
    """The policy from a Hugging Face folder, ready to train; under LoRA (--lora-r) peft's PeftModel
    around it, only the adapters trainable (lora.py)."""
    from transformers import AutoModelForCausalLM

    from services.trainer import lora

    # Master weights in float32; bf16 only inside autocast (GPU), so optimizer updates do not underflow.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # PreTrainedModel.to is declared through functools.wraps(torch.nn.Module.to), which mypy reads as
    # the unbound function (self first).
    model.to(device)  # type: ignore[arg-type]
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = lora.apply(model, cfg)
    model.train()
    return model


def model_vocab_size(path: str | Path) -> int | None:
    """Rows of the model's embedding (config.vocab_size): a token id at or past it is poison."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path)
    size = getattr(conf, "vocab_size", None) or getattr(conf.get_text_config(), "vocab_size", None)
    return int(size) if size else None


def prepare(
    cfg: TrainerConfig,
    store: ObjectStore,
    kafka: KafkaConfig,
    stop: threading.Event,
    faults: Faults | None = None,
    infra: InfraStatus | None = None,
) -> tuple[Source | None, Setup]:
    """Rank 0: the data source and the run's plan, or why the data is refused (then no source)."""
    store.ensure_bucket()
    expected = expected_fingerprint(cfg)
    reader: ObjectReader = store
    if faults and faults.deny_shard_reads_s:
        reader = _DeniedReads(store, faults.deny_shard_reads_s)
    try:
        resume_from = ckpt.latest_checkpoint(store, cfg.run_name) if cfg.resume else None
        source = open_source(cfg, reader, kafka, expected, stop, model_vocab_size(cfg.model), infra)
    except BadInput as exc:  # replay: a shard or a record refused before step 1; an unsafe `latest`
        return None, Failure(str(exc))
    try:
        if resume_from:
            state = ckpt.read_state(store, resume_from)
            if state["fingerprint"] != expected.fingerprint_id:
                raise DataError(
                    f"checkpoint {resume_from} was trained against reference {state['fingerprint']}, "
                    f"this run expects {expected.fingerprint_id}"
                )
            source.load_state(state["data"])
    except BadInput as exc:  # the checkpoint cannot be continued with this data exactly once
        source.close()
        return None, Failure(str(exc))
    except BaseException:
        source.close()
        raise
    total = source.total_steps(cfg.global_batch_size, cfg.max_steps)
    return source, Plan(total, expected.fingerprint_id, resume_from)


def build_policy(cfg: TrainerConfig, node: Node, store: ckpt.Store, plan: Plan) -> ckpt.Policy:
    """The initial policy, or the checkpoint's weights on resume; wrapped, with AdamW and the schedule.
    FSDP: built on the meta device and sharded before any weight is read; each rank then reads only
    its own slices (of the model folder, or, resuming a sharded checkpoint, in ckpt.restore)."""
    from services.trainer import lora

    resume_from = plan.resume_from
    state = ckpt.read_state(store, resume_from) if resume_from is not None else None
    sharded_resume = state is not None and state.get("checkpoint_format") == "sharded"
    # LoRA: the base weights are --model's at every step (frozen); a checkpoint holds only the adapters
    # and their AdamW state, which ckpt.restore puts back. Its LoRA settings must be this run's.
    lora_resume = cfg.lora_r > 0
    if state is not None:
        lora.check_resume(state, cfg, str(resume_from))
    with tempfile.TemporaryDirectory() as tmp:
        if distributed.is_sharded(cfg, node.world):
            # A sharded checkpoint fills the shards in restore(); a full one (an older run, one
            # process) has a model/ folder each rank reads its slices of, as of the initial model.
            weights: str | Path | None = cfg.model
            if resume_from and not lora_resume:
                weights = None if sharded_resume else ckpt.download_weights(store, resume_from, Path(tmp))
            model, module = distributed.build_sharded(cfg.model, cfg, node.device, weights)
        else:
            folder = (
                ckpt.download_weights(store, resume_from, Path(tmp)) if resume_from and not lora_resume else cfg.model
            )
            model = load_policy(folder, cfg, node.device)
            module = wrap(model, cfg, node.world, node.device)
    # Only what trains gets AdamW state: every parameter, or the adapters under LoRA.
    optimizer = torch.optim.AdamW(lora.trainable(module), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, plan.total_steps, cfg.min_lr_ratio)
    return ckpt.Policy(model, module, optimizer, scheduler)


def next_message(source: Source, size: int, stop: StopOnSignals) -> Step:
    """Rank 0: the next global batch, or why there is none."""
    if stop.requested.is_set():
        return Stop(stop.name)
    try:
        examples = source.next_batch(size)
    except BadInput as exc:
        return Failure(str(exc))
    if examples is None:  # the data ran out, or a signal came while the stream was waiting
        return Stop(stop.name if stop.requested.is_set() else None)
    return Batch(examples)


def grad_norm_value(norm: torch.Tensor) -> float:
    if isinstance(norm, DTensor):  # FSDP: sharded over the ranks; gathering it is a collective
        return float(norm.full_tensor())
    return float(norm)


def nonfinite_weights(policy: ckpt.Policy, node: Node) -> int:
    """Parameters (over every rank's shard) holding a NaN or an infinity."""
    # FSDP: each rank checks its own shard (a DTensor's local part); all_sum adds the ranks up.
    bad = 0
    for p in policy.module.parameters():
        t: Any = p.detach()
        if isinstance(t, DTensor):
            t = t.to_local()
        bad += int(not bool(torch.isfinite(t).all()))
    return int(all_sum([float(bad)], node.world, node.device)[0])


def save_and_commit(
    store: ObjectStore,
    cfg: TrainerConfig,
    node: Node,
    step: int,
    policy: ckpt.Policy,
    tokenizer: Any,
    source: Source | None,
    plan: Plan,
    faults: Faults | None = None,
    config_yaml: str = "",
) -> None:
    """Checkpoint `step`; then the source may forget what it covers. Every rank calls it."""
    bad = nonfinite_weights(policy, node)
    if bad:  # the skip of non-finite steps should make this impossible; a resume must never load it
        raise RuntimeError(f"step {step}: {bad} parameter tensors are not finite; refusing to checkpoint them")
    extra = None
    if source is not None:
        extra = {
            "data": source.state(),
            "fingerprint": plan.fingerprint_id,
            "config": dataclasses.asdict(cfg),
            "world_size": node.world,
            "config_yaml": config_yaml,
        }
    ckpt.save(store, cfg, node, step, policy, tokenizer, extra, source.infra if source is not None else None)
    if faults and faults.kill_after_checkpoint == step:  # the test's crash between checkpoint and commit
        os.kill(os.getpid(), signal.SIGKILL)
    if source is not None:
        source.commit()
    node.barrier()


def evaluate(
    cfg: TrainerConfig,
    node: Node,
    step: int,
    policy: ckpt.Policy,
    source: Source | None,
    metrics: MetricsLog | None,
    autocast: Any,
    pad_id: int,
) -> None:
    """Every rank: the held-out pairs seen so far (rank 0's), evaluated and logged as eval/... keys."""
    message = as_evaluate(node.broadcast(Evaluate(list(source.evals.examples)) if source is not None else None))
    if not message.examples:
        return
    sums = eval_step(policy.module, message.examples, cfg, node.rank, node.world, node.device, autocast, pad_id)
    values = eval_metrics(sums, len(message.examples))
    if metrics is not None:
        metrics.log_eval(step, values)
    log.info(
        "step %d eval on %d held-out pairs: loss %.4f, reward accuracy %.3f, margin %.4f",
        step,
        len(message.examples),
        values["eval/loss"],
        values["eval/rewards/accuracies"],
        values["eval/rewards/margins"],
    )


def publish_metrics(metrics: MetricsLog, store: ObjectStore, run_name: str) -> dict[str, Any]:
    """Close the log, plot it, and put the logs and the plot next to the checkpoints."""
    metrics.close()
    png = metrics.plot()
    prefix = ckpt.run_prefix(run_name)
    for path in (metrics.path, metrics.pairs_path, png):
        if path is not None and path.exists():
            store.put_bytes(f"{prefix}/{path.name}", path.read_bytes())
    return {"metrics_path": str(metrics.path), "plot": str(png) if png else None}


# -- the run --------------------------------------------------------------------------------------
def run(
    cfg: TrainerConfig,
    s3: S3Config | None = None,
    kafka: KafkaConfig | None = None,
    fault_kill_after_step: int = 0,
    faults: Faults | None = None,
    trackers: TrackerConfig | None = None,
) -> dict[str, Any]:
    """Train; returns a summary. Raises DataError when data is refused (replay mode).
    Stopped by SIGTERM/SIGINT, it checkpoints and returns with `stopped_by` set to the signal's name."""
    faults = faults or Faults(kill_after_step=fault_kill_after_step)
    infra = InfraStatus()  # the data source's and the checkpoint uploads' outage state, read by readiness
    # A preempted pod resumes where it stopped instead of at the last periodic checkpoint.
    with (
        StopOnSignals("stopping after the current step and saving a checkpoint") as stop,
        health_server(cfg, infra),
    ):
        trackers = trackers or TrackerConfig.from_env()
        return _run(cfg, s3 or S3Config.from_env(), kafka or KafkaConfig.from_env(), faults, stop, infra, trackers)


def trainer_health(cfg: TrainerConfig, infra: InfraStatus) -> LoopHealth:
    """Readiness of the trainer (offdpo.health): NOT_SERVING once `infra` (what the sources and the
    checkpoint uploads retry: S3 reads and writes, dead letters the broker does not acknowledge) has been
    waiting for OFFDPO_TRAINER_OUTAGE_READY_S, SERVING again when it resumes; read at Check time, since
    the main thread is blocked in the backoff. A broker that is merely unreachable shows as empty polls
    (kafka-python does not raise), not here. No staleness check: a step may take long, and the Job
    restarts nothing on a liveness answer."""
    return LoopHealth(
        "offdpo-trainer",
        0.0,
        clock=infra.clock,
        outage_ready_s=cfg.outage_ready_s,
        outage_since=lambda: infra.waiting_since,
    )


def health_server(cfg: TrainerConfig, infra: InfraStatus) -> contextlib.AbstractContextManager[Any]:
    """The health port on local rank 0 of each node (one per pod); the other ranks serve none. Only
    global rank 0 reads data, so another node's pod reports SERVING while it waits on rank 0."""
    if not cfg.health_port or os.environ.get("LOCAL_RANK", "0") != "0":
        return contextlib.nullcontext()
    return LoopHealthServer(trainer_health(cfg, infra), "0.0.0.0", cfg.health_port, "OFFDPO_TRAINER_HEALTH_PORT")


def _run(
    cfg: TrainerConfig,
    s3: S3Config,
    kafka: KafkaConfig,
    faults: Faults,
    stop: StopOnSignals,
    infra: InfraStatus | None = None,
    trackers: TrackerConfig | None = None,
) -> dict[str, Any]:
    node = distributed.setup()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and node.device.type == "cuda")
    autocast = (lambda: torch.autocast(node.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    torch.manual_seed(cfg.seed)
    store = ObjectStore(s3)
    # Saved with every checkpoint (step-N/config.yaml): `offdpo train --config` of it reruns this run.
    config_yaml = resolved_config_yaml(cfg, kafka, s3, **({"trackers": trackers} if trackers is not None else {}))

    # Rank 0 opens the data and finds the checkpoint to resume; every rank follows its plan, and a
    # refusal stops every rank with the same message. The source and the metrics live on rank 0 only.
    source: Source | None = None
    setup: Setup | None = None
    if node.is_main:
        source, setup = prepare(cfg, store, kafka, stop.requested, faults, infra)
    plan = as_setup(node.broadcast(setup))
    if isinstance(plan, Failure):
        raise DataError(plan.message)
    metrics = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        policy = build_policy(cfg, node, store, plan)
        # MFU per step (beside tokens/s): useful FLOPs over the float32 GEMM ceiling, measured unless given.
        flop_shape = model_flop_shape(policy.model)
        peak_gflops = cfg.peak_gflops or (matmul_ceiling_gflops() if node.is_main else 0.0)
        step = ckpt.restore(store, plan.resume_from, cfg, node, policy) if plan.resume_from else 0
        if plan.resume_from:
            log.info("resumed from %s at step %d", plan.resume_from, step)
        if node.is_main:
            progress = cfg.progress and sys.stderr.isatty()
            tracking = open_trackers(trackers, cfg, s3, kafka, step) if trackers is not None else None
            metrics = MetricsLog(
                Path(cfg.log_dir) / cfg.run_name, step, cfg.metrics_port, progress, plan.total_steps, tracking
            )
            metrics.watch_infra(source.infra if source is not None else InfraStatus())

        saved_step, evaluated_step, stopped_by, skipped = step, -1, None, 0
        while not (cfg.max_steps and step >= cfg.max_steps):
            # 1. Rank 0 takes the next global batch; every rank gets it. Rank 0's signal decides for
            #    everyone (torchrun signals every rank, not at the same instant).
            message = as_step(node.broadcast(next_message(source, cfg.global_batch_size, stop) if source else None))
            if isinstance(message, Failure):
                raise DataError(message.message)
            if isinstance(message, Stop):
                stopped_by = message.signal
                break
            batch = message.examples

            # 2. Forward/backward on this rank's slice of the batch; DDP/FSDP all-reduce the gradients.
            t0 = time.perf_counter()
            sums = train_step(policy.module, batch, cfg, node.rank, node.world, node.device, autocast, pad_id=pad_id)

            # 3. Clip, update, schedule; a step whose loss or gradient is not finite is not applied:
            #    one NaN in the update turns every weight into NaN. Every rank sees the same global
            #    loss and norm, so every rank skips it.
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.module.parameters(), cfg.max_grad_norm or float("inf"))
            norm = grad_norm_value(grad_norm)
            if not (math.isfinite(sums["loss"]) and math.isfinite(norm)):
                policy.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                reason = f"loss {sums['loss']}, gradient norm {norm}: not finite, no update"
                log.warning(
                    "step %d skipped (%s); its %d pairs go to skipped_pairs.jsonl", step + 1, reason, len(batch)
                )
                if source is not None:
                    source.mark_trained(batch)  # taken: the stream must move on past them
                if metrics is not None:
                    metrics.log_skipped(step, [e.pair_id for e in batch], reason)
                continue
            lr = float(policy.scheduler.get_last_lr()[0])
            policy.optimizer.step()
            policy.scheduler.step()
            policy.optimizer.zero_grad(set_to_none=True)
            if node.device.type == "cuda":
                torch.cuda.synchronize()
            step += 1

            # 4. Log; the pairs count as trained once the update is done.
            values = step_metrics(sums, len(batch), norm, lr, time.perf_counter() - t0, flop_shape, peak_gflops)
            values["skipped_nonfinite_steps"] = skipped
            if source is not None:
                source.mark_trained(batch)
            if metrics is not None:
                metrics.log(step, values, [e.pair_id for e in batch])
            if faults.kill_after_step and step == faults.kill_after_step:  # the crash/resume test's kill -9
                os.kill(os.getpid(), signal.SIGKILL)

            # 5. Evaluate the held-out pairs every --eval-every steps.
            if cfg.eval_fraction > 0 and step % cfg.eval_every == 0:
                evaluate(cfg, node, step, policy, source, metrics, autocast, pad_id)
                evaluated_step = step

            # 6. Checkpoint (continuous mode: then commit the stream offsets it covers).
            if step % cfg.save_every == 0:
                save_and_commit(store, cfg, node, step, policy, tokenizer, source, plan, faults, config_yaml)
                saved_step = step

        if cfg.eval_fraction > 0 and step > evaluated_step and not stopped_by:
            evaluate(cfg, node, step, policy, source, metrics, autocast, pad_id)
        if step > saved_step:
            save_and_commit(store, cfg, node, step, policy, tokenizer, source, plan, faults, config_yaml)
        if stopped_by:
            log.warning("%s: checkpoint saved at step %d; rerun the same command to resume", stopped_by, step)
        summary: dict[str, Any] = {
            "step": step,
            "run": cfg.run_name,
            "stopped_by": stopped_by,
            "skipped_nonfinite_steps": skipped,
        }
        if metrics is not None:
            summary.update(publish_metrics(metrics, store, cfg.run_name))
        return summary
    finally:
        if source is not None:
            source.close()
        if metrics is not None:
            metrics.close()


def main(argv: list[str] | None = None, prog: str = "python -m services.trainer") -> int:
    """The command line (also `offdpo train`). A bad setting (file, environment variable, flag) is one
    line on stderr, `trainer: <what is wrong>`, and exit 2; no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, ns = parse_args(argv, prog)
        if ns.print_config:
            print(resolved_config_yaml(cfg, ns.kafka_config, ns.s3_config, trackers=ns.tracker_config), end="")
            return 0
        check_installed(ns.tracker_config)  # before the model loads
    except ConfigError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    try:
        faults = Faults(ns.fault_kill_after_step, ns.fault_kill_after_checkpoint, ns.fault_deny_shard_reads_s)
        summary = run(cfg, ns.s3_config, ns.kafka_config, faults=faults, trackers=ns.tracker_config)
        log.info("done: %s", summary)
        distributed.finish()
        if summary.get("stopped_by"):
            # Not 0: a Job must not count a stopped run as completed (128 + signal, as the shell reports it).
            return 128 + signal.Signals[summary["stopped_by"]].value
        return 0
    except DataError as exc:
        log.error("refused: %s", exc)
        print(f"trainer: data refused: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # met while starting (a tracker, Kafka's client settings)
        log.error("configuration error: %s", exc)
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
