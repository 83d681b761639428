"""What the judge is asked: the default templates, the fields each may use, and reading its answer."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

from offdpo.errors import ConfigError

GSB_LABELS = ("Good", "Same", "Bad")

DEFAULT_GSB_TEMPLATE = """You compare two answers to the same request.

[Request]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Is Answer A better than Answer B? Reply with exactly one word: Good (A is better), Same (they are equally good), or Bad (B is better)."""

DEFAULT_REFERENCE_TEMPLATE = """You grade an answer against a reference answer.

[Request]
{prompt}

[Reference answer]
{reference}

[Answer to grade]
{answer}

Score the answer from {scale_min} (wrong or useless) to {scale_max} (as good as the reference). Reply with the number only."""

GSB_FIELDS = frozenset({"prompt", "answer_a", "answer_b"})
REFERENCE_FIELDS = frozenset({"prompt", "reference", "answer", "scale_min", "scale_max"})
REFERENCE_REQUIRED = frozenset({"answer", "reference"})


def check_template(
    template: str, allowed: set[str] | frozenset[str], required: set[str] | frozenset[str], what: str
) -> str:
    """`template` if it uses only named fields from `allowed` and every field of `required`; ConfigError otherwise."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"{what}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    if "" in fields or any(not f.isidentifier() for f in fields):
        raise ConfigError(f"{what}: use named fields only, from {sorted(allowed)}")
    if fields - allowed:
        raise ConfigError(f"{what}: unknown fields {sorted(fields - allowed)}; allowed: {sorted(allowed)}")
    if required - fields:
        raise ConfigError(f"{what}: the template must use {sorted(required - fields)}")
    return template


def load_template(path: str, default: str, allowed: frozenset[str], required: frozenset[str], what: str) -> str:
    """The template in file `path` (the default when empty), checked."""
    return check_template(Path(path).read_text() if path else default, allowed, required, what)


def parse_label(raw: str, labels: Sequence[str]) -> str | None:
    """The label the judge's answer starts with (case, quotes and markdown ignored), or None."""
    text = raw.strip().strip("\"'`*.!: \n").split()
    if not text:
        return None
    word = text[0].strip("\"'`*.,!:")
    for label in labels:
        if word.lower() == label.lower():
            return label
    return None
