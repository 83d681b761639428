"""How a judge strategy runs a batch: plan the questions for every set, ask them all at once (cache
first, identical questions once, `concurrency` in flight), then turn each set's answers into an outcome.

A method (GSB or reference) says what to ask for one set (`plan`, typed asks), which questions an ask
holds, and what its answers mean (`outcome`); this module does the rest for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from offdpo import records
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome, Result, base_provenance
from services.labeler.errors import JudgeError, JudgeRefused, LabelError
from services.labeler.inputs import prompt_text
from services.labeler.judge.cache import VerdictCache
from services.labeler.judge.client import JudgeClient
from services.labeler.names import JudgeMode, StrategyName


@dataclass
class Question:
    """One prompt to the judge; once asked, its raw answer or the error that stopped it."""

    key: str  # the verdict cache's key: everything that decides the answer
    text: str
    choices: tuple[str, ...]
    raw: str = ""
    error: Exception | None = None


class Asker:
    """Asks questions: from the cache when it has them, identical ones once, `concurrency` at a time."""

    def __init__(self, client: JudgeClient, cache: VerdictCache | None, concurrency: int):
        self.client, self.cache, self.concurrency = client, cache, max(1, concurrency)

    def question(
        self,
        template: str,
        mode: JudgeMode,
        cs: labeler_pb2.CandidateSet,
        fields: dict[str, str | int],
        judged: tuple[str, str],
        order: str,
        choices: tuple[str, ...],
    ) -> Question:
        """`template` filled with `fields`; `judged` names the two texts the verdict is about."""
        key = VerdictCache.key(
            self.client.model, template, mode.value, records.canonical_prompt(cs.prompt), *judged, order, list(choices)
        )
        return Question(key=key, text=template.format(**fields), choices=choices)

    def ask(self, questions: Iterable[Question]) -> None:
        unasked: dict[str, list[Question]] = {}
        for q in questions:
            cached = self.cache.get(q.key) if self.cache else None
            if cached is not None:
                q.raw = cached
            else:
                unasked.setdefault(q.key, []).append(q)
        if unasked:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                list(pool.map(self._ask_once, unasked.values()))

    def _ask_once(self, same: list[Question]) -> None:
        try:
            raw = self.client.complete(same[0].text, same[0].choices)
        except Exception as exc:  # noqa: BLE001 - reported on every set that needed this answer
            for q in same:
                q.error = exc
            return
        if self.cache:
            self.cache.put(same[0].key, raw)
        for q in same:
            q.raw = raw


A = TypeVar("A")


@dataclass
class _SetPlan(Generic[A]):
    cs: labeler_pb2.CandidateSet
    asks: list[A] = field(default_factory=list)
    error: LabelError | None = None  # the set cannot be judged: nothing is asked for it


class JudgeMethod(ABC, Generic[A]):
    """A judging method over asks of type A."""

    mode: ClassVar[JudgeMode]

    def __init__(self, asker: Asker, template: str):
        self.asker, self.template = asker, template

    @abstractmethod
    def plan(self, cs: labeler_pb2.CandidateSet, prompt: str) -> list[A]:
        """What to ask about one set (`prompt` is its readable text); LabelError if it cannot be judged."""

    @abstractmethod
    def questions(self, ask: A) -> tuple[Question, ...]:
        """The questions one ask is made of."""

    @abstractmethod
    def outcome(self, cs: labeler_pb2.CandidateSet, asks: Sequence[A], source: str) -> Outcome:
        """One set's pairs and counts from its answered asks."""

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Result]:
        plans = [self._plan(cs) for cs in sets]
        self.asker.ask(q for p in plans for ask in p.asks for q in self.questions(ask))
        return [self._result(p, source) for p in plans]

    def _plan(self, cs: labeler_pb2.CandidateSet) -> _SetPlan[A]:
        try:
            return _SetPlan(cs, self.plan(cs, prompt_text(cs.prompt)))
        except LabelError as exc:
            return _SetPlan(cs, error=exc)

    def _result(self, plan: _SetPlan[A], source: str) -> Result:
        if plan.error is not None:
            return plan.error
        failed = next((q.error for ask in plan.asks for q in self.questions(ask) if q.error), None)
        if isinstance(failed, JudgeRefused):
            return failed  # this set's request can never succeed: dead-lettered
        if failed is not None:
            return JudgeError(str(failed))
        return self.outcome(plan.cs, plan.asks, source)

    def provenance(self, cs: labeler_pb2.CandidateSet, source: str) -> records_pb2.Provenance:
        p = base_provenance(StrategyName.LLM_JUDGE, cs, source)
        p.judge_model = self.asker.client.model
        p.metadata["judge_mode"] = self.mode.value
        return p
