"""refscore settings: environment variables (`offdpo config` lists them with their defaults), a `--config`
file (CONFIG_FILE) and flags of the same names."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from offdpo.config import ConfigError, ConfigFile, EnvConfig, KafkaConfig, S3Config, env

ENGINES = ("vllm", "transformers")  # services/refscore/engines.py load_engine
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, repr=False)
class RefscoreConfig(EnvConfig):
    model_dir: str = env(
        "OFFDPO_REFSCORE_MODEL_DIR",
        "models/tiny",
        "Hugging Face model directory of the reference model, or a trainer checkpoint in S3"
        " (s3://<bucket>/runs/<run>/checkpoints/step-<N>/model/, downloaded once into OFFDPO_REFSCORE_MODEL_CACHE)",
    )
    extra_model_dirs: tuple[str, ...] = env(
        "OFFDPO_REFSCORE_EXTRA_MODEL_DIRS",
        (),
        "comma-separated further reference models served beside OFFDPO_REFSCORE_MODEL_DIR (each a folder or an"
        " s3:// checkpoint like it; empty: one model), each on an engine of its own with the same settings;"
        " requests pick one by expected_fingerprint_id (empty: MODEL_DIR's). vLLM: (1 + their number) x"
        " OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION must stay <= 0.95. The stream worker scores with MODEL_DIR's only",
    )
    model_cache: str = env(
        "OFFDPO_REFSCORE_MODEL_CACHE",
        "",
        "local folder for models downloaded from S3, one sub-folder per object listing (default: <tmp>/offdpo-refscore-models)",
    )
    model_id: str = env(
        "OFFDPO_REFSCORE_MODEL_ID", "", "name recorded in the fingerprint (default: the directory name)"
    )
    engine: str = env("OFFDPO_REFSCORE_ENGINE", "vllm", "vllm or transformers")
    dtype: str = env("OFFDPO_REFSCORE_DTYPE", "float32", "float32, bfloat16 or float16")
    max_model_len: int = env("OFFDPO_REFSCORE_MAX_MODEL_LEN", 2048, "longest prompt+answer in tokens")
    gpu_memory_utilization: float = env(
        "OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION", 0.0, "vLLM memory fraction (0 = 0.9 on GPU, 0.15 of RAM on CPU)"
    )
    tensor_parallel_size: int = env(
        "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE",
        1,
        "vllm: GPUs each layer is split over (a reference larger than one GPU); `offdpo plan` says how many",
    )
    pipeline_parallel_size: int = env(
        "OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE",
        1,
        "vllm: stages the layers are split into (GPUs = tensor x pipeline parallel size)",
    )
    host: str = env("OFFDPO_REFSCORE_HOST", "127.0.0.1", "gRPC listen address (0.0.0.0 in a pod)")
    port: int = env("OFFDPO_REFSCORE_PORT", 50051, "gRPC port")
    metrics_port: int = env("OFFDPO_REFSCORE_METRICS_PORT", 9400, "Prometheus metrics port (0 = off)")
    http_port: int = env(
        "OFFDPO_REFSCORE_HTTP_PORT",
        0,
        "OpenAI-compatible HTTP port (POST /v1/completions with echo/logprobs/prompt_logprobs, GET /v1/models)"
        " on the same engines, team tokens, quotas and TLS as gRPC (services/refscore/http_door.py; 0 = off)",
    )
    max_message_bytes: int = env("OFFDPO_REFSCORE_MAX_MESSAGE_BYTES", 16 * 1024 * 1024, "largest gRPC message")
    max_items_per_request: int = env("OFFDPO_REFSCORE_MAX_ITEMS", 1024, "most items in one Score request")
    max_tokens_per_request: int = env(
        "OFFDPO_REFSCORE_MAX_REQUEST_TOKENS", 1 << 20, "most prompt+answer tokens in one Score request"
    )
    max_generate_n: int = env("OFFDPO_REFSCORE_MAX_GENERATE_N", 16, "most samples in one Generate request")
    max_generate_tokens: int = env("OFFDPO_REFSCORE_MAX_GENERATE_TOKENS", 1024, "largest Generate max_tokens")
    engine_batch_tokens: int = env(
        "OFFDPO_REFSCORE_ENGINE_BATCH_TOKENS",
        65536,
        "tokens the engine thread gathers from queued requests into one engine call",
    )
    # Engine settings (README "Engine settings"; GetModelInfo.engine_settings reads them back from the engine).
    cpu_threads: int = env(
        "OFFDPO_REFSCORE_CPU_THREADS",
        0,
        "CPU only: compute threads, bound to the first N usable cores (0 = every usable core not reserved)",
    )
    cpu_reserved_cores: int = env(
        "OFFDPO_REFSCORE_CPU_RESERVED_CORES",
        0,
        "CPU only: cores kept free of compute threads (vLLM's default is 1, which "
        "halves a 2-core host; the engine is the only heavy user here)",
    )
    max_batched_tokens: int = env(
        "OFFDPO_REFSCORE_MAX_BATCHED_TOKENS",
        0,
        "vLLM: most tokens in one engine step (0 = vLLM's default, 4096 on CPU)",
    )
    max_num_seqs: int = env("OFFDPO_REFSCORE_MAX_NUM_SEQS", 0, "vLLM: most sequences in one step (0 = vLLM's default)")
    transformers_batch_tokens: int = env(
        "OFFDPO_REFSCORE_TRANSFORMERS_BATCH_TOKENS", 16384, "transformers engine: padded tokens in one forward pass"
    )
    logprob_chunk_tokens: int = env(
        "OFFDPO_REFSCORE_LOGPROB_CHUNK_TOKENS",
        0,
        "transformers engine: positions per log-softmax chunk (0 = what OFFDPO_REFSCORE_LOGITS_BUDGET_MB allows)",
    )
    logits_budget_mb: int = env(
        "OFFDPO_REFSCORE_LOGITS_BUDGET_MB",
        512,
        "memory for the [positions x vocab] float32 logits of one log-prob pass (with their log-softmax):"
        " sets the transformers engine's chunk and caps vLLM's tokens per step on large vocabularies",
    )
    share_prompts: bool = env(
        "OFFDPO_REFSCORE_SHARE_PROMPTS",
        True,
        "vLLM: compute a prompt that a pair's answers share once (prefix cache read by the second answer only)",
    )
    # Security (services/refscore/security/). Serving needs TLS or an explicit PLAINTEXT=true, and
    # an auth file or an explicit ALLOW_ANONYMOUS=true: neither is ever off by accident.
    tls_cert: str = env("OFFDPO_REFSCORE_TLS_CERT", "", "PEM server certificate (chain) file: gRPC over TLS")
    tls_key: str = env("OFFDPO_REFSCORE_TLS_KEY", "", "PEM private key file of the server certificate")
    tls_client_ca: str = env(
        "OFFDPO_REFSCORE_TLS_CLIENT_CA",
        "",
        "PEM CA bundle file: set it for mutual TLS (every client must present a certificate it signed)",
    )
    plaintext: bool = env(
        "OFFDPO_REFSCORE_PLAINTEXT", False, "serve gRPC without TLS (local development only; logs a warning)"
    )
    auth_file: str = env(
        "OFFDPO_REFSCORE_AUTH_FILE",
        "",
        "YAML/JSON file (from a Secret) of teams: sha256 token hashes, allowed methods/models, quotas",
    )
    allow_anonymous: bool = env(
        "OFFDPO_REFSCORE_ALLOW_ANONYMOUS",
        False,
        "without an auth file, accept callers without a token (local development only; logs a warning)",
    )
    health_port: int = env(
        "OFFDPO_REFSCORE_HEALTH_PORT",
        0,
        "plaintext port serving only grpc.health.v1, for kubelet gRPC probes (0 = off)",
    )
    grace_s: float = env("OFFDPO_REFSCORE_GRACE_S", 30.0, "on SIGTERM, time given to in-flight work")
    # Stream worker
    worker_enabled: bool = env("OFFDPO_REFSCORE_WORKER", False, "also run the Kafka stream worker in this process")
    group_id: str = env("OFFDPO_REFSCORE_GROUP", "offdpo-refscore", "Kafka consumer group of the stream workers")
    batch_pairs: int = env(
        "OFFDPO_REFSCORE_BATCH_PAIRS", 256, "most pairs in one micro-batch (and one shard per partition)"
    )
    batch_tokens: int = env("OFFDPO_REFSCORE_BATCH_TOKENS", 262144, "most tokens (estimated) in one micro-batch")
    batch_wait_s: float = env("OFFDPO_REFSCORE_BATCH_WAIT_S", 2.0, "longest wait to fill a micro-batch")
    stall_s: float = env(
        "OFFDPO_REFSCORE_STALL_S",
        600.0,
        "watchdog: the engine inside one call, or the stream worker not back round its loop, for this long"
        " (or either thread dead) makes health NOT_SERVING and the process exit 1 so the pod restarts;"
        " also the longest the worker waits for one engine answer",
    )
    failpoint: str = env(
        "OFFDPO_REFSCORE_FAILPOINT",
        "",
        "fault injection for tests: 'after_shard_write' / 'before_commit' SIGKILL the worker before its"
        " commit; 'engine_thread_dies' ends the engine thread at its first job; 'engine_hangs' never returns"
        " from the first engine call",
    )

    def __post_init__(self) -> None:
        # Refused at start-up, one line: otherwise the engine's load fails after the port has opened.
        if self.engine not in ENGINES:
            raise ConfigError(f"OFFDPO_REFSCORE_ENGINE={self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"OFFDPO_REFSCORE_DTYPE={self.dtype!r}: expected one of {', '.join(DTYPES)}")

    def engine_settings(self):
        """The engine knobs, validated (a bad value is a ConfigError naming the variable)."""
        from services.refscore.engines import EngineSettings

        try:
            return EngineSettings(
                cpu_threads=self.cpu_threads,
                cpu_reserved_cores=self.cpu_reserved_cores,
                max_batched_tokens=self.max_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                transformers_batch_tokens=self.transformers_batch_tokens,
                logprob_chunk_tokens=self.logprob_chunk_tokens,
                logits_budget_mb=self.logits_budget_mb,
                share_prompts=self.share_prompts,
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def model_configs(self, on_gpu: bool | None = None) -> list[RefscoreConfig]:
        """One config per reference model served: this one (OFFDPO_REFSCORE_MODEL_DIR, the primary) first,
        then one per OFFDPO_REFSCORE_EXTRA_MODEL_DIRS entry, in order. An extra model gets the same engine
        settings, its own model_dir and model_id "" (its fingerprint names its own model, not the primary's
        OFFDPO_REFSCORE_MODEL_ID). ConfigError when they cannot all be served (`check_reference_memory`)."""
        check_reference_memory(self, on_gpu)
        return [
            self,
            *(dataclasses.replace(self, model_dir=d, model_id="", extra_model_dirs=()) for d in self.extra_model_dirs),
        ]


# vLLM reserves its OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION fraction per engine, so the engines of every
# served model together may claim at most this much (the rest: CUDA context, activations, fragmentation).
MAX_TOTAL_MEMORY_FRACTION = 0.95
VLLM_DEFAULT_FRACTION = {True: 0.9, False: 0.15}  # GPU / CPU, as services/refscore/engines.py applies them


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or no driver: not a GPU
        return False


def check_reference_memory(cfg: RefscoreConfig, on_gpu: bool | None = None) -> None:
    """Refuse, at start-up, a set of reference models this process cannot serve at once.

    - The same model listed twice (OFFDPO_REFSCORE_MODEL_DIR and OFFDPO_REFSCORE_EXTRA_MODEL_DIRS): two
      engines with one fingerprint, which no request could tell apart.
    - The vllm engine: each engine pre-allocates its OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION fraction, so
      (1 + extras) x that fraction must stay <= 0.95. On a GPU the fraction is of GPU memory (the default 0
      means 0.9, so serving a second model needs the setting lowered explicitly). On the CPU backend vLLM
      reads the same setting as the fraction of host RAM each engine reserves for its KV cache (and refuses
      to start when it is not free: vllm/v1/worker/cpu_worker.py), so the same bound applies there (the
      default 0 means 0.15: up to six models); the weights come on top, in RAM, as on one model.
    - The transformers engine reserves nothing up front (weights plus one batch's activations, bounded by
      OFFDPO_REFSCORE_TRANSFORMERS_BATCH_TOKENS and OFFDPO_REFSCORE_LOGITS_BUDGET_MB): no bound here; a
      model that does not fit fails its load, and health never becomes SERVING.

    `on_gpu`: None = ask torch (only needed when the fraction is the default 0).
    """
    dirs = [cfg.model_dir, *cfg.extra_model_dirs]
    seen: set[str] = set()
    for d in dirs:
        if d.rstrip("/") in seen:
            raise ConfigError(
                f"reference model {d!r} is listed twice (OFFDPO_REFSCORE_MODEL_DIR and OFFDPO_REFSCORE_EXTRA_MODEL_DIRS):"
                " every served model must be another one"
            )
        seen.add(d.rstrip("/"))
    if any(not d.strip() for d in dirs):
        raise ConfigError("OFFDPO_REFSCORE_MODEL_DIR and each OFFDPO_REFSCORE_EXTRA_MODEL_DIRS entry must be non-empty")
    n = len(dirs)
    if n == 1 or cfg.engine != "vllm":
        return
    fraction = cfg.gpu_memory_utilization
    where = ""
    if not fraction:
        gpu = _cuda_available() if on_gpu is None else on_gpu
        fraction = VLLM_DEFAULT_FRACTION[gpu]
        where = f" (0 = the default, {fraction:g} on {'a GPU' if gpu else 'the CPU'})"
    total = n * fraction
    if total > MAX_TOTAL_MEMORY_FRACTION + 1e-9:
        most = math.floor(MAX_TOTAL_MEMORY_FRACTION / n * 100) / 100
        raise ConfigError(
            f"{n} reference models (OFFDPO_REFSCORE_MODEL_DIR + {n - 1} in OFFDPO_REFSCORE_EXTRA_MODEL_DIRS) x "
            f"OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION={cfg.gpu_memory_utilization:g}{where} = {total:.2f} of the "
            f"memory, more than {MAX_TOTAL_MEMORY_FRACTION:g}: set OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION to at most "
            f"{most:g} or serve fewer models"
        )


def check_fits_gpus(
    cfg: RefscoreConfig, model_dir: str | Path, gpu_mem_bytes: int | None = None, gpus: int | None = None
) -> None:
    """Refuse, at start-up, a vllm reference that cannot fit the GPUs its layout splits it over, with the
    bytes needed, the bytes available and the settings to change (offdpo.memplan.fits_vllm reads only
    config.json), instead of an out-of-memory error minutes into loading. `gpu_mem_bytes`/`gpus`: one
    GPU's memory and the GPUs visible (None: ask torch; on the CPU backend nothing is checked here)."""
    from offdpo.memplan import ModelShape, fits_vllm

    if gpu_mem_bytes is None:
        if not _cuda_available():
            return
        import torch

        gpu_mem_bytes = torch.cuda.get_device_properties(0).total_memory
        gpus = torch.cuda.device_count()
    needed = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    if gpus is not None and gpus < needed:
        raise ConfigError(
            f"OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE={cfg.tensor_parallel_size} x OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE="
            f"{cfg.pipeline_parallel_size} needs {needed} GPUs; {gpus} visible to this process (give the pod "
            f"{needed} GPUs: nvidia.com/gpu in deploy/components/gpu)"
        )
    result = fits_vllm(
        ModelShape.load(model_dir),
        cfg.tensor_parallel_size,
        cfg.pipeline_parallel_size,
        gpu_mem_bytes,
        cfg.gpu_memory_utilization or VLLM_DEFAULT_FRACTION[True],
        cfg.dtype,
        max_model_len=cfg.max_model_len,
    )
    if not result.fits:
        raise ConfigError(f"reference {model_dir}: {result.message}")


@dataclasses.dataclass(frozen=True, repr=False)
class RefscoreQuotaConfig(EnvConfig):
    """Quotas across replicas (offdpo/grpc_auth/quotas.py): deploy sets it to the autoscaler's
    maxReplicas (components/autoscaling), 1 without it."""

    replicas: int = env(
        "OFFDPO_REFSCORE_REPLICAS",
        1,
        "most refscore replicas serving at once (the autoscaler's maximum): each enforces 1/N of every"
        " team's max_concurrent and tokens_per_minute, so a team's quota holds across all of them",
    )

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"OFFDPO_REFSCORE_REPLICAS={self.replicas} must be >= 1")


CONFIG_CLASSES = (S3Config, KafkaConfig, RefscoreConfig, RefscoreQuotaConfig)

# `serve`/`worker --config FILE` (issue 32): refscore's own settings at the top level, as the trainer's file.
CONFIG_FILE = ConfigFile(
    service="refscore",
    top=RefscoreConfig,
    sections={"kafka": KafkaConfig, "s3": S3Config, "quota": RefscoreQuotaConfig},
    listing="`python -m services.refscore serve --print-config` (or `offdpo refscore serve --print-config`)",
)
