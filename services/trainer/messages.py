"""What rank 0 tells every rank: the run's plan once, then one message per step.

Rank 0 alone reads the data; the other ranks act only on what it broadcasts, so they all train the
same batch, stop at the same step, or refuse with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.trainer.examples import Example


@dataclass(frozen=True)
class Plan:
    """The run as rank 0 set it up."""

    total_steps: int | None  # None: a stream without --max-steps has no known end
    fingerprint_id: str  # of the reference this run trains against
    resume_from: str | None  # checkpoint prefix in S3


@dataclass(frozen=True)
class Batch:
    """Train one optimizer step on these pairs (the global batch; each rank takes its slice)."""

    examples: list[Example]


@dataclass(frozen=True)
class Stop:
    """Stop cleanly: the data ran out (signal None), or a signal asked to stop (its name)."""

    signal: str | None = None


@dataclass(frozen=True)
class Failure:
    """The data was refused: every rank raises DataError with this message."""

    message: str


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the policy on these held-out pairs (every rank takes its slice)."""

    examples: list[Example]


Setup = Plan | Failure
Step = Batch | Stop | Failure


def as_setup(obj: object) -> Setup:
    """What rank 0 broadcast at setup, checked."""
    if isinstance(obj, (Plan, Failure)):
        return obj
    raise TypeError(f"rank 0 sent {obj!r} at setup, expected a Plan or a Failure")


def as_step(obj: object) -> Step:
    """What rank 0 broadcast for a step, checked."""
    if isinstance(obj, (Batch, Stop, Failure)):
        return obj
    raise TypeError(f"rank 0 sent {obj!r} for a step, expected a Batch, a Stop or a Failure")


def as_evaluate(obj: object) -> Evaluate:
    """What rank 0 broadcast for an evaluation, checked."""
    if isinstance(obj, Evaluate):
        return obj
    raise TypeError(f"rank 0 sent {obj!r} for an evaluation, expected an Evaluate")
