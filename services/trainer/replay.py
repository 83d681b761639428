"""Replay: every *.parquet under an S3 prefix. Each shard is read and checked once before step 1 (a bad
shard stops the run), keeping only which of its rows it owns (a pair in two shards belongs to the
first in key order: identity by content) and the shard's sha256. Training then streams the shards
again one at a time: per epoch the shard order is shuffled with (seed, epoch), consecutive shards are
grouped into windows of at least `shuffle_pairs` pairs, and each window's pairs are shuffled in
memory. Memory is one window plus one shard, whatever the prefix holds. The order is a pure function
of (shard list, seed, epoch), so a resumed run skips exactly the pairs it already trained (whole
windows by their counts, without downloading them).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from offdpo.records import (
    MAX_SHARD_BYTES,
    ReferenceFingerprint,
)
from services.trainer.examples import EvalSet, Example, Refusal
from services.trainer.infra import InfraStatus, Interrupted, until_done
from services.trainer.shards import DataError, ObjectReader, examples_from_shard, fetch_shard

log = logging.getLogger(__name__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- replay ------------------------------------------------------------------------------------
@dataclass
class _ReplayShard:
    key: str
    sha256: str  # as checked before step 1: a shard changed under a running replay is refused
    owned: bytes  # per example of the shard, 1 when this shard trains it (first shard holding the pair)
    count: int  # pairs this shard trains


class ReplaySource:
    """Fixed epochs over an S3 prefix, streamed shard by shard. Position = (epoch, pairs of that
    epoch's order already taken). See the module docstring for the order and its memory bound."""

    def __init__(
        self,
        store: ObjectReader,
        prefix: str,
        epochs: int,
        seed: int,
        expected_fp: ReferenceFingerprint,
        allowed_ids: Iterable[str],
        max_length: int,
        truncation: str,
        *,
        vocab_size: int | None = None,
        shuffle_pairs: int = 4096,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        evals: EvalSet | None = None,
        stop: threading.Event | None = None,
        infra: InfraStatus | None = None,
    ):
        self.store, self.expected_fp, self.allowed_ids = store, expected_fp, allowed_ids
        self.max_length, self.truncation, self.vocab_size = max_length, truncation, vocab_size
        self.shuffle_pairs, self.max_shard_bytes, self.stop = max(1, shuffle_pairs), max_shard_bytes, stop
        self.evals = evals or EvalSet(0.0, 0)
        self.infra = infra if infra is not None else InfraStatus()  # shared with the readiness probe
        listed = until_done(f"list {prefix}", lambda: store.list_keys(prefix), self.infra, stop)
        keys = [k for k in listed if k.endswith(".parquet")]
        if not keys:
            raise DataError(f"no *.parquet shards under s3://{store.bucket}/{prefix}")
        seen: set[str] = set()  # pair ids, during this scan only
        self.meta: list[_ReplayShard] = []
        for key in keys:
            data = self._fetch(key)
            examples, refusals = self._examples(data, key)
            if refusals:
                raise DataError(f"{len(refusals)} record(s) refused, nothing trained: " + "; ".join(refusals[:5]))
            owned = bytearray(len(examples))
            for i, e in enumerate(examples):
                if e.pair_id in seen:
                    continue  # identity by content: a pair in two shards trains once
                seen.add(e.pair_id)
                if not self.evals.offer(e):
                    owned[i] = 1
            self.meta.append(_ReplayShard(key, _sha256(data), bytes(owned), sum(owned)))
            del data, examples
        self.shards = keys
        self.num_pairs = sum(s.count for s in self.meta)
        self.epochs, self.seed = epochs, seed
        self.epoch, self.index = 0, 0
        self._window: tuple[int, int, list[Example]] | None = None  # (epoch, window number, its pairs)
        log.info(
            "replay: %d shards, %d unique pairs to train (%d held out for evaluation), %d epochs",
            len(keys),
            self.num_pairs,
            self.evals.seen,
            epochs,
        )

    def _fetch(self, key: str) -> bytes:
        return until_done(
            f"fetch shard {key}", lambda: fetch_shard(self.store, key, self.max_shard_bytes), self.infra, self.stop
        )

    def _examples(self, data: bytes, key: str) -> tuple[list[Example], list[Refusal]]:
        return examples_from_shard(
            data, key, self.expected_fp, self.allowed_ids, self.max_length, self.truncation, self.vocab_size
        )

    def windows(self, epoch: int) -> list[list[int]]:
        """The epoch's shard order (shuffled with (seed, epoch)), cut into windows of >= shuffle_pairs pairs."""
        order = [i for i in range(len(self.meta)) if self.meta[i].count]
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        out: list[list[int]] = [[]]
        n = 0
        for i in order:
            out[-1].append(i)
            n += self.meta[i].count
            if n >= self.shuffle_pairs:
                out.append([])
                n = 0
        return [w for w in out if w]

    def order(self, epoch: int) -> Iterator[Example]:
        """The epoch's pairs in training order (downloads each window as it goes)."""
        for w, shards in enumerate(self.windows(epoch)):
            yield from self._load_window(epoch, w, shards)

    def _load_window(self, epoch: int, w: int, shards: list[int]) -> list[Example]:
        pairs: list[Example] = []
        for i in shards:
            meta = self.meta[i]
            data = self._fetch(meta.key)
            if _sha256(data) != meta.sha256:
                raise DataError(
                    f"shard {meta.key} changed since this replay checked it (sha256); replay needs the "
                    f"same data to train exactly once, start a new --run-name"
                )
            examples, _ = self._examples(data, meta.key)
            pairs += [e for e, own in zip(examples, meta.owned) if own]
        random.Random(f"{self.seed}:{epoch}:{w}").shuffle(pairs)
        return pairs

    def _pairs_at(self, epoch: int, index: int) -> tuple[list[Example], int] | None:
        """The window holding pair `index` of the epoch's order, and the index its first pair has."""
        start = 0
        for w, shards in enumerate(self.windows(epoch)):
            n = sum(self.meta[i].count for i in shards)
            if index < start + n:
                if self._window is None or self._window[:2] != (epoch, w):
                    self._window = None  # let the previous window go before the next one is read
                    self._window = (epoch, w, self._load_window(epoch, w, shards))
                return self._window[2], start
            start += n
        return None

    def steps_per_epoch(self, batch: int) -> int:
        return -(-self.num_pairs // batch)

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        total = self.epochs * self.steps_per_epoch(batch)
        return min(total, max_steps) if max_steps else total

    def next_batch(self, size: int) -> list[Example] | None:
        position = (self.epoch, self.index)
        try:
            while self.epoch < self.epochs:
                batch: list[Example] = []
                while len(batch) < size:  # the last batch of an epoch may be short: batches stay in their epoch
                    found = self._pairs_at(self.epoch, self.index)
                    if found is None:
                        break
                    pairs, start = found
                    take = pairs[self.index - start : self.index - start + size - len(batch)]
                    batch += take
                    self.index += len(take)
                if batch:
                    return batch
                self.epoch, self.index = self.epoch + 1, 0
            return None
        except Interrupted:
            self.epoch, self.index = position  # nothing of the unfinished batch counts as taken
            return None

    def mark_trained(self, batch: list[Example]) -> None:
        pass  # the position moved when the batch was taken; a resume restores it from the checkpoint

    def state(self) -> dict[str, Any]:
        return {"mode": "replay", "epoch": self.epoch, "index": self.index, "shards": self.shards}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("shards") != self.shards:
            raise DataError(
                "the shards under the prefix changed since the checkpoint (was "
                f"{len(state.get('shards', []))}, now {len(self.shards)}); replay needs the same set to "
                "resume exactly once, start a new --run-name"
            )
        self.epoch, self.index = state["epoch"], state["index"]

    def commit(self) -> None:
        pass  # nothing upstream to tell: the position lives in the checkpoint only

    def close(self) -> None:
        pass


# -- continuous --------------------------------------------------------------------------------
