"""Reference judging: each answer is scored against the set's reference answer on [scale_min,
scale_max]; the best against the worst answer (or every pair above the margin) become pairs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome, pairs_from_scores
from services.labeler.errors import LabelError
from services.labeler.judge.method import Asker, JudgeMethod, Question
from services.labeler.judge.prompts import parse_label
from services.labeler.names import JudgeMode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceAsk:
    """Answer `index` of the set, scored against the reference."""

    index: int
    question: Question


@dataclass(frozen=True)
class _Scored:
    index: int
    score: float
    raw: str


class ReferenceMethod(JudgeMethod[ReferenceAsk]):
    mode = JudgeMode.REFERENCE

    def __init__(self, asker: Asker, template: str, scale_min: int, scale_max: int, pair_mode: str, margin: float):
        super().__init__(asker, template)
        self.scale_min, self.scale_max = scale_min, scale_max
        self.pair_mode, self.margin = pair_mode, margin
        self.score_labels = tuple(str(i) for i in range(scale_min, scale_max + 1))

    def plan(self, cs: labeler_pb2.CandidateSet, prompt: str) -> list[ReferenceAsk]:
        if not cs.HasField("reference"):
            raise LabelError("reference mode needs a reference answer: set 'reference' on the candidate set")
        return [ReferenceAsk(i, self._grade(cs, prompt, answer)) for i, answer in enumerate(cs.answers)]

    def _grade(self, cs: labeler_pb2.CandidateSet, prompt: str, answer: str) -> Question:
        return self.asker.question(
            self.template,
            self.mode,
            cs,
            fields=dict(
                prompt=prompt,
                reference=cs.reference,
                answer=answer,
                scale_min=self.scale_min,
                scale_max=self.scale_max,
            ),
            judged=(answer, cs.reference),
            order="single",
            choices=self.score_labels,
        )

    def questions(self, ask: ReferenceAsk) -> tuple[Question, ...]:
        return (ask.question,)

    def outcome(self, cs: labeler_pb2.CandidateSet, asks: Sequence[ReferenceAsk], source: str) -> Outcome:
        scored: list[_Scored] = []
        for ask in asks:
            label = parse_label(ask.question.raw, self.score_labels)
            if label is None:
                log.warning(
                    "judge score outside %s..%s on set %s: %r",
                    self.scale_min,
                    self.scale_max,
                    cs.set_id,
                    ask.question.raw,
                )
                continue
            scored.append(_Scored(ask.index, float(label), ask.question.raw))
        unparseable = len(asks) - len(scored)
        if len(scored) < 2:
            return Outcome(unparseable=unparseable)
        # Pairs are made among the answers that got a score.
        sub = labeler_pb2.CandidateSet()
        sub.CopyFrom(cs)
        del sub.answers[:]
        sub.answers.extend(cs.answers[s.index] for s in scored)

        def prov(c: int, r: int) -> records_pb2.Provenance:
            p = self.provenance(cs, source)
            p.chosen_score, p.rejected_score = scored[c].score, scored[r].score
            p.verdicts.add(order="chosen", verdict=str(int(scored[c].score)), raw_response=scored[c].raw)
            p.verdicts.add(order="rejected", verdict=str(int(scored[r].score)), raw_response=scored[r].raw)
            p.metadata["judge_scale"] = f"{self.scale_min}-{self.scale_max}"
            return p

        out = pairs_from_scores(sub, [s.score for s in scored], self.pair_mode, self.margin, prov)
        out.unparseable = unparseable
        return out
