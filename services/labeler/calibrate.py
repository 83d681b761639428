"""Calibrating the LLM judge against people: run the labeler's `llm_judge` strategy (GSB, both orders)
on a sample of human-labelled items and report how far it can be trusted.

- agreement: Cohen's kappa between the judge and the human majority on the items both labelled
  (verdicts a / b / tie; a judge whose verdict flips with the order counts as a tie, as in MT-Bench's
  analysis; items the humans called "both bad" are left out: the judge has no such verdict);
- order-swap consistency: the share of items whose verdict does not flip when A and B are swapped
  (a / b / tie in both orders, against all items with two parseable verdicts);
- length bias: the share of the judge's decided wins that went to the longer answer (answers of equal
  length left out); the humans' share on the same items is given next to it for comparison.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from offdpo.errors import OffdpoError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.annotate.agreement import cohen_kappa, fmt
from services.labeler.annotate.queue import NO_MAJORITY, TIE, A, B, Queue
from services.labeler.base import Outcome, Strategy

INCONSISTENT, UNPARSEABLE, FAILED = "inconsistent", "unparseable", "failed"


@dataclass(frozen=True)
class Sample:
    item_id: str
    prompt: records_pb2.Prompt
    answer_a: str
    answer_b: str
    human: str  # a, b, tie or bad (the majority of the annotators)


@dataclass(frozen=True)
class CalibrationReport:
    model: str
    items: int
    agreement_items: int
    kappa: float | None
    raw_agreement: float | None
    swap_items: int
    swap_consistency: float | None
    judge_wins: int
    length_bias: float | None
    human_wins: int
    human_length_bias: float | None
    unparseable: int
    failed: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        def share(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        return "\n".join(
            [
                f"judge {self.model or '?'} on {self.items} human-labelled items",
                f"  agreement with humans  kappa {fmt(self.kappa)}, raw {share(self.raw_agreement)} ({self.agreement_items} items)",
                f"  order-swap consistency {share(self.swap_consistency)} ({self.swap_items} items with both verdicts)",
                f"  length bias            {share(self.length_bias)} of {self.judge_wins} judge wins to the longer answer"
                f" (humans: {share(self.human_length_bias)} of {self.human_wins})",
                f"  unparseable {self.unparseable}, failed {self.failed}",
            ]
        )


def judge_decision(outcome: Outcome | OffdpoError, answer_a: str) -> str:
    """The judge's verdict on one (a, b) set from the strategy's result."""
    if isinstance(outcome, OffdpoError):
        return FAILED
    if outcome.pairs:
        return A if outcome.pairs[0].chosen == answer_a else B
    if outcome.ties:
        return TIE
    if outcome.inconsistent:
        return INCONSISTENT
    return UNPARSEABLE


def run_judge(strategy: Strategy, samples: Sequence[Sample]) -> list[str]:
    sets = []
    for s in samples:
        cs = labeler_pb2.CandidateSet(set_id=s.item_id, answers=[s.answer_a, s.answer_b])
        cs.prompt.CopyFrom(s.prompt)
        sets.append(cs)
    results = strategy.label_batch(sets, "calibration") if sets else []
    return [judge_decision(r, s.answer_a) for r, s in zip(results, samples)]


def _longer_share(wins: list[tuple[str, Sample]]) -> tuple[int, float | None]:
    """(decided wins between answers of different length, share of them won by the longer answer)."""
    differ = [(v, s) for v, s in wins if len(s.answer_a) != len(s.answer_b)]
    if not differ:
        return 0, None
    longer = sum(1 for v, s in differ if (v == A) == (len(s.answer_a) > len(s.answer_b)))
    return len(differ), longer / len(differ)


def report(samples: Sequence[Sample], decisions: Sequence[str], model: str = "") -> CalibrationReport:
    both = [
        (s.human, TIE if d == INCONSISTENT else d)
        for s, d in zip(samples, decisions)
        if s.human in (A, B, TIE) and d in (A, B, TIE, INCONSISTENT)
    ]
    swapped = [d for d in decisions if d in (A, B, TIE, INCONSISTENT)]
    judge_n, judge_bias = _longer_share([(d, s) for s, d in zip(samples, decisions) if d in (A, B)])
    human_n, human_bias = _longer_share([(s.human, s) for s in samples if s.human in (A, B)])
    return CalibrationReport(
        model=model,
        items=len(samples),
        agreement_items=len(both),
        kappa=cohen_kappa(both),
        raw_agreement=sum(h == j for h, j in both) / len(both) if both else None,
        swap_items=len(swapped),
        swap_consistency=sum(d != INCONSISTENT for d in swapped) / len(swapped) if swapped else None,
        judge_wins=judge_n,
        length_bias=judge_bias,
        human_wins=human_n,
        human_length_bias=human_bias,
        unparseable=sum(d == UNPARSEABLE for d in decisions),
        failed=sum(d == FAILED for d in decisions),
    )


def calibrate(strategy: Strategy, samples: Sequence[Sample], model: str = "") -> tuple[CalibrationReport, list[str]]:
    decisions = run_judge(strategy, samples)
    return report(samples, decisions, model), decisions


def calibrate_queue(
    queue: Queue, strategy: Strategy, model: str = "", sample: int = 200, seed: int = 0
) -> CalibrationReport:
    """Judge a random sample of the queue's decided items; the verdicts are stored for the stats page."""
    decided = [(it, outcome) for it, outcome in queue.decided_items() if outcome != NO_MAJORITY]
    chosen = random.Random(seed).sample(decided, min(sample, len(decided)))
    samples = [Sample(it.item_id, it.prompt, it.answer_a, it.answer_b, outcome) for it, outcome in chosen]
    rep, decisions = calibrate(strategy, samples, model)
    for s, d in zip(samples, decisions):
        if d in (A, B, TIE, INCONSISTENT):
            queue.set_judge_verdict(s.item_id, TIE if d == INCONSISTENT else d, model)
    return rep
