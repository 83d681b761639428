"""What every strategy returns, and how scored answers become pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from offdpo import records
from offdpo.errors import ConfigError, OffdpoError
from offdpo.kafka import now_timestamp
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.names import PAIR_MODES, PairMode, StrategyName, problem


@dataclass
class Outcome:
    """The labelling of one candidate set: pairs, and the comparisons that gave none."""

    pairs: list[records_pb2.PreferencePair] = field(default_factory=list)
    ties: int = 0  # equal scores, "Same" verdicts
    inconsistent: int = 0  # judge verdicts that changed when the answers were swapped
    unparseable: int = 0  # judge answers outside the allowed labels


# One per candidate set: its outcome, or why it was not labelled (the error's class says how it is reported).
Result = Outcome | OffdpoError


class Strategy(Protocol):
    name: str

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Result]:
        """One result per set, in order; an OffdpoError for a set that cannot be labelled."""
        ...


def base_provenance(strategy: StrategyName, cs: labeler_pb2.CandidateSet, source: str) -> records_pb2.Provenance:
    prov = records_pb2.Provenance(strategy=strategy.label_strategy, source=source, labeled_at=now_timestamp())
    for k, v in cs.metadata.items():
        prov.metadata[k] = v
    if cs.set_id:
        prov.metadata.setdefault("set_id", cs.set_id)
    return prov


def pairs_from_scores(
    cs: labeler_pb2.CandidateSet,
    scores: Sequence[float],
    mode: str,
    margin: float,
    provenance: Callable[[int, int], records_pb2.Provenance],
) -> Outcome:
    """Scored answers -> pairs. best_worst: the best against the worst answer; all: every pair whose
    gap is above `margin`. A gap of `margin` or less (ties included) gives no pair."""
    out = Outcome()
    n = len(scores)
    if mode == PairMode.BEST_WORST:
        best = max(range(n), key=lambda i: (scores[i], -i))
        worst = min(range(n), key=lambda i: (scores[i], i))
        candidates = [(best, worst)]
    elif mode == PairMode.ALL:
        candidates = [(i, j) if scores[i] >= scores[j] else (j, i) for i in range(n) for j in range(i + 1, n)]
    else:
        raise ConfigError(problem(mode, PAIR_MODES, "pair mode"))
    for c, r in candidates:
        if scores[c] - scores[r] <= margin:
            out.ties += 1
            continue
        out.pairs.append(records.make_pair(cs.prompt, cs.answers[c], cs.answers[r], provenance(c, r)))
    return out
