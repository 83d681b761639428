"""The labeler's vocabularies, spelled once: strategy names (and their `LabelStrategy` values in
records), judge modes, pair modes and input kinds. The CLI's choices, the settings' validation, the
pipeline and the gRPC server all read them from here."""

from __future__ import annotations

import enum

from offdpo.v1 import records_pb2


def one_of(values: tuple[str, ...]) -> str:
    """'a, b or c' for messages that list the allowed values."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


class StrategyName(enum.StrEnum):
    """How a pair was labelled; the value is what settings, files, the CLI and the gRPC API carry."""

    HUMAN = "human"
    RULES = "rules"
    REWARD_MODEL = "reward_model"
    LLM_JUDGE = "llm_judge"
    IMPORTED = "imported"

    @property
    def label_strategy(self) -> records_pb2.LabelStrategy:
        """The value written to `Provenance.strategy`."""
        return _LABEL_STRATEGY[self]


_LABEL_STRATEGY: dict[StrategyName, records_pb2.LabelStrategy] = {
    StrategyName.HUMAN: records_pb2.LABEL_STRATEGY_HUMAN,
    StrategyName.RULES: records_pb2.LABEL_STRATEGY_RULES,
    StrategyName.REWARD_MODEL: records_pb2.LABEL_STRATEGY_REWARD_MODEL,
    StrategyName.LLM_JUDGE: records_pb2.LABEL_STRATEGY_LLM_JUDGE,
    StrategyName.IMPORTED: records_pb2.LABEL_STRATEGY_IMPORTED,
}

# The strategies that label candidate sets; human and imported pairs arrive already labelled.
CANDIDATE_STRATEGIES: tuple[str, ...] = (StrategyName.RULES, StrategyName.REWARD_MODEL, StrategyName.LLM_JUDGE)


def candidate_strategy_problem(name: str) -> str | None:
    """Why `name` cannot label candidate sets, or None when it can."""
    if name in CANDIDATE_STRATEGIES:
        return None
    return f"unknown strategy {name!r}: use {one_of(CANDIDATE_STRATEGIES)}"


class JudgeMode(enum.StrEnum):
    """gsb: the judge compares two answers, asked in both orders; reference: it scores each answer
    against the set's reference answer."""

    GSB = "gsb"
    REFERENCE = "reference"


JUDGE_MODES: tuple[str, ...] = tuple(JudgeMode)


class PairMode(enum.StrEnum):
    """Which scored answers become pairs: the best against the worst, or every pair above the margin."""

    BEST_WORST = "best_worst"
    ALL = "all"


PAIR_MODES: tuple[str, ...] = tuple(PairMode)


class InputKind(enum.StrEnum):
    """What a file holds: candidate sets to label, human annotations, or labelled preference data."""

    CANDIDATES = "candidates"
    ANNOTATIONS = "annotations"
    PREFERENCES = "preferences"


INPUT_KINDS: tuple[str, ...] = tuple(InputKind)


def problem(value: str, allowed: tuple[str, ...], what: str) -> str | None:
    """Why `value` is not one of `allowed` (named `what` in the message), or None when it is."""
    return None if value in allowed else f"{what}={value!r}: use {one_of(allowed)}"
