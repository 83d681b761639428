"""Human strategy: annotations (chosen/rejected, or a Good/Same/Bad verdict on an answer pair) -> pairs."""

from __future__ import annotations

from offdpo import records
from offdpo.kafka import now_timestamp
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.names import StrategyName


def judgement_to_pair(j: labeler_pb2.HumanJudgement, source: str) -> records_pb2.PreferencePair | None:
    """'Good': answer_a chosen; 'Bad': answer_b chosen; 'Same': no pair (None). Validate first."""
    if j.verdict == "Same":
        return None
    a_first = j.verdict == "Good"
    chosen, rejected = (j.answer_a, j.answer_b) if a_first else (j.answer_b, j.answer_a)
    prov = records_pb2.Provenance(
        strategy=StrategyName.HUMAN.label_strategy,
        source=j.source or source,
        annotator=j.annotator,
        labeled_at=now_timestamp(),
    )
    # The annotator's verdict on the pair as it was shown (answer_a first).
    prov.verdicts.add(order="chosen_first" if a_first else "rejected_first", verdict=j.verdict)
    for k, v in j.metadata.items():
        prov.metadata[k] = v
    return records.make_pair(j.prompt, chosen, rejected, prov)
