"""The labeler's errors, placed in `offdpo.errors`' hierarchy: each class carries the dead-letter
`error_type` (and gRPC status) it is reported with, so the pipeline never reads message text."""

from __future__ import annotations

from offdpo import errors


class InvalidCandidateSet(errors.RecordError):
    """A decoded candidate set that cannot be labelled as given (too few, too many or duplicate answers,
    no prompt, an unknown strategy)."""

    error_type = "invalid_candidate_set"


class TooFewAnswers(InvalidCandidateSet):
    """Fewer than two distinct answers remain after on-policy generation."""

    error_type = "too_few_answers"


class InvalidJudgement(errors.DecodeError):
    """A human judgement that is incomplete or contradictory: like an undecodable line, it never
    becomes a record."""


class LabelError(errors.RecordError):
    """This strategy cannot label this set: a prompt of token ids for a text-based strategy, no
    reference answer in the judge's reference mode, a rule's check failing on an answer."""

    error_type = "label_error"


class RulesError(errors.BadInput):
    """The rules file is invalid; the message names the rule and what to fix."""

    error_type = "invalid_rules"


class StrategyUnavailable(errors.ConfigError):
    """The strategy a set asks for cannot be built (no rules file, no reward model, a bad judge
    setting): every set that needs it is rejected with the reason."""

    error_type = "strategy_unavailable"


class GenerateNotConfigured(errors.ConfigError):
    """A set asks for on-policy samples but no refscore address was configured."""

    error_type = "generate_unavailable"


class GenerateFailed(errors.Unavailable):
    """refscore's Generate call failed for this set."""

    error_type = "generate_failed"


class GenerateRefused(errors.RecordError):
    """refscore refused to generate for this set (INVALID_ARGUMENT / OUT_OF_RANGE: a prompt over the
    model's length, an unknown reference it names): retrying cannot fix it, so it is dead-lettered."""

    error_type = "generate_refused"


class JudgeRefused(errors.RecordError):
    """The judge endpoint refused the request made for this set (HTTP 400, 413 or 422: a prompt over
    the judge's context length, content it rejects): retrying cannot fix it, so it is dead-lettered."""

    error_type = "judge_refused"


class JudgeError(errors.Unavailable):
    """The judge endpoint failed (after the client's retries, or with an error retrying cannot fix)."""

    error_type = "judge_unavailable"


class PublishError(errors.Unavailable):
    """Kafka did not acknowledge some pairs; nothing was committed."""

    error_type = "publish_failed"
