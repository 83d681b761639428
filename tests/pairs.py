"""Preference pairs for tests: distinct per `tag`, deterministic, short (one shared maker for all suites)."""

from __future__ import annotations

from offdpo import records
from offdpo.v1 import records_pb2


def make_pairs(n: int, tag: str) -> list[records_pb2.PreferencePair]:
    out = []
    for i in range(n):
        prompt = records.chat_prompt([("user", f"question {tag} {i}: what is {i} plus {i}?")])
        out.append(
            records.make_pair(
                prompt,
                f"It is {2 * i}.",
                f"Maybe {2 * i + 1}?",
                records_pb2.Provenance(strategy=records_pb2.LABEL_STRATEGY_RULES, source=tag),
            )
        )
    return out
