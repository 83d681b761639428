"""GSB judging: for each pair of answers (A, B) the judge is asked twice, A first and B first, and says
"Good" (the first answer is better), "Same" or "Bad". Only consistent verdicts (Good then Bad, or Bad
then Good) give a pair; "Same" in both orders is a tie and anything else is inconsistent: position bias
cancels out instead of leaking into the labels."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from offdpo import records
from offdpo.v1 import labeler_pb2
from services.labeler.base import Outcome
from services.labeler.judge.method import JudgeMethod, Question
from services.labeler.judge.prompts import GSB_LABELS, parse_label
from services.labeler.names import JudgeMode

log = logging.getLogger(__name__)


class GsbDecision(enum.StrEnum):
    A = "a"  # the first answer of the pair is better
    B = "b"
    TIE = "tie"
    INCONSISTENT = "inconsistent"
    UNPARSEABLE = "unparseable"


def decide_gsb(first: str | None, second: str | None) -> GsbDecision:
    """Verdicts for (A, B) asked A-first (`first`) and B-first (`second`). Only Good/Bad or Bad/Good
    is a preference."""
    if first not in GSB_LABELS or second not in GSB_LABELS:
        return GsbDecision.UNPARSEABLE
    if first == "Good" and second == "Bad":
        return GsbDecision.A
    if first == "Bad" and second == "Good":
        return GsbDecision.B
    if first == "Same" and second == "Same":
        return GsbDecision.TIE
    return GsbDecision.INCONSISTENT


@dataclass(frozen=True)
class GsbAsk:
    """Answers `a` and `b` (positions in the set, a < b) compared in both orders."""

    a: int
    b: int
    a_first: Question
    b_first: Question


class GsbMethod(JudgeMethod[GsbAsk]):
    mode = JudgeMode.GSB

    def plan(self, cs: labeler_pb2.CandidateSet, prompt: str) -> list[GsbAsk]:
        n = len(cs.answers)
        return [self._compare(cs, prompt, i, j) for i in range(n) for j in range(i + 1, n)]

    def _compare(self, cs: labeler_pb2.CandidateSet, prompt: str, a: int, b: int) -> GsbAsk:
        def shown(first: str, second: str) -> Question:
            return self.asker.question(
                self.template,
                self.mode,
                cs,
                fields=dict(prompt=prompt, answer_a=first, answer_b=second),
                judged=(first, second),
                order="as_presented",
                choices=GSB_LABELS,
            )

        return GsbAsk(a, b, shown(cs.answers[a], cs.answers[b]), shown(cs.answers[b], cs.answers[a]))

    def questions(self, ask: GsbAsk) -> tuple[Question, ...]:
        return (ask.a_first, ask.b_first)

    def outcome(self, cs: labeler_pb2.CandidateSet, asks: Sequence[GsbAsk], source: str) -> Outcome:
        out = Outcome()
        for ask in asks:
            v_ab, v_ba = parse_label(ask.a_first.raw, GSB_LABELS), parse_label(ask.b_first.raw, GSB_LABELS)
            decision = decide_gsb(v_ab, v_ba)
            if decision in (GsbDecision.A, GsbDecision.B):
                a_won = decision == GsbDecision.A
                chosen, rejected = (ask.a, ask.b) if a_won else (ask.b, ask.a)
                chosen_first, rejected_first = (ask.a_first, ask.b_first) if a_won else (ask.b_first, ask.a_first)
                p = self.provenance(cs, source)
                for order, q in (("chosen_first", chosen_first), ("rejected_first", rejected_first)):
                    p.verdicts.add(order=order, verdict=parse_label(q.raw, GSB_LABELS) or "", raw_response=q.raw)
                out.pairs.append(records.make_pair(cs.prompt, cs.answers[chosen], cs.answers[rejected], p))
            elif decision == GsbDecision.TIE:
                out.ties += 1
            elif decision == GsbDecision.INCONSISTENT:
                out.inconsistent += 1
                log.info("judge inconsistent on set %s answers %d/%d: %s then %s", cs.set_id, ask.a, ask.b, v_ab, v_ba)
            else:
                out.unparseable += 1
                log.warning(
                    "judge answer outside %s on set %s: %r / %r",
                    GSB_LABELS,
                    cs.set_id,
                    ask.a_first.raw,
                    ask.b_first.raw,
                )
        return out
