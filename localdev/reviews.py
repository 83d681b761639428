"""A synthetic film-review language for the controlled-sentiment experiment (DPO paper, section 6.1,
in miniature): small enough that a ~0.5M-parameter model learns it in minutes on a CPU, rich enough
that "make the continuation positive" is a real preference to learn.

The language
- About 300 words: 30 positive and 30 negative adjectives, film nouns, intensifying adverbs, neutral
  adjectives, neutral fillers (names, places, days, genres), a few sentiment verbs and verdicts
  ("loved", "hated", "skip it") and function words. Every token of a review is a lowercase word or
  one of the punctuation marks "." and ",", separated by single spaces.
- A review has a hidden polarity (positive or negative, equally likely) and 2-5 sentences. The first
  sentence is always neutral (no polar adjective): it is the *opening*, which becomes the prompt, so a
  continuation's sentiment is open and a reference model that learned the language writes positive
  continuations about half of the time. The rest (the *continuation*, the answer the model writes)
  holds at least one sentence with polar adjectives; each polar adjective agrees with the review's
  polarity with probability `AGREE_PROB` (0.9) and is drawn from the other polarity otherwise.
  `MARKED_SHARE` of the polar sentences also hold a sentiment verb or verdict that always agrees
  (why they are needed: the comment above POSITIVE_VERBS).

The ground truth
- `reward(text)` = (positive adjectives - negative adjectives) / words, where words are the runs of
  letters (punctuation is not a word). Only the 60 polar adjectives count, as in a lexicon scorer.
  This is the exact rule evaluation uses.
- `is_positive(text)`: reward > 0 (more positive than negative adjectives; a tie is not positive).
- `sentiment_consistent(text)`: at least one polar adjective and all polar adjectives of one polarity.
  The corpus's own figure (`corpus_consistency`) is about 0.78 with `AGREE_PROB` 0.9 (a review with n
  polar adjectives is consistent with probability 0.9^n + 0.1^n); a model that places adjectives
  without tracking the review's polarity scores about 0.43 on the same adjective counts (0.5^(n-1)),
  so the figure tells whether a model learned the language's long-range agreement.
- The corpus's positive share is about 0.47 (0.91 of the positive reviews, 0.03 of the negative ones).

Everything is deterministic given a seed (`random.Random(seed)`, no global state).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AGREE_PROB = 0.9  # probability that a polar adjective agrees with its review's hidden polarity
HELD_OUT_PERCENT = 20  # share of openings (by hash) reserved for evaluation prompts
NEUTRAL_IN_CONTINUATION = 0.1  # chance that a continuation sentence (other than the one polar) is neutral
MARKED_SHARE = 0.4  # chance that a polar sentence also carries a sentiment verb or verdict

POSITIVE = [
    "great",
    "wonderful",
    "brilliant",
    "excellent",
    "superb",
    "moving",
    "beautiful",
    "charming",
    "delightful",
    "gripping",
    "clever",
    "funny",
    "touching",
    "stunning",
    "powerful",
    "fresh",
    "fantastic",
    "amazing",
    "enjoyable",
    "inspired",
    "memorable",
    "lovely",
    "smart",
    "warm",
    "thrilling",
    "elegant",
    "perfect",
    "solid",
    "engaging",
    "magnificent",
]
NEGATIVE = [
    "terrible",
    "awful",
    "boring",
    "dull",
    "bad",
    "weak",
    "clumsy",
    "tedious",
    "bland",
    "messy",
    "poor",
    "silly",
    "lazy",
    "predictable",
    "forgettable",
    "painful",
    "horrible",
    "dreadful",
    "shallow",
    "flat",
    "stale",
    "confusing",
    "pointless",
    "annoying",
    "cheap",
    "awkward",
    "lifeless",
    "sloppy",
    "tiresome",
    "mediocre",
]
# Adjectives without sentiment: the model must learn that only the polar lists count.
NEUTRAL_ADJ = [
    "long",
    "short",
    "new",
    "old",
    "quiet",
    "loud",
    "slow",
    "fast",
    "dark",
    "bright",
    "simple",
    "serious",
    "strange",
    "familiar",
    "modern",
    "small",
]

NOUNS = [
    "film",
    "movie",
    "plot",
    "story",
    "acting",
    "music",
    "score",
    "soundtrack",
    "ending",
    "script",
    "dialogue",
    "direction",
    "pacing",
    "cinematography",
    "editing",
    "lead",
    "villain",
    "hero",
    "premise",
    "finale",
    "camera",
    "work",
    "humour",
    "tone",
    "setting",
]
PLURAL_NOUNS = [
    "characters",
    "actors",
    "effects",
    "songs",
    "jokes",
    "scenes",
    "costumes",
    "visuals",
    "performances",
    "twists",
]
ADVERBS = [
    "very",
    "really",
    "truly",
    "quite",
    "rather",
    "so",
    "extremely",
    "pretty",
    "fairly",
    "incredibly",
    "genuinely",
    "simply",
    "utterly",
    "deeply",
    "remarkably",
]
GENRES = ["drama", "comedy", "thriller", "western", "musical", "documentary", "romance", "mystery", "fantasy", "biopic"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
RELATIONS = [
    "friend",
    "sister",
    "brother",
    "mother",
    "father",
    "wife",
    "husband",
    "son",
    "daughter",
    "cousin",
    "neighbour",
    "uncle",
]
CHARACTERS = [
    "teacher",
    "soldier",
    "detective",
    "farmer",
    "doctor",
    "singer",
    "pilot",
    "lawyer",
    "painter",
    "sailor",
    "nurse",
    "student",
    "chef",
    "thief",
    "king",
    "widow",
]
PLACE_LIST = [
    "paris",
    "london",
    "tokyo",
    "rome",
    "berlin",
    "madrid",
    "cairo",
    "lisbon",
    "vienna",
    "dublin",
    "chicago",
] + [
    "a small town",
    "the desert",
    "a village",
    "the mountains",
    "a prison",
    "a farm",
    "a hospital",
    "an island",
]
NAMES = [
    "anna",
    "ben",
    "carla",
    "david",
    "elena",
    "frank",
    "grace",
    "hugo",
    "iris",
    "jack",
    "kate",
    "leo",
    "maria",
    "nick",
    "olga",
    "peter",
    "rosa",
    "sam",
    "tom",
    "vera",
]
DURATIONS = ["ninety minutes", "two hours", "three hours", "an hour and a half", "two and a half hours"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "latest", "newest", "last"]
TIMES = ["last week", "yesterday", "last night", "on a plane", "at home", "in the cinema", "twice", "last month"]

# Sentiment outside the adjectives, always agreeing with the hidden polarity. The ground-truth rule
# ignores them (it counts adjectives only, like a lexicon scorer), but they matter for learning: in
# their absence positive and negative adjectives are exchangeable in every local context, and a small
# model trained for minutes stays at the symmetric solution (measured: no agreement at all after 1,600
# steps). With them, the adjectives' polarity is visible locally and the long-range agreement follows.
POSITIVE_VERBS = ["loved", "enjoyed", "liked", "adored", "admired"]
NEGATIVE_VERBS = ["hated", "disliked", "endured", "regretted", "resented"]
POSITIVE_VERDICTS = ["i recommend it", "see it", "i would watch it again", "worth every minute"]
NEGATIVE_VERDICTS = ["avoid it", "skip it", "i want my money back", "a waste of time"]

POSITIVE_SET = frozenset(POSITIVE)
NEGATIVE_SET = frozenset(NEGATIVE)
_WORD = re.compile(r"[a-z]+")
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba ([aeiou])")

# Neutral sentences: the opening of every review, and occasional filler later on.
_NEUTRAL_TEMPLATES = (
    "i watched this {genre} {time} .",
    "i saw the {genre} with my {relation} on {day} .",
    "the film is about a {character} in {place} .",
    "it was directed by {name} .",
    "{name} plays a {character} who lives in {place} .",
    "the story takes place in {place} .",
    "i went to see it on {day} with my {relation} .",
    "it runs for {duration} .",
    "this is the {ordinal} film by {name} .",
    "it is a {nadj} {genre} about a {character} .",
    "my {relation} and i watched it {time} .",
    "{name} wrote the script and {name} did the music .",
)
# Sentences with polar adjective slots ({adj}); each slot is filled independently.
_POLAR_TEMPLATES = (
    "the {noun} was {adj} .",
    "the {plural} were {adj} .",
    "i found the {noun} {adj} and {adj} .",
    "{adv} {adj} {noun} .",
    "the {noun} was {adv} {adj} .",
    "it is a {adj} {genre} with a {adj} {noun} .",
    "overall a {adj} {genre} .",
    "{name} gave a {adj} performance .",
    "the {noun} felt {adj} , and the {plural} were {adj} .",
    "i would call it {adj} .",
    "my {relation} thought it was {adv} {adj} .",
    "a {adj} {noun} and {adj} {plural} .",
    "the {nadj} {noun} was {adj} .",
)
# Polar sentences that also carry a sentiment verb or verdict ({verb}, {verdict}: see above).
_MARKED_TEMPLATES = (
    "i {verb} the {noun} , it was {adj} .",
    "i {verb} the {plural} , they were {adj} .",
    "{adv} {adj} {noun} , {verdict} .",
    "a {adj} {genre} , {verdict} .",
    "i {verb} this {adj} {genre} .",
)


@dataclass(frozen=True)
class Review:
    """One review: a neutral opening (the prompt) and the continuation (the answer)."""

    opening: str
    continuation: str
    positive: bool  # the hidden polarity the adjectives were drawn to agree with

    @property
    def text(self) -> str:
        return f"{self.opening} {self.continuation}"


def _fill(template: str, rng: random.Random, positive: bool) -> str:
    """Fill a template's slots left to right, one draw each (two {adj} slots get two draws)."""

    def adjective() -> str:
        agree = rng.random() < AGREE_PROB
        return rng.choice(POSITIVE if agree == positive else NEGATIVE)

    fillers = {
        "adj": adjective,
        "noun": lambda: rng.choice(NOUNS),
        "plural": lambda: rng.choice(PLURAL_NOUNS),
        "adv": lambda: rng.choice(ADVERBS),
        "genre": lambda: rng.choice(GENRES),
        "day": lambda: rng.choice(DAYS),
        "relation": lambda: rng.choice(RELATIONS),
        "character": lambda: rng.choice(CHARACTERS),
        "place": lambda: rng.choice(PLACE_LIST),
        "name": lambda: rng.choice(NAMES),
        "duration": lambda: rng.choice(DURATIONS),
        "ordinal": lambda: rng.choice(ORDINALS),
        "nadj": lambda: rng.choice(NEUTRAL_ADJ),
        "time": lambda: rng.choice(TIMES),
        "verb": lambda: rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS),
        "verdict": lambda: rng.choice(POSITIVE_VERDICTS if positive else NEGATIVE_VERDICTS),
    }
    sentence = re.sub(r"\{(\w+)\}", lambda m: fillers[m.group(1)](), template)
    return _ARTICLE_BEFORE_VOWEL.sub(r"an \1", sentence)


def _opening(rng: random.Random) -> str:
    return _fill(rng.choice(_NEUTRAL_TEMPLATES), rng, positive=True)  # no {adj} slot: polarity unused


def _continuation(rng: random.Random, positive: bool) -> str:
    """1-4 sentences after the opening; at least one polar, a neutral one now and then."""
    count = rng.randint(1, 4)
    polar_at = rng.randrange(count)  # guarantees one polar sentence
    sentences = []
    for i in range(count):
        neutral = i != polar_at and rng.random() < NEUTRAL_IN_CONTINUATION
        if neutral:
            template = rng.choice(_NEUTRAL_TEMPLATES)
        else:
            template = rng.choice(_MARKED_TEMPLATES if rng.random() < MARKED_SHARE else _POLAR_TEMPLATES)
        sentences.append(_fill(template, rng, positive))
    return " ".join(sentences)


def generate_reviews(n: int, seed: int = 0) -> list[Review]:
    """n reviews, the same for the same (n, seed); a longer list extends a shorter one."""
    rng = random.Random(f"reviews:{seed}")
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        opening = _opening(rng)
        out.append(Review(opening, _continuation(rng, positive), positive))
    return out


def split_of(opening: str) -> Literal["held_in", "held_out"]:
    """Which split an opening belongs to, by a hash of its text (stable across seeds and runs)."""
    bucket = int.from_bytes(hashlib.sha256(opening.encode()).digest()[:4], "big") % 100
    return "held_out" if bucket < HELD_OUT_PERCENT else "held_in"


def review_prompts(n: int, seed: int = 0, split: Literal["held_in", "held_out"] = "held_in") -> list[str]:
    """n distinct review openings from one split, for prompts.

    Held-in prompts are for labelling and training, held-out ones for evaluating the policy. The split
    is decided by the opening's hash, so the two are disjoint whatever the seeds. There are a few
    thousand distinct openings per split; asking for more raises ValueError."""
    if split not in ("held_in", "held_out"):
        raise ValueError(f"unknown split {split!r}: use 'held_in' or 'held_out'")
    rng = random.Random(f"prompts:{split}:{seed}")
    seen: dict[str, None] = {}
    misses = 0
    while len(seen) < n:
        opening = _opening(rng)
        if split_of(opening) == split and opening not in seen:
            seen[opening] = None
            misses = 0
        else:
            misses += 1
            if misses > 20_000:
                raise ValueError(f"only {len(seen)} distinct {split} openings found; asked for {n}")
    return list(seen)


def adjective_counts(text: str) -> tuple[int, int]:
    """(positive, negative) adjective occurrences in text."""
    words = _WORD.findall(text.lower())
    return sum(w in POSITIVE_SET for w in words), sum(w in NEGATIVE_SET for w in words)


def reward(text: str) -> float:
    """Ground truth: (positive adjectives - negative adjectives) / words; 0.0 for text without words."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    pos = sum(w in POSITIVE_SET for w in words)
    neg = sum(w in NEGATIVE_SET for w in words)
    return (pos - neg) / len(words)


def is_positive(text: str) -> bool:
    """More positive than negative adjectives (reward > 0)."""
    pos, neg = adjective_counts(text)
    return pos > neg


def sentiment_consistent(text: str) -> bool:
    """At least one polar adjective, and all polar adjectives of one polarity."""
    pos, neg = adjective_counts(text)
    return (pos > 0) != (neg > 0)


def consistency(texts: Sequence[str]) -> float:
    """Share of texts that are sentiment-consistent."""
    return sum(map(sentiment_consistent, texts)) / len(texts) if texts else 0.0


def corpus_consistency(reviews: Sequence[Review] | None = None, n: int = 20_000, seed: int = 0) -> float:
    """The corpus's own consistency figure over continuations (openings are neutral, so the same over
    whole reviews): the number a model's samples are compared with."""
    reviews = generate_reviews(n, seed) if reviews is None else reviews
    return consistency([r.continuation for r in reviews])


@dataclass(frozen=True)
class LabelledExample:
    """A (prompt, answer) with its sentiment label, for training and testing a reward classifier."""

    opening: str
    continuation: str
    label: int  # 1: positive by the ground-truth rule, 0: negative


def labelled_examples(n: int, seed: int = 0, single_sentence_share: float = 0.5) -> list[LabelledExample]:
    """n labelled examples: single polar sentences (short, clean sentiment) and whole continuations.

    Labels are the ground-truth sign of the continuation (ties, which have no sign, are skipped), so
    the classifier learns the rule only as well as a small, briefly trained model can."""
    rng = random.Random(f"labelled:{seed}")
    out: list[LabelledExample] = []
    while len(out) < n:
        positive = rng.random() < 0.5
        opening = _opening(rng)
        if rng.random() < single_sentence_share:
            continuation = _fill(rng.choice(_POLAR_TEMPLATES), rng, positive)
        else:
            continuation = _continuation(rng, positive)
        pos, neg = adjective_counts(continuation)
        if pos != neg:
            out.append(LabelledExample(opening, continuation, int(pos > neg)))
    return out


def vocabulary() -> list[str]:
    """Every word the language can write (for the tokenizer's sanity and the docs)."""
    words: set[str] = set()
    for group in (
        POSITIVE,
        NEGATIVE,
        NEUTRAL_ADJ,
        NOUNS,
        PLURAL_NOUNS,
        ADVERBS,
        GENRES,
        DAYS,
        RELATIONS,
        POSITIVE_VERBS,
        NEGATIVE_VERBS,
    ):
        words.update(group)
    for group in (CHARACTERS, NAMES, ORDINALS, PLACE_LIST, DURATIONS, TIMES, POSITIVE_VERDICTS, NEGATIVE_VERDICTS):
        for phrase in group:
            words.update(phrase.split())
    for template in _NEUTRAL_TEMPLATES + _POLAR_TEMPLATES + _MARKED_TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return sorted(words)


def sentiment_check(answer: str, candidate_set: object = None) -> float:
    """The ground-truth rule as a labeler rules check (`type: python`): reward mapped from [-1, 1]
    onto [0, 1], so a more positive answer scores higher and equal rewards tie (no pair)."""
    return (reward(answer) + 1.0) / 2.0


# A rules file for services/labeler's rules strategy that labels by the ground-truth rule.
RULES_YAML = """\
# Labels review continuations by the ground-truth sentiment rule (localdev.reviews.reward).
pair_mode: best_worst
margin: 0
rules:
  - {name: sentiment, type: python, callable: "localdev.reviews:sentiment_check", weight: 1}
"""
# what OFFDPO_LABELER_RULES_CALLABLE_PACKAGES must allow for RULES_YAML's `callable:` to load
RULES_CALLABLE_PACKAGES = "localdev"


def write_rules_file(directory: str | Path) -> Path:
    """RULES_YAML as a file for the labeler's OFFDPO_LABELER_RULES (the experiments' rules strategy)."""
    path = Path(directory) / "reviews-rules.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RULES_YAML)
    return path


def rules_env(directory: str | Path) -> dict[str, str]:
    """The labeler settings for the experiments' rules strategy: RULES_YAML written under `directory`.
    RuleSet.load reads where `callable:` may import from in this process's environment, so that is
    allowed here unless the user set it."""
    import os

    os.environ.setdefault("OFFDPO_LABELER_RULES_CALLABLE_PACKAGES", RULES_CALLABLE_PACKAGES)
    return {"OFFDPO_LABELER_RULES": str(write_rules_file(directory))}
