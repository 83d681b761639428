"""Trainer settings: every one an environment variable (OFFDPO_TRAINER_*) and a command-line flag.

`python -m services.trainer --help` lists them; a flag overrides its variable.
"""

from __future__ import annotations

import dataclasses

from offdpo.config import EnvConfig, KafkaConfig, S3Config, env
from offdpo.records import MAX_SHARD_BYTES

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")


@dataclasses.dataclass(frozen=True, repr=False)
class TrainerConfig(EnvConfig):
    # -- what to train, on what
    model: str = env("OFFDPO_TRAINER_MODEL", "", "Hugging Face directory of the initial policy")
    run_name: str = env("OFFDPO_TRAINER_RUN_NAME", "offdpo-run", "run id: checkpoints go to runs/<run_name>/ in S3")
    mode: str = env(
        "OFFDPO_TRAINER_MODE", "replay", "'replay' (an S3 prefix, N epochs) or 'continuous' (shard-ready topic)"
    )
    prefix: str = env("OFFDPO_TRAINER_PREFIX", "scores/", "replay mode: S3 prefix of the scored shards (*.parquet)")
    epochs: int = env("OFFDPO_TRAINER_EPOCHS", 1, "replay mode: passes over the prefix")
    seed: int = env("OFFDPO_TRAINER_SEED", 0, "seed of the per-epoch shuffle and of torch")
    consumer_group: str = env(
        "OFFDPO_TRAINER_CONSUMER_GROUP", "", "continuous mode: Kafka group (default offdpo-trainer-<run_name>)"
    )
    stop_when_idle_s: float = env(
        "OFFDPO_TRAINER_STOP_WHEN_IDLE_S",
        0.0,
        "continuous mode: stop cleanly after this long without a new shard (0: never)",
    )
    max_steps: int = env("OFFDPO_TRAINER_MAX_STEPS", 0, "stop after this many optimizer steps (0: no limit)")
    # -- reference fingerprint
    reference_model: str = env(
        "OFFDPO_TRAINER_REFERENCE_MODEL",
        "",
        "directory of the reference the scores must come from (default: --model, the initial policy)",
    )
    reference_model_id: str = env(
        "OFFDPO_TRAINER_REFERENCE_MODEL_ID",
        "",
        "model_id in the expected fingerprint (default: the directory's name, as refscore stamps it)",
    )
    reference_dtype: str = env(
        "OFFDPO_TRAINER_REFERENCE_DTYPE", "", "dtype the reference was scored in (default: the model config's dtype)"
    )
    allow_fingerprint: tuple = env(
        "OFFDPO_TRAINER_ALLOW_FINGERPRINT",
        (),
        "comma-separated fingerprint ids accepted although they differ from the reference (deliberate)",
    )
    other_references: str = env(
        "OFFDPO_TRAINER_OTHER_REFERENCES",
        "",
        "continuous mode: comma-separated fingerprint ids of other references scored into the same shard-ready "
        "topic (refscore serving several); their events are skipped and committed past, not dead-lettered",
    )
    # -- loss
    loss_type: str = env("OFFDPO_TRAINER_LOSS", "sigmoid", f"one of {', '.join(LOSS_TYPES)}")
    beta: float = env("OFFDPO_TRAINER_BETA", 0.1, "DPO beta (strength of the KL penalty to the reference)")
    label_smoothing: float = env(
        "OFFDPO_TRAINER_LABEL_SMOOTHING",
        0.0,
        "assumed label-flip rate (cDPO for sigmoid/simpo, Chowdhury et al. for robust)",
    )
    simpo_gamma: float = env("OFFDPO_TRAINER_SIMPO_GAMMA", 0.5, "simpo: target reward margin gamma")
    reference_free: bool = env("OFFDPO_TRAINER_REFERENCE_FREE", False, "ignore the reference log-probs (SimPO proper)")
    sft_weight: float = env("OFFDPO_TRAINER_SFT_WEIGHT", 0.0, "weight of the NLL-on-chosen term (RPO); 0: off")
    # -- optimisation
    lr: float = env("OFFDPO_TRAINER_LR", 1e-6, "peak learning rate (AdamW)")
    weight_decay: float = env("OFFDPO_TRAINER_WEIGHT_DECAY", 0.0, "AdamW weight decay")
    warmup_steps: int = env("OFFDPO_TRAINER_WARMUP_STEPS", 10, "linear warmup steps")
    min_lr_ratio: float = env("OFFDPO_TRAINER_MIN_LR_RATIO", 0.1, "cosine decays to lr * this")
    global_batch_size: int = env("OFFDPO_TRAINER_GLOBAL_BATCH", 32, "pairs per optimizer step, over all ranks")
    micro_batch_size: int = env(
        "OFFDPO_TRAINER_MICRO_BATCH", 4, "pairs per forward pass on one rank (accumulation fills the rest)"
    )
    max_grad_norm: float = env("OFFDPO_TRAINER_MAX_GRAD_NORM", 1.0, "gradient clipping (0: off)")
    max_length: int = env("OFFDPO_TRAINER_MAX_LENGTH", 2048, "max tokens of prompt + longer answer")
    truncation: str = env(
        "OFFDPO_TRAINER_TRUNCATION",
        "refuse",
        "over-long records: 'refuse' (error / dead-letter) or 'truncate_answers' (keep prompt, cut answers' tails)",
    )
    precision: str = env(
        "OFFDPO_TRAINER_PRECISION", "auto", "'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16' or 'fp32'"
    )
    gradient_checkpointing: bool = env(
        "OFFDPO_TRAINER_GRADIENT_CHECKPOINTING", False, "recompute activations in backward"
    )
    logprob_chunk_size: int = env(
        "OFFDPO_TRAINER_LOGPROB_CHUNK", 0, "cap on answer positions per LM-head chunk (0: only the byte size limits)"
    )
    # -- speed: batch layout, LM-head chunks, MFU (issue 19)
    logprob_chunk_bytes: int = env(
        "OFFDPO_TRAINER_LOGPROB_CHUNK_BYTES",
        128 << 20,
        "bytes of float32 logits per LM-head chunk (positions = bytes / (4 x vocabulary))",
    )
    share_prefix: bool = env(
        "OFFDPO_TRAINER_SHARE_PREFIX",
        True,
        "one sequence [prompt, chosen, rejected] per pair, the prompt computed once (arXiv 2410.20305)",
    )
    pack: bool = env(
        "OFFDPO_TRAINER_PACK", True, "padding-free: pack sequences into rows with per-segment positions and masks"
    )
    pack_mode: str = env(
        "OFFDPO_TRAINER_PACK_MODE",
        "mask",
        "'mask' (rows of several pairs, one forward; on the CPU each segment's attention is its own causal "
        "kernel call, services/trainer/attention.py, elsewhere a 4-D block mask) or 'segments' (each pair run "
        "on its own, causal kernel, rejected continues the prompt's cache)",
    )
    pack_row_tokens: int = env("OFFDPO_TRAINER_PACK_ROW_TOKENS", 4096, "mask mode: tokens per packed row (about)")
    # With a 4-D block mask sdpa's masked kernel computes every block (2-4x its causal kernel at 2,048
    # tokens), so the shared-prefix and packed layouts paid only where they saved many positions.
    # Measured on the 2-core CPU (bench-qwen-vocab, float32, unloaded): chat-like batches, 43% of the
    # padded layout saved, packed 1.11x the padded layout's tokens/s; uniform short answers, ~14% saved,
    # packed 0.86x. The default sits between the two. Since per-segment attention (issue 29) packed rows
    # cost no masked attention on the CPU (1.43x padded on chat-like pairs, loaded machine): this
    # threshold is to be measured again on an idle machine.
    layout_min_saving: float = env(
        "OFFDPO_TRAINER_LAYOUT_MIN_SAVING",
        0.25,
        "share prefixes / pack a micro-batch only where that computes at least this fraction fewer positions "
        "than the padded layout (else the padded layout, causal kernel); 0: always as configured",
    )
    micro_batch_tokens: int = env(
        "OFFDPO_TRAINER_MICRO_BATCH_TOKENS",
        0,
        "token budget per forward pass (replaces --micro-batch's pair count when > 0; a pair is never split)",
    )
    peak_gflops: float = env(
        "OFFDPO_TRAINER_PEAK_GFLOPS",
        0.0,
        "float32 GEMM ceiling for the logged MFU (0: measured at start-up with a short GEMM)",
    )
    distributed: str = env(
        "OFFDPO_TRAINER_DISTRIBUTED", "ddp", "under torchrun: 'ddp' (small models) or 'fsdp' (sharded)"
    )
    fsdp_mixed_precision: str = env(
        "OFFDPO_TRAINER_FSDP_MIXED_PRECISION",
        "auto",
        "FSDP: 'on' (bfloat16 parameters and compute, float32 gradient reduction and master weights), 'off' "
        "(float32), 'auto' (on for CUDA, off on the CPU)",
    )
    # -- LoRA (issue 28 item 5): adapters through peft (the `lora` extra), in services/trainer/lora.py
    lora_r: int = env(
        "OFFDPO_TRAINER_LORA_R",
        0,
        "LoRA rank: train only low-rank adapters on --lora-targets, the base weights frozen; checkpoints hold the "
        "adapters and their AdamW state (0: full fine-tuning; needs peft: pip install 'offdpo[lora]')",
    )
    lora_alpha: float = env("OFFDPO_TRAINER_LORA_ALPHA", 16.0, "LoRA: the adapters' update is scaled by alpha / r")
    lora_dropout: float = env(
        "OFFDPO_TRAINER_LORA_DROPOUT",
        0.0,
        "LoRA: dropout on the adapters' input (0: none; the reference log-probs were computed without dropout)",
    )
    lora_targets: tuple = env(
        "OFFDPO_TRAINER_LORA_TARGETS",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "LoRA: comma-separated names of the linear layers that get adapters (default: attention and MLP "
        "projections of Qwen2/Llama-shaped models)",
    )
    # -- sharded checkpoints (issue 28)
    checkpoint_format: str = env(
        "OFFDPO_TRAINER_CHECKPOINT_FORMAT",
        "auto",
        "'sharded' (each rank writes its own shard of weights and optimizer state with torch.distributed."
        "checkpoint; resumes at any world size), 'full' (rank 0 writes the whole state), 'auto' (sharded under "
        "FSDP, full otherwise)",
    )
    checkpoint_file_bytes: int = env(
        "OFFDPO_TRAINER_CHECKPOINT_FILE_BYTES",
        1 << 30,
        "sharded checkpoints: about this many bytes per file a rank writes and uploads (one file in memory at a time)",
    )
    export_shard_bytes: int = env(
        "OFFDPO_TRAINER_EXPORT_SHARD_BYTES",
        2 << 30,
        "sharded checkpoints: largest safetensors file of the exported model/ folder (rank 0 holds one at a time)",
    )
    save_dtype: str = env(
        "OFFDPO_TRAINER_SAVE_DTYPE",
        "bfloat16",
        "dtype of the exported model/ folder: bfloat16, float32 or float16 (the resumable state stays float32)",
    )
    # -- checkpoints and metrics
    save_every: int = env("OFFDPO_TRAINER_SAVE_EVERY", 100, "checkpoint every N optimizer steps (and at the end)")
    resume: bool = env("OFFDPO_TRAINER_RESUME", True, "resume from runs/<run_name>/latest when it exists")
    log_dir: str = env("OFFDPO_TRAINER_LOG_DIR", "runs", "local directory for <run_name>/metrics.jsonl and the plot")
    metrics_port: int = env("OFFDPO_TRAINER_METRICS_PORT", 0, "Prometheus port on rank 0 (0: off)")
    poll_timeout_ms: int = env("OFFDPO_TRAINER_POLL_MS", 1000, "continuous mode: Kafka poll timeout")
    # -- bounded memory
    max_poll_records: int = env(
        "OFFDPO_TRAINER_MAX_POLL_RECORDS",
        16,
        "continuous mode: shard-ready events taken per poll (each may stand for thousands of pairs)",
    )
    max_shard_bytes: int = env(
        "OFFDPO_TRAINER_MAX_SHARD_BYTES",
        MAX_SHARD_BYTES,
        "largest shard downloaded; a bigger one is refused (replay) or dead-lettered (continuous)",
    )
    shuffle_pairs: int = env(
        "OFFDPO_TRAINER_SHUFFLE_PAIRS",
        4096,
        "replay mode: pairs shuffled together in memory (shards are read a window of this many at a time)",
    )
    dedup_window: int = env(
        "OFFDPO_TRAINER_DEDUP_WINDOW",
        16384,
        "continuous mode: recent trained pair ids kept to drop the same pair arriving in another shard",
    )
    # -- evaluation
    eval_fraction: float = env(
        "OFFDPO_TRAINER_EVAL_FRACTION",
        0.0,
        "share of pairs held out for evaluation, chosen by pair-id hash; held-out pairs are never trained (0: off)",
    )
    eval_every: int = env("OFFDPO_TRAINER_EVAL_EVERY", 50, "evaluate the held-out pairs every N steps (and at the end)")
    eval_max_pairs: int = env(
        "OFFDPO_TRAINER_EVAL_MAX_PAIRS", 512, "held-out pairs kept for evaluation (the first ones seen)"
    )
    progress: bool = env("OFFDPO_TRAINER_PROGRESS", True, "show a progress bar on the terminal")
    # -- health (offdpo.health): readiness reports an outage the trainer is waiting out
    health_port: int = env(
        "OFFDPO_TRAINER_HEALTH_PORT",
        0,
        "plaintext grpc.health.v1 port (local rank 0 of each node; 0: off): service 'readiness' for kubelet's"
        " readiness probe; no liveness answer depends on S3 or Kafka",
    )
    outage_ready_s: float = env(
        "OFFDPO_TRAINER_OUTAGE_READY_S",
        120.0,
        "readiness turns NOT_SERVING after this long of continuous retrying of infrastructure trouble (S3 reads or"
        " checkpoint uploads, dead letters the broker does not acknowledge), SERVING again when it resumes (0: never)",
    )


CONFIG_CLASSES = (S3Config, KafkaConfig, TrainerConfig)
