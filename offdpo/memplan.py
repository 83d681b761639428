"""Memory planner: per-GPU bytes of the trainer and of refscore's vLLM engine, from a model's config.json.

Pure arithmetic over the config (no torch needed, so refscore can call `fits_vllm` before it loads
anything). What it counts, per rank:

trainer (AdamW; a model shaped like Qwen2 / Llama: RMSNorm, rotary attention with grouped KV heads,
SwiGLU MLP, an LM head that may be tied to the embeddings):
- weights, gradients, optimizer state: float32 master weights + float32 gradients + AdamW's two float32
  moments = 16 bytes per trainable parameter. With the bf16 mixed-precision policy (FSDP2
  `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`) the sharded parameters FSDP keeps
  are still float32: the bfloat16 copies exist only while a unit is gathered (see buffers).
  DDP holds all of it on every rank; FSDP full shard holds 1/world of it.
  LoRA (r): the base is frozen, in bfloat16 under bf16 precision (2 bytes per parameter) and float32
  otherwise (4; services/trainer/lora.py frozen_dtype), sharded under FSDP, and only the adapters
  A (r x in) and B (out x r) on q, k, v, o, gate, up and down projections train (16 bytes each).
- buffers: what the parallel wrapper adds. DDP: its gradient buckets (a float32 copy of every
  trainable gradient, world > 1) and, in bf16, autocast's cached bfloat16 weight copies. FSDP: the root
  unit (embeddings, final norm, LM head) stays gathered for the step (FSDP2 does not reshard the root
  after forward), plus two gathered decoder layers (the current one and the prefetched next) and one
  layer's unsharded gradients (compute dtype, then a float32 copy for the reduce-scatter).
- activations: what autograd keeps per token per decoder layer (inputs of every linear, RMSNorm's
  float32 intermediates, rotary q/k, attention output, SwiGLU's gate/up/product), for
  2 x micro-batch x seq tokens (each pair's chosen and rejected rows, the padded layout: an upper
  bound, prefix sharing and packing use fewer). With gradient checkpointing only each layer's input
  is kept, plus one layer recomputed in backward. The LM head runs in chunks of `chunk_bytes` of
  float32 logits (services/trainer/losses.py AnswerLogps, offdpo/logprobs.py), recomputed in backward:
  the logits in compute dtype, their float32 copy, logsumexp's temporary and the logits' gradient.
  Activation figures are estimates from the layer structure, not measured on a GPU.

refscore (vLLM, tensor-parallel size TP, pipeline size PP): weights / (TP x PP) per GPU, a runtime
reserve (CUDA graphs, NCCL, the profile run's activations, the prompt log-prob logits budget), and the
KV cache gets what is left of gpu_memory_utilization x memory; vLLM refuses to start unless the KV
cache holds at least one max_model_len sequence.

The state-bytes part is checked against a real AdamW step (`measured_vs_planned`, tests/test_memplan.py);
the activation part is an estimate.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from offdpo.errors import ConfigError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# services/trainer/losses.py DEFAULT_CHUNK_BYTES (OFFDPO_TRAINER_LOGPROB_CHUNK_BYTES); not imported: layers.
DEFAULT_CHUNK_BYTES = 128 << 20
# Kept free of the trainer's GPU memory: CUDA context, NCCL buffers, allocator fragmentation.
TRAINER_MARGIN = 0.15
# vLLM's memory outside weights and KV cache that the planner does not model token by token: CUDA graphs
# (~0.5-1 GiB), NCCL and the CUDA context (~0.5 GiB). An estimate, rounded up.
VLLM_RUNTIME_BYTES = 2 * GIB
# refscore's OFFDPO_REFSCORE_LOGITS_BUDGET_MB default (services/refscore/engines.py EngineSettings).
REFSCORE_LOGITS_BUDGET_BYTES = 512 << 20
# vLLM's default max_num_batched_tokens on a GPU (LLM class); refscore lowers it to the logits budget.
VLLM_GPU_BATCHED_TOKENS = 8192
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
# The layout refscore recommends keeps KV cache for this many max_model_len sequences (vLLM starts with
# one, but then serves one request at a time).
REFSCORE_MIN_SEQUENCES = 8


# -- the model ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The parts of a Qwen2 / Llama-shaped config.json that decide memory."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads
    attention_bias: bool = False  # Qwen2: q, k and v projections have biases
    dtype: str = "bfloat16"  # the checkpoint's dtype (torch_dtype), informational

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model config: hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_heads}; give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a parsed config.json (a multimodal config's `text_config` is used when the top level has none)."""
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "")}
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in config
        ]
        if missing:
            raise ConfigError(
                f"model config lacks {', '.join(missing)}: the planner reads Qwen2/Llama-shaped config.json files "
                "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, "
                "vocab_size)"
            )
        model_type = str(config.get("model_type", ""))
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config.get("head_dim") or 0),
            # Qwen2's config has no attention_bias key: its q/k/v projections always carry biases.
            attention_bias=bool(config.get("attention_bias", model_type.startswith("qwen2"))),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelShape:
        """From a model folder (its config.json) or a config.json file."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"no model config at {str(p)!r}: give a model folder with a config.json, or the file")
        try:
            config = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(p)!r} is not a readable JSON config: {exc}") from exc
        if not isinstance(config, dict):
            raise ConfigError(f"{str(p)!r}: a config.json holds one JSON object")
        return cls.from_config(config)

    # -- parameter counts
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim
        return attn + 3 * h * i + 2 * h  # + the two RMSNorm weights

    def root_params(self) -> int:
        """Embeddings, final norm and (untied) LM head: the parts outside the decoder layers."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self) -> int:
        return self.num_layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """Adapter parameters: A (r x in) + B (out x r) on each target projection of every layer."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ConfigError(f"LoRA targets {unknown}: the planner knows {', '.join(shapes)}")
        return self.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers, whole model."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB' (10^9), '141G' (GiB), '81920MiB', or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"memory size {text!r}: write it like 80GiB, 80GB, 141G or 81920MiB")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = " KMGT".index(prefix) if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024  # GB: decimal; GiB and a bare G: binary
    return int(number * base**power)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# -- the trainer --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainerEstimate:
    """Bytes on one rank for one layout."""

    strategy: str  # "ddp" or "fsdp"
    world: int
    precision: str  # "bf16" (mixed precision) or "fp32"
    checkpointing: bool
    micro_batch: int
    seq: int
    lora_r: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int

    @property
    def state(self) -> int:
        """Weights + gradients + optimizer state: what `measured_vs_planned` compares."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.buffers + self.activations

    def describe(self) -> str:
        what = "FSDP (full shard)" if self.strategy == "fsdp" else "DDP"
        if self.world == 1:
            what = "one GPU, no wrapper"
        parts = [
            f"{what} over {self.world} GPU{'s' if self.world > 1 else ''}",
            f"gradient checkpointing {'on' if self.checkpointing else 'off'}",
            f"micro-batch {self.micro_batch}",
            "bf16 mixed precision" if self.precision == "bf16" else "float32",
        ]
        if self.lora_r:
            parts.append(f"LoRA r={self.lora_r}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state, "total": self.total}


def _shard(n: int, world: int) -> int:
    """Per-rank bytes of `n` sharded on dim 0 over `world` ranks (FSDP pads to equal shards)."""
    return -(-n // world)


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    act_bytes: int,
    checkpointing: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Bytes autograd holds at the peak of backward for `tokens` positions in one forward pass.

    Per token per decoder layer, in the compute dtype (`act_bytes`): the two RMSNorm inputs, the q/k/v
    input, q, k and v and the rotary inputs, the attention output (o_proj's input), the MLP input, and
    SwiGLU's gate, up, silu(gate) and product (down_proj's input); the RMSNorms also keep float32 copies
    of their input and normalised output (HF casts to float32 inside). Attention is sdpa/flash: no
    [T x T] scores are kept.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.q_dim, shape.kv_dim
    saved = (
        2 * h  # inputs of the two RMSNorms (the residual stream)
        + h  # normed input of q/k/v
        + (q + 2 * kv)  # the q, k, v projections' outputs
        + (q + kv)  # q and k after rotation (sdpa's inputs)
        + q  # attention output = o_proj's input
        + h  # normed input of gate/up
        + 4 * i  # gate, up, silu(gate), silu(gate) * up
    )
    norms_fp32 = 2 * (4 * h + 4 * h)  # the two RMSNorms' float32 input and normalised output
    per_token_layer = act_bytes * saved + norms_fp32
    if act_bytes == 4:
        per_token_layer -= 2 * 4 * h  # in float32 the norm's cast of its input is the input itself
    layers = shape.num_layers
    if checkpointing:
        # each layer's input, plus one layer recomputed in full during its backward
        body = tokens * (layers * act_bytes * h + per_token_layer)
    else:
        body = tokens * layers * per_token_layer
    # final norm output (the head's input), its gradient, and the gradient flowing down the residual stream
    stream = tokens * h * (act_bytes * 3 + 4)
    positions = max(1, chunk_bytes // (4 * shape.vocab_size)) if chunk_bytes > 0 else tokens
    positions = min(positions, tokens)
    logits = positions * shape.vocab_size
    # logits in compute dtype, the float32 copy (none in float32), logsumexp's exp temporary, their gradient
    head = logits * (act_bytes + (4 if act_bytes != 4 else 0) + 4 + 4)
    return body + stream + head


def estimate_trainer(
    shape: ModelShape,
    *,
    world: int,
    strategy: str = "fsdp",
    precision: str = "bf16",
    checkpointing: bool = False,
    micro_batch: int = 1,
    seq: int = 4096,
    lora_r: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> TrainerEstimate:
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"strategy {strategy!r}: 'ddp' or 'fsdp'")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: 'bf16' or 'fp32'")
    if world < 1 or micro_batch < 1 or seq < 1 or lora_r < 0:
        raise ConfigError("world, micro-batch and seq must be >= 1, LoRA r >= 0")
    compute = 2 if precision == "bf16" else 4
    p = shape.params()
    sharded = strategy == "fsdp" and world > 1
    div = world if sharded else 1
    if lora_r:
        trainable = shape.lora_params(lora_r)
        base_bytes = (2 if precision == "bf16" else 4) * p  # frozen base: bfloat16 under bf16, else float32
    else:
        trainable = p
        base_bytes = 0
    # float32 master weights, float32 gradients, AdamW exp_avg + exp_avg_sq in float32
    weights = _shard(base_bytes, div) + _shard(4 * trainable, div)
    gradients = _shard(4 * trainable, div)
    optimizer = _shard(8 * trainable, div)

    buffers = 0
    if world > 1 and not sharded:
        buffers += 4 * trainable  # DDP's float32 gradient buckets (gradient_as_bucket_view=False)
    if not sharded and precision == "bf16" and not lora_r:
        buffers += 2 * p  # autocast's cached bfloat16 copies of the float32 weights, forward to backward
    if sharded:
        param_b = 2 if precision == "bf16" else 4
        root, layer = shape.root_params(), shape.layer_params()
        if lora_r:
            grads_root = grads_layer = 0  # frozen base: nothing to reduce but the (tiny) adapters
        else:
            g = param_b + (4 if param_b != 4 else 0)  # gradient in param dtype + float32 copy to reduce
            grads_root, grads_layer = g * root, g * layer
        buffers += param_b * root + max(2 * param_b * layer + grads_layer, grads_root)

    tokens = 2 * micro_batch * seq
    activations = activation_bytes(shape, tokens, compute, checkpointing, chunk_bytes)
    return TrainerEstimate(
        strategy=strategy if world > 1 else "ddp",
        world=world,
        precision=precision,
        checkpointing=checkpointing,
        micro_batch=micro_batch,
        seq=seq,
        lora_r=lora_r,
        trainable_params=trainable,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        buffers=buffers,
        activations=activations,
    )


# -- refscore (vLLM) ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitResult:
    """Whether a reference model fits vLLM at a layout; bytes are per GPU."""

    fits: bool
    tp: int
    pp: int
    dtype: str
    gpu_mem_bytes: int
    utilization: float
    weights_bytes: int  # this GPU's share of the weights (the fullest pipeline stage)
    reserve_bytes: int  # runtime, activations of the profile run, prompt log-prob logits
    available_bytes: int  # utilization x memory
    needed_bytes: int  # weights + reserve + one max_model_len sequence of KV cache
    kv_cache_bytes: int  # what is left for the KV cache (< 0: the weights alone do not fit)
    kv_tokens: int  # tokens of KV cache that fit on the layout
    max_model_len: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _layout_problem(shape: ModelShape, tp: int, pp: int) -> str:
    """vLLM's own checks on a layout, as a sentence ('' when valid)."""
    if tp < 1 or pp < 1:
        return f"tensor-parallel size {tp} and pipeline size {pp} must be >= 1"
    if shape.num_heads % tp:
        return f"num_attention_heads={shape.num_heads} is not divisible by tensor-parallel size {tp}"
    if shape.num_kv_heads >= tp and shape.num_kv_heads % tp:
        return f"num_key_value_heads={shape.num_kv_heads} is not divisible by tensor-parallel size {tp}"
    if shape.num_kv_heads < tp and tp % shape.num_kv_heads:
        return f"tensor-parallel size {tp} is not a multiple of num_key_value_heads={shape.num_kv_heads}"
    if pp > shape.num_layers:
        return f"pipeline size {pp} is more than the {shape.num_layers} layers"
    return ""


def fits_vllm(
    config: ModelShape | dict[str, Any],
    tp: int,
    pp: int,
    gpu_mem_bytes: int,
    utilization: float,
    dtype: str,
    *,
    max_model_len: int = 2048,
    logits_budget_bytes: int = REFSCORE_LOGITS_BUDGET_BYTES,
    max_batched_tokens: int = 0,
) -> FitResult:
    """Does the reference fit vLLM with tensor-parallel size `tp` and pipeline size `pp` on GPUs of
    `gpu_mem_bytes`? Per GPU: weights / (tp x pp) + a runtime reserve + the KV cache of at least one
    `max_model_len` sequence must fit `utilization` x memory (vLLM refuses to start otherwise).
    The message names the bytes needed, the bytes available and the settings to change."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    if not 0 < utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization {utilization:g}: must be in (0, 1]")
    b = DTYPE_BYTES[dtype]
    available = int(gpu_mem_bytes * utilization)
    problem = _layout_problem(shape, tp, pp)

    # Weights: TP splits every matrix (vocab-parallel embeddings and head included); PP gives each stage
    # ceil(layers / pp) layers, the first the embeddings and the last the head (both on one GPU if pp == 1).
    emb = shape.vocab_size * shape.hidden_size
    layers_here = -(-shape.num_layers // pp)
    if pp == 1:
        stage = shape.params()
    else:
        stage = layers_here * shape.layer_params() + emb + shape.hidden_size
    weights = stage * b // tp

    # refscore lowers max_num_batched_tokens until [tokens x vocab] float32 logits, their log-softmax and a
    # temporary fit the logits budget (services/refscore/engines.py); the profile run's activations scale
    # with it: the residual stream and norm outputs, q/k/v, the MLP's gate/up/product per token.
    rows = max(1, logits_budget_bytes // (shape.vocab_size * 4 * 3))
    batched = max_batched_tokens or (max(rows, 64) if rows < VLLM_GPU_BATCHED_TOKENS else VLLM_GPU_BATCHED_TOKENS)
    per_token = b * (4 * shape.hidden_size + (shape.q_dim + 2 * shape.kv_dim) // tp + 3 * shape.intermediate_size // tp)
    reserve = VLLM_RUNTIME_BYTES + batched * per_token + logits_budget_bytes

    kv_heads_here = max(1, shape.num_kv_heads // tp)  # fewer KV heads than TP ranks: vLLM replicates them
    kv_per_token = 2 * layers_here * kv_heads_here * shape.head_dim * b
    kv_cache = available - weights - reserve
    kv_tokens = max(0, kv_cache // kv_per_token)
    needed = weights + reserve + max_model_len * kv_per_token
    fits = not problem and kv_tokens >= max_model_len

    layout = f"tensor-parallel {tp} x pipeline {pp}, {dtype}, gpu_memory_utilization {utilization:g}"
    if problem:
        message = (
            f"layout not possible ({layout}): {problem}; set OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE to a divisor of "
            f"num_attention_heads={shape.num_heads}"
        )
    elif fits:
        message = (
            f"fits ({layout}): {gib(weights)} of weights and {gib(reserve)} reserved per GPU, {gib(kv_cache)} of KV "
            f"cache = {kv_tokens:,} tokens ({kv_tokens // max_model_len} sequences of {max_model_len})"
        )
    else:
        settings = [
            "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE (more GPUs per replica)",
            "OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE (more GPUs or nodes)",
        ]
        if utilization < 0.95:
            settings.append("OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION (higher, if the GPU is not shared)")
        if b > 2:
            settings.append("OFFDPO_REFSCORE_DTYPE=bfloat16")
        settings.append("OFFDPO_REFSCORE_MAX_MODEL_LEN (shorter sequences)")
        message = (
            f"does not fit ({layout}): needs {gib(needed)} per GPU ({gib(weights)} weights + {gib(reserve)} reserve + "
            f"{gib(max_model_len * kv_per_token)} KV cache for one {max_model_len}-token sequence), "
            f"have {gib(available)} ({utilization:g} x {gib(gpu_mem_bytes)}); change {', '.join(settings)}"
        )
    return FitResult(
        fits=fits,
        tp=tp,
        pp=pp,
        dtype=dtype,
        gpu_mem_bytes=gpu_mem_bytes,
        utilization=utilization,
        weights_bytes=weights,
        reserve_bytes=reserve,
        available_bytes=available,
        needed_bytes=needed,
        kv_cache_bytes=kv_cache,
        kv_tokens=kv_tokens,
        max_model_len=max_model_len,
        message=message,
    )


# -- the plan -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    model_params: int
    trainable_params: int
    gpus_per_node: int
    nodes: int
    gpu_mem_bytes: int
    usable_bytes: int  # per GPU for the trainer, after TRAINER_MARGIN
    trainer: list[TrainerEstimate]
    trainer_choice: TrainerEstimate | None
    trainer_advice: str
    refscore: list[FitResult]
    refscore_choice: FitResult | None
    refscore_advice: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_params": self.model_params,
            "trainable_params": self.trainable_params,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "gpu_mem_bytes": self.gpu_mem_bytes,
            "usable_bytes": self.usable_bytes,
            "trainer": [e.as_dict() for e in self.trainer],
            "trainer_choice": self.trainer_choice.as_dict() if self.trainer_choice else None,
            "trainer_advice": self.trainer_advice,
            "refscore": [f.as_dict() for f in self.refscore],
            "refscore_choice": self.refscore_choice.as_dict() if self.refscore_choice else None,
            "refscore_advice": self.refscore_advice,
        }


def _min_fsdp_gpus(shape: ModelShape, usable: int, **kw: Any) -> int | None:
    """Fewest GPUs over which FSDP (checkpointing on, micro-batch 1) fits, or None if none does (the
    unsharded activations and gathered units alone are over)."""
    for world in range(2, 4097):
        e = estimate_trainer(shape, world=world, strategy="fsdp", checkpointing=True, micro_batch=1, **kw)
        if e.total <= usable:
            return world
        if e.buffers + e.activations > usable:
            return None
    return None


def plan(
    shape: ModelShape,
    *,
    gpus: int,
    gpu_mem_bytes: int,
    nodes: int = 1,
    lora_r: int = 0,
    seq: int = 4096,
    micro_batch: int = 0,
    precision: str = "bf16",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ref_dtype: str = "bfloat16",
    ref_utilization: float = 0.9,
) -> Plan:
    """Every layout's bytes, and the one to use.

    Trainer: all gpus x nodes ranks train (data parallel over every GPU is the fastest use of them); the
    simplest layout that fits `usable_bytes` is chosen: DDP before FSDP (no gathers), checkpointing off
    before on (no recompute), then the largest micro-batch that fits (up to `micro_batch`, or 32).
    refscore: the smallest tensor-parallel size within a node (then pipeline stages over nodes) whose KV
    cache holds REFSCORE_MIN_SEQUENCES `seq`-token sequences (else at least one).
    """
    if gpus < 1 or nodes < 1:
        raise ConfigError("--gpus and --nodes must be >= 1")
    world = gpus * nodes
    usable = int(gpu_mem_bytes * (1 - TRAINER_MARGIN))
    kw: dict[str, Any] = {"precision": precision, "seq": seq, "lora_r": lora_r, "chunk_bytes": chunk_bytes}
    shown_mb = micro_batch or 1
    rows = [
        estimate_trainer(shape, world=world, strategy=s, checkpointing=c, micro_batch=shown_mb, **kw)
        for s in (("ddp", "fsdp") if world > 1 else ("ddp",))
        for c in (False, True)
    ]
    choice = None
    for s in ("ddp", "fsdp") if world > 1 else ("ddp",):
        for c in (False, True):
            sizes = [mb for mb in MICRO_BATCHES if mb <= (micro_batch or MICRO_BATCHES[-1])]
            if micro_batch and micro_batch not in sizes:
                sizes.append(micro_batch)
            fitting = [
                e
                for mb in sizes
                if (e := estimate_trainer(shape, world=world, strategy=s, checkpointing=c, micro_batch=mb, **kw)).total
                <= usable
            ]
            if fitting:
                choice = fitting[-1]
                break
        if choice:
            break
    if choice:
        advice = f"{choice.describe()}: {gib(choice.total)} of {gib(usable)} usable per GPU"
    else:
        strategy = "fsdp" if world > 1 else "ddp"
        smallest = estimate_trainer(shape, world=world, strategy=strategy, checkpointing=True, micro_batch=1, **kw)
        need = _min_fsdp_gpus(shape, usable, **kw)
        advice = (
            f"does not fit: needs {gib(smallest.total)} per GPU ({smallest.describe()}), have {gib(usable)} usable "
            f"({1 - TRAINER_MARGIN:.0%} of {gib(gpu_mem_bytes)})"
        )
        if need:
            advice += f"; FSDP fits from {need} GPUs"
        if not lora_r:
            advice += "; or train LoRA adapters (--lora 16)"
        if seq > 1024:
            advice += "; or shorter sequences (--seq)"

    layouts = [(tp, 1) for tp in (1, 2, 4, 8, 16) if tp <= gpus]
    layouts += [(layouts[-1][0], pp) for pp in range(2, nodes + 1)] if layouts else []
    fits = [
        fits_vllm(shape, tp, pp, gpu_mem_bytes, ref_utilization, ref_dtype, max_model_len=seq) for tp, pp in layouts
    ]
    ref_choice = next((f for f in fits if f.fits and f.kv_tokens >= REFSCORE_MIN_SEQUENCES * seq), None)
    ref_choice = ref_choice or next((f for f in fits if f.fits), None)
    if ref_choice:
        n = ref_choice.tp * ref_choice.pp
        ref_advice = (
            f"OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE={ref_choice.tp} OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE="
            f"{ref_choice.pp} ({n} GPU{'s' if n > 1 else ''} per replica): {ref_choice.message}"
        )
    else:
        ref_advice = fits[-1].message if fits else "no GPUs"
    return Plan(
        model_params=shape.params(),
        trainable_params=rows[0].trainable_params,
        gpus_per_node=gpus,
        nodes=nodes,
        gpu_mem_bytes=gpu_mem_bytes,
        usable_bytes=usable,
        trainer=rows,
        trainer_choice=choice,
        trainer_advice=advice,
        refscore=fits,
        refscore_choice=ref_choice,
        refscore_advice=ref_advice,
    )


def format_plan(p: Plan, shape: ModelShape) -> str:
    """The plan as readable tables (GiB per GPU)."""
    lines = [
        f"model: {p.model_params / 1e9:.2f}B parameters ({shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads, vocabulary {shape.vocab_size:,}"
        f"{', tied head' if shape.tie_word_embeddings else ''})",
        f"GPUs: {p.nodes} node(s) x {p.gpus_per_node} x {gib(p.gpu_mem_bytes)}; trainer may use {gib(p.usable_bytes)} "
        f"per GPU ({1 - TRAINER_MARGIN:.0%})",
    ]
    if p.trainable_params != p.model_params:
        lines.append(
            f"LoRA: {p.trainable_params / 1e6:.1f}M trainable parameters "
            f"({p.trainable_params / p.model_params:.2%} of the model)"
        )
    first = p.trainer[0]
    lines += [
        "",
        f"trainer, per GPU (GiB), micro-batch {first.micro_batch}, seq {first.seq}, "
        f"{'bf16 mixed precision' if first.precision == 'bf16' else 'float32'}:",
        f"  {'layout':<22}{'weights':>9}{'grads':>9}{'optim':>9}{'buffers':>9}{'activ.':>9}{'total':>9}  fits",
    ]
    for e in p.trainer:
        name = f"{e.strategy.upper()} x{e.world}, ckpt {'on' if e.checkpointing else 'off'}"
        cells = [e.weights, e.gradients, e.optimizer, e.buffers, e.activations, e.total]
        lines.append(
            f"  {name:<22}"
            + "".join(f"{c / GIB:>9.1f}" for c in cells)
            + f"  {'yes' if e.total <= p.usable_bytes else 'no'}"
        )
    lines += [f"  recommended: {p.trainer_advice}", ""]
    if p.refscore:
        r = p.refscore[0]
        lines.append(
            f"refscore (vLLM), per GPU (GiB), gpu_memory_utilization {r.utilization:g}, {r.dtype}, "
            f"max_model_len {r.max_model_len}:"
        )
    lines.append(f"  {'TP x PP':<10}{'weights':>9}{'reserve':>9}{'KV cache':>10}{'KV tokens':>12}  fits")
    for f in p.refscore:
        kv = f"{f.kv_cache_bytes / GIB:>10.1f}"
        lines.append(
            f"  {f'{f.tp} x {f.pp}':<10}{f.weights_bytes / GIB:>9.1f}{f.reserve_bytes / GIB:>9.1f}{kv}"
            f"{f.kv_tokens:>12,}  {'yes' if f.fits else 'no'}"
        )
    lines.append(f"  recommended: {p.refscore_advice}")
    return "\n".join(lines)


# -- the planner against a real optimizer step --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes one rank holds in parameters, gradients and optimizer state (storage-deduplicated)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def measure_state_bytes(module: Any, optimizer: Any) -> StateBytes:
    """Sum of the storage bytes of `module`'s parameters, their gradients and `optimizer`'s state tensors,
    each storage counted once (tied weights share one); an FSDP2 DTensor counts its local shard."""
    seen: set[int] = set()

    def nbytes(t: Any) -> int:
        if t is None or not hasattr(t, "untyped_storage"):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return int(storage.nbytes())

    params = list(module.parameters())
    p = sum(nbytes(x) for x in params)
    g = sum(nbytes(x.grad) for x in params)
    o = sum(nbytes(v) for state in optimizer.state.values() for v in state.values())
    return StateBytes(p, g, o)


@dataclasses.dataclass(frozen=True)
class Comparison:
    measured: StateBytes
    planned: TrainerEstimate
    rel_error: float  # |planned state - measured| / measured

    def as_dict(self) -> dict[str, Any]:
        return {
            "measured": {**dataclasses.asdict(self.measured), "total": self.measured.total},
            "planned": self.planned.as_dict(),
            "rel_error": self.rel_error,
        }


def measured_vs_planned(
    config: ModelShape | dict[str, Any],
    measured: StateBytes | None = None,
    *,
    world: int = 1,
    strategy: str = "ddp",
    precision: str = "fp32",
    lora_r: int = 0,
    seed: int = 0,
) -> Comparison:
    """The planner's per-rank state bytes against measured ones.

    `measured`: what a rank of a real run holds after an optimizer step (`measure_state_bytes`; e.g.
    bench/scale.py per FSDP rank). None: build the model in memory here (transformers, random float32
    weights, Qwen2 or Llama as `config` says), run one forward, backward and AdamW step on the CPU, and
    measure that (world 1, float32, full fine-tuning only).
    """
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    if measured is None:
        if world != 1 or precision != "fp32" or lora_r:
            raise ConfigError("measured_vs_planned builds and measures only world 1, fp32, full fine-tuning")
        measured = _measure_one_step(shape, seed)
    planned = estimate_trainer(shape, world=world, strategy=strategy, precision=precision, lora_r=lora_r)
    return Comparison(measured, planned, abs(planned.state - measured.total) / measured.total)


def _measure_one_step(shape: ModelShape, seed: int) -> StateBytes:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "head_dim": shape.head_dim,
    }
    # Qwen2: biases on q, k and v; Llama without biases (Llama's attention_bias would add o_proj's too)
    cfg = Qwen2Config(**kwargs) if shape.attention_bias else LlamaConfig(**kwargs)
    model = AutoModelForCausalLM.from_config(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return measure_state_bytes(model, opt)
