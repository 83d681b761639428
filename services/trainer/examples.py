"""A training example (one scored pair, token ids and reference log-probs) and the held-out split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class Example:
    pair_id: str
    prompt: list
    chosen: list
    rejected: list
    ref_chosen: list  # per-token reference log-probs of `chosen`
    ref_rejected: list
    shard: str = ""  # the object key it was read from ("" for pairs built in memory: benchmarks, tests)

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


class Refusal(str):
    """One record refused, as the message that says why (a str), with the dead letter's error_type."""

    error_type: str

    def __new__(cls, message: str, error_type: str) -> Refusal:
        out = super().__new__(cls, message)
        out.error_type = error_type
        return out


# -- held-out split ---------------------------------------------------------------------------------
def is_heldout(pair_id: str, fraction: float) -> bool:
    """True for the pairs of the evaluation split: a pure function of the pair id (salted, so the
    split does not line up with any other use of the id's hash). Deterministic across runs, ranks
    and restarts; a held-out pair is never trained."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(b"offdpo-eval:" + pair_id.encode()).digest()[:8], "big")
    return h < fraction * 2**64


class EvalSet:
    """The held-out pairs kept for evaluation: the first `limit` seen, each once."""

    def __init__(self, fraction: float, limit: int):
        self.fraction, self.limit = fraction, limit
        self.examples: list[Example] = []
        self.ids: set[str] = set()
        self.seen = 0  # held-out pairs seen (kept or not): none of them is trained

    def offer(self, e: Example) -> bool:
        """True (and kept while there is room) when `e` is held out; False when it is for training."""
        if not is_heldout(e.pair_id, self.fraction):
            return False
        if e.pair_id not in self.ids:
            self.seen += 1
            if len(self.examples) < self.limit:
                self.examples.append(e)
                self.ids.add(e.pair_id)
        return True
