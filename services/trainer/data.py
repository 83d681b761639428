"""Where training records come from, and the checks they pass first.

Replay: every *.parquet under an S3 prefix, validated up front (a bad shard stops the run before
step 1), de-duplicated by pair_id, shuffled per epoch with (seed, epoch). The order is a pure
function of (shard list, seed, epoch), so a resumed run skips exactly the pairs it already trained.

Continuous: ShardReady events from Kafka. Events are de-duplicated by object key (refscore may
announce a shard twice after a crash), pairs by pair_id. A bad shard is dead-lettered with the
reason and training goes on. Offsets are committed only after a checkpoint covering them is written
(see train.py), so after a crash the events come back and the pair_id filter drops what was trained.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from offdpo.kafka import MAX_RECORD_BYTES
from offdpo.records import RecordError, ShardReady, decode, fingerprint_mismatch, read_shard

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Training data was refused; the message names the shard, the pair and what to fix."""


@dataclass
class Example:
    pair_id: str
    prompt: list
    chosen: list
    rejected: list
    ref_chosen: list  # per-token reference log-probs of `chosen`
    ref_rejected: list
    shard: str

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def check_fingerprint(shard_fp, expected_fp, allowed_ids, what: str) -> None:
    if shard_fp.fingerprint_id in allowed_ids:
        return
    diff = fingerprint_mismatch(expected_fp, shard_fp)
    if diff:
        raise DataError(
            f"{what}: reference fingerprint {shard_fp.fingerprint_id} does not match this run's "
            f"reference {expected_fp.fingerprint_id} ({diff}). Rescore with the run's reference, point "
            f"--reference-model at the model that scored it, or accept it deliberately with "
            f"--allow-fingerprint {shard_fp.fingerprint_id}"
        )


def examples_from_shard(
    data: bytes, key: str, expected_fp, allowed_ids, max_length: int, truncation: str
) -> tuple[list[Example], list[str]]:
    """Parse and check one shard. Returns (examples, refusals); raises DataError for shard-level faults.

    Truncation rule: a record is too long when len(prompt) + max(len(chosen), len(rejected)) > max_length.
    'refuse' refuses it; 'truncate_answers' keeps the prompt and cuts both answers to the tokens that
    fit, with their reference log-probs cut the same way (causal: a prefix's log-probs do not change).
    A prompt that leaves no room for an answer is always refused.
    """
    try:
        shard = read_shard(data, what=f"shard {key}")
    except RecordError as exc:
        raise DataError(str(exc)) from None
    check_fingerprint(shard.fingerprint, expected_fp, allowed_ids, f"shard {key}")
    cols = {
        c: shard.table.column(c).to_pylist()
        for c in (
            "pair_id",
            "prompt_token_ids",
            "chosen_token_ids",
            "rejected_token_ids",
            "chosen_logprobs",
            "rejected_logprobs",
        )
    }
    examples, refusals = [], []
    for i, pid in enumerate(cols["pair_id"]):
        p, c, r = cols["prompt_token_ids"][i], cols["chosen_token_ids"][i], cols["rejected_token_ids"][i]
        lc, lr = cols["chosen_logprobs"][i], cols["rejected_logprobs"][i]
        if not p or not c or not r:
            refusals.append(f"pair {pid} in shard {key}: empty prompt or answer (the prompt must hold at least BOS)")
            continue
        total = len(p) + max(len(c), len(r))
        if total > max_length:
            room = max_length - len(p)
            if truncation != "truncate_answers" or room < 1:
                refusals.append(
                    f"pair {pid} in shard {key} is {total} tokens (prompt {len(p)} + longest answer "
                    f"{max(len(c), len(r))}), over --max-length {max_length}; raise --max-length or set "
                    f"--truncation truncate_answers"
                )
                continue
            c, lc, r, lr = c[:room], lc[:room], r[:room], lr[:room]
        examples.append(Example(pid, p, c, r, lc, lr, key))
    return examples, refusals


# -- replay ------------------------------------------------------------------------------------
class ReplaySource:
    """Fixed epochs over an S3 prefix. Position = (epoch, index into that epoch's shuffled order)."""

    def __init__(
        self, store, prefix: str, epochs: int, seed: int, expected_fp, allowed_ids, max_length: int, truncation: str
    ):
        keys = [k for k in store.list_keys(prefix) if k.endswith(".parquet")]
        if not keys:
            raise DataError(f"no *.parquet shards under s3://{store.bucket}/{prefix}")
        by_id: dict[str, Example] = {}
        for key in keys:
            examples, refusals = examples_from_shard(
                store.get_bytes(key), key, expected_fp, allowed_ids, max_length, truncation
            )
            if refusals:
                raise DataError(f"{len(refusals)} record(s) refused, nothing trained: " + "; ".join(refusals[:5]))
            for e in examples:
                by_id.setdefault(e.pair_id, e)  # identity by content: a pair in two shards trains once
        self.shards = keys
        self.pairs = [by_id[k] for k in sorted(by_id)]
        self.epochs, self.seed = epochs, seed
        self.epoch, self.index = 0, 0
        log.info("replay: %d shards, %d unique pairs, %d epochs", len(keys), len(self.pairs), epochs)

    def order(self, epoch: int) -> list[Example]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(self.pairs)
        rng.shuffle(order)
        return order

    def steps_per_epoch(self, batch: int) -> int:
        return -(-len(self.pairs) // batch)

    def next_batch(self, size: int) -> list[Example] | None:
        while self.epoch < self.epochs:
            order = self.order(self.epoch)
            if self.index < len(order):
                batch = order[self.index : self.index + size]  # the last batch of an epoch may be short
                self.index += len(batch)
                return batch
            self.epoch, self.index = self.epoch + 1, 0
        return None

    def state(self) -> dict:
        return {"mode": "replay", "epoch": self.epoch, "index": self.index, "shards": self.shards}

    def load_state(self, state: dict) -> None:
        if state.get("shards") != self.shards:
            raise DataError(
                "the shards under the prefix changed since the checkpoint (was "
                f"{len(state.get('shards', []))}, now {len(self.shards)}); replay needs the same set to "
                "resume exactly once, start a new --run-name"
            )
        self.epoch, self.index = state["epoch"], state["index"]

    def close(self) -> None:
        pass


# -- continuous --------------------------------------------------------------------------------
@dataclass
class _Event:
    partition: int
    offset: int
    key: str
    pending: set = field(default_factory=set)  # pair ids of this event not yet trained


class StreamSource:
    """Follows the shard-ready topic. Not thread-safe; lives on rank 0."""

    def __init__(
        self,
        store,
        consumer,
        deadletter,
        expected_fp,
        allowed_ids,
        max_length: int,
        truncation: str,
        poll_timeout_ms: int,
        stop_when_idle_s: float,
        topic: str,
    ):
        self.store, self.consumer, self.deadletter = store, consumer, deadletter
        self.expected_fp, self.allowed_ids = expected_fp, allowed_ids
        self.max_length, self.truncation = max_length, truncation
        self.poll_timeout_ms, self.stop_when_idle_s, self.topic = poll_timeout_ms, stop_when_idle_s, topic
        self.trained: set[str] = set()  # pair ids trained in this run (the one "epoch" of a stream)
        self.done_shards: set[str] = set()  # object keys whose every pair is trained
        self.buffer: list[Example] = []
        self.buffered: set[str] = set()
        self.events: list[_Event] = []  # in arrival order, until fully trained
        self.last_offset: dict[int, int] = {}
        self.last_new = time.monotonic()
        self.stop_requested = None  # a threading.Event: set, next_batch stops waiting and returns None

    def _in_flight(self) -> set[str]:
        return {e.key for e in self.events}

    def _handle(self, rec) -> None:
        self.last_offset[rec.partition] = rec.offset
        try:
            event = decode(
                ShardReady, rec.value, MAX_RECORD_BYTES, f"shard-ready event {rec.topic}[{rec.partition}]@{rec.offset}"
            )
        except RecordError as exc:
            self.deadletter.send_record(rec, str(exc), "decode_error")
            return
        key = event.object_key
        if key in self.done_shards or key in self._in_flight():
            log.info("shard %s announced again: already taken, skipped", key)
            return
        try:
            if event.fingerprint.fingerprint_id:  # cheap check before downloading
                check_fingerprint(event.fingerprint, self.expected_fp, self.allowed_ids, f"shard {key}")
            examples, refusals = examples_from_shard(
                self.store.get_bytes(key), key, self.expected_fp, self.allowed_ids, self.max_length, self.truncation
            )
        except DataError as exc:
            kind = "fingerprint_mismatch" if "fingerprint" in str(exc) else "corrupt_shard"
            self.deadletter.send_record(rec, str(exc), kind)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. the object is missing: dead-letter, keep training
            self.deadletter.send_record(
                rec, f"shard {key} could not be read: {type(exc).__name__}: {exc}", "shard_unreadable"
            )
            return
        if refusals:
            self.deadletter.send_record(
                rec, f"{len(refusals)} record(s) refused, the rest trained: " + "; ".join(refusals), "record_too_long"
            )
        ev = _Event(rec.partition, rec.offset, key)
        for e in examples:
            if e.pair_id in self.trained or e.pair_id in self.buffered:
                continue
            ev.pending.add(e.pair_id)
            self.buffered.add(e.pair_id)
            self.buffer.append(e)
        self.events.append(ev)
        self.last_new = time.monotonic()

    def next_batch(self, size: int, min_size: int = 1) -> list[Example] | None:
        """A full batch as soon as enough pairs arrived; on idle stop, what is left (if >= min_size)."""
        while len(self.buffer) < size:
            if self.stop_requested is not None and self.stop_requested.is_set():
                return None  # the buffered pairs are not trained, so not committed: they come back
            polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
            for tp in sorted(polled, key=lambda t: t.partition):
                for rec in polled[tp]:
                    self._handle(rec)
            if not self.consumer.assignment():  # still joining the group: idle time starts once we have partitions
                self.last_new = time.monotonic()
                continue
            if not polled and self.stop_when_idle_s and time.monotonic() - self.last_new > self.stop_when_idle_s:
                if len(self.buffer) >= min_size:
                    break
                return None
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        self.buffered -= {e.pair_id for e in batch}
        return batch

    def mark_trained(self, batch: list[Example]) -> None:
        ids = {e.pair_id for e in batch}
        self.trained |= ids
        for ev in self.events:
            ev.pending -= ids
        for ev in [e for e in self.events if not e.pending]:
            self.done_shards.add(ev.key)
        self.events = [e for e in self.events if e.pending]

    def commit_offsets(self) -> dict[int, int]:
        """Per partition, the first offset not fully trained: what Kafka may forget is before it."""
        out = {}
        for part, last in self.last_offset.items():
            pending = [e.offset for e in self.events if e.partition == part]
            out[part] = min(pending) if pending else last + 1
        return out

    def state(self) -> dict:
        return {
            "mode": "continuous",
            "trained_pair_ids": sorted(self.trained),
            "done_shards": sorted(self.done_shards),
            "offsets": {str(p): o for p, o in self.commit_offsets().items()},
            "topic": self.topic,
        }

    def load_state(self, state: dict) -> None:
        self.trained = set(state.get("trained_pair_ids", []))
        self.done_shards = set(state.get("done_shards", []))

    def close(self) -> None:
        self.consumer.close()
        self.deadletter.flush()
