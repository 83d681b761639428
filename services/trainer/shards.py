"""One scored shard: fetched, checked and turned into training examples.

Refusals are `offdpo.errors` classes (CorruptShard, FingerprintMismatch, DecodeError, ...): a
dead letter's error_type is the class's, never read from the message.

An object the event promised that does not exist (ShardMissing) and an over-long object (ShardTooLarge)
are the data's fault; every other failure to fetch is the infrastructure's (services.trainer.infra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from offdpo import errors
from offdpo.errors import BadInput, FingerprintMismatch
from offdpo.records import (
    ReferenceFingerprint,
    fingerprint_mismatch,
    read_shard,
)
from services.trainer.examples import Example, Refusal
from services.trainer.infra import _is_missing


class DataError(BadInput):
    """The run's training data was refused as a whole (replay: a bad shard or record stops the run
    before step 1; a resume that cannot continue exactly once). The message names the shard, the pair
    and what to fix."""

    error_type = "data_refused"


class ShardMissing(BadInput):
    """The object a shard-ready event names does not exist (NoSuchKey): the event promised data
    that is not there, which no retry brings back."""

    error_type = "shard_unreadable"


class ShardTooLarge(errors.TooLarge):
    """A shard over --max-shard-bytes: refused before it is downloaded."""

    error_type = "shard_too_large"


class ObjectReader(Protocol):
    """What the sources read from the object store (offdpo.s3.ObjectStore)."""

    bucket: str

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def list_keys(self, prefix: str) -> list[str]: ...


def fetch_shard(store: ObjectReader, key: str, max_bytes: int) -> bytes:
    """The shard's bytes; ShardMissing or ShardTooLarge when the data itself is wrong; any other
    exception is the infrastructure's (see is_infrastructure)."""
    try:
        return store.get_bytes(key, max_bytes=max_bytes)
    except Exception as exc:
        if _is_missing(exc):
            raise ShardMissing(f"shard {key} could not be read: the object does not exist ({exc})") from None
        # The store refuses an object over `max_bytes` (errors.TooLarge): the shard is too big, not
        # the store unreachable.
        if isinstance(exc, errors.TooLarge):
            raise ShardTooLarge(f"shard {key}: {exc}; raise --max-shard-bytes to train on it") from None
        raise


def check_fingerprint(
    shard_fp: ReferenceFingerprint, expected_fp: ReferenceFingerprint, allowed_ids: Iterable[str], what: str
) -> None:
    """Raises FingerprintMismatch unless the shard was scored by this run's reference (or is allowed)."""
    if shard_fp.fingerprint_id in allowed_ids:
        return
    diff = fingerprint_mismatch(expected_fp, shard_fp)
    if diff:
        raise FingerprintMismatch(
            f"{what}: reference fingerprint {shard_fp.fingerprint_id} does not match this run's "
            f"reference {expected_fp.fingerprint_id} ({diff}). Rescore with the run's reference, point "
            f"--reference-model at the model that scored it, or accept it deliberately with "
            f"--allow-fingerprint {shard_fp.fingerprint_id}"
        )


def _bad_rows(column: pa.ChunkedArray, bad: Callable[[pa.Array], pa.Array]) -> set[int]:
    """Rows of a list column where `bad` is true for some element (vectorised: no per-token Python)."""
    arr = column.combine_chunks()
    flat = pc.list_flatten(arr)
    if len(flat) == 0:
        return set()
    return set(pc.filter(pc.list_parent_indices(arr), bad(flat)).to_pylist())


def poisoned_rows(table: pa.Table, vocab_size: int | None) -> dict[int, tuple[str, str]]:
    """Row index -> (error_type, what is wrong) for rows no step may train on: a token id outside the
    model's vocabulary (an embedding lookup out of range crashes every restart) or a reference
    log-prob that is NaN or infinite (it turns the loss, then every weight, into NaN)."""
    out: dict[int, tuple[str, str]] = {}
    for col in ("chosen_logprobs", "rejected_logprobs"):
        for i in _bad_rows(table.column(col), lambda a: pc.invert(pc.is_finite(a))):
            out.setdefault(i, ("poisoned_values", f"a non-finite reference log-prob (NaN or inf) in {col}"))
    if vocab_size:
        for col in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids"):
            for i in _bad_rows(table.column(col), lambda a: pc.or_(pc.less(a, 0), pc.greater_equal(a, vocab_size))):
                out.setdefault(
                    i, ("token_out_of_vocab", f"a token id in {col} outside the model's vocabulary [0, {vocab_size})")
                )
    return out


def examples_from_shard(
    data: bytes,
    key: str,
    expected_fp: ReferenceFingerprint,
    allowed_ids: Iterable[str],
    max_length: int,
    truncation: str,
    vocab_size: int | None = None,
) -> tuple[list[Example], list[Refusal]]:
    """Parse and check one shard. Returns (examples, refusals of single records); a shard-level fault
    raises CorruptShard or FingerprintMismatch.

    Truncation rule: a record is too long when len(prompt) + max(len(chosen), len(rejected)) > max_length.
    'refuse' refuses it; 'truncate_answers' keeps the prompt and cuts both answers to the tokens that
    fit, with their reference log-probs cut the same way (causal: a prefix's log-probs do not change).
    A prompt that leaves no room for an answer is always refused. Poisoned records (see
    poisoned_rows; `vocab_size` None skips the vocabulary check) are refused too.
    """
    shard = read_shard(data, what=f"shard {key}")
    check_fingerprint(shard.fingerprint, expected_fp, allowed_ids, f"shard {key}")
    poisoned = poisoned_rows(shard.table, vocab_size)
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
    examples: list[Example] = []
    refusals: list[Refusal] = []
    for i, pid in enumerate(cols["pair_id"]):
        if i in poisoned:
            error_type, what = poisoned[i]
            refusals.append(Refusal(f"pair {pid} in shard {key}: {what}", error_type))
            continue
        p, c, r = cols["prompt_token_ids"][i], cols["chosen_token_ids"][i], cols["rejected_token_ids"][i]
        lc, lr = cols["chosen_logprobs"][i], cols["rejected_logprobs"][i]
        if not p or not c or not r:
            refusals.append(
                Refusal(
                    f"pair {pid} in shard {key}: empty prompt or answer (the prompt must hold at least BOS)",
                    "invalid_record",
                )
            )
            continue
        total = len(p) + max(len(c), len(r))
        if total > max_length:
            room = max_length - len(p)
            if truncation != "truncate_answers" or room < 1:
                refusals.append(
                    Refusal(
                        f"pair {pid} in shard {key} is {total} tokens (prompt {len(p)} + longest answer "
                        f"{max(len(c), len(r))}), over --max-length {max_length}; raise --max-length or set "
                        f"--truncation truncate_answers",
                        "record_too_long",
                    )
                )
                continue
            c, lc, r, lr = c[:room], lc[:room], r[:room], lr[:room]
        examples.append(Example(pid, p, c, r, lc, lr, key))
    return examples, refusals
