"""Record helpers shared by every service: content ids, fingerprints, decoding, Parquet shards.

Identity by content: `pair_id` hashes the canonical (prompt, chosen, rejected) content, so the
same pair labelled twice, or re-delivered by Kafka, has the same id. Shard keys are derived from
the fingerprint, the topic's incarnation (its topic id) and the Kafka positions a shard covers, so a
redo after a crash rewrites the same key and a recreated topic never reuses one.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from offdpo import errors
from offdpo.s3 import safe_key_part
from offdpo.v1 import records_pb2

M = TypeVar("M", bound=Message)

PreferencePair = records_pb2.PreferencePair
ScoredPair = records_pb2.ScoredPair
ShardReady = records_pb2.ShardReady
DeadLetter = records_pb2.DeadLetter
ReferenceFingerprint = records_pb2.ReferenceFingerprint
Prompt = records_pb2.Prompt

SHARD_FORMAT_VERSION = "1"
# Largest shard any reader accepts (a shard of 4096 pairs of 4k tokens is ~200 MB).
MAX_SHARD_BYTES = 512 * 1024 * 1024


# Re-exported: records are where most callers meet them.
RecordError = errors.RecordError
CorruptShard = errors.CorruptShard


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_prompt(prompt: records_pb2.Prompt) -> object:
    kind = prompt.WhichOneof("kind")
    if kind == "chat":
        return {"chat": [[m.role, m.content] for m in prompt.chat.messages]}
    if kind == "text":
        return {"text": prompt.text}
    if kind == "token_ids":
        return {"token_ids": list(prompt.token_ids.ids)}
    return None


def pair_id(prompt: records_pb2.Prompt, chosen: str, rejected: str) -> str:
    """128-bit content id of a pair (hex). Provenance is not part of identity."""
    canonical = json.dumps(
        {"prompt": canonical_prompt(prompt), "chosen": chosen, "rejected": rejected},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return _sha256(canonical.encode("utf-8"))[:32]


def chat_prompt(messages: Sequence[tuple[str, str] | dict]) -> records_pb2.Prompt:
    conv = records_pb2.Conversation()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        conv.messages.add(role=role, content=content)
    return records_pb2.Prompt(chat=conv)


def text_prompt(text: str) -> records_pb2.Prompt:
    return records_pb2.Prompt(text=text)


def make_pair(
    prompt: records_pb2.Prompt, chosen: str, rejected: str, provenance: records_pb2.Provenance | None = None
) -> records_pb2.PreferencePair:
    pair = records_pb2.PreferencePair(pair_id=pair_id(prompt, chosen, rejected), chosen=chosen, rejected=rejected)
    pair.prompt.CopyFrom(prompt)
    if provenance is not None:
        pair.provenance.CopyFrom(provenance)
    return pair


def validate_pair(pair: records_pb2.PreferencePair) -> None:
    kind = pair.prompt.WhichOneof("kind")
    if kind is None:
        raise RecordError("pair has no prompt: set prompt.chat, prompt.text or prompt.token_ids")
    if kind == "chat" and not pair.prompt.chat.messages:
        raise RecordError("pair's prompt.chat has no messages")
    if kind == "text" and not pair.prompt.text:
        raise RecordError("pair's prompt.text is empty")
    if not pair.chosen:
        raise RecordError("pair's chosen answer is empty")
    if not pair.rejected:
        raise RecordError("pair's rejected answer is empty")
    if pair.chosen == pair.rejected:
        raise RecordError("pair's chosen and rejected answers are identical: no preference to learn")
    expected = pair_id(pair.prompt, pair.chosen, pair.rejected)
    if pair.pair_id != expected:
        raise RecordError(
            f"pair_id {pair.pair_id!r} does not match its content (expected {expected}); "
            f"build pairs with offdpo.records.make_pair"
        )


def decode(message_type: type[M], data: bytes | None, max_bytes: int, what: str) -> M:
    """Parse untrusted bytes into `message_type`, refusing empty, oversized, malformed or unknown-field input."""
    if not data:
        raise errors.DecodeError(f"{what} is empty")
    if len(data) > max_bytes:
        raise errors.RecordTooLarge(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise errors.DecodeError(f"{what} is not a valid {message_type.DESCRIPTOR.full_name}: {exc}") from None
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    if msg.ByteSize() != size:
        raise errors.DecodeError(
            f"{what} has fields unknown to {message_type.DESCRIPTOR.full_name} "
            f"(wrong message type, or a newer schema than this service)"
        )
    return msg


def decode_pair(data: bytes | None, max_bytes: int = 4 * 1024 * 1024) -> records_pb2.PreferencePair:
    pair = decode(records_pb2.PreferencePair, data, max_bytes, "preference pair")
    validate_pair(pair)
    return pair


# -- fingerprints ---------------------------------------------------------------------------
_FINGERPRINT_IDENTITY = ("model_id", "weights_hash", "tokenizer_hash", "chat_template_hash", "dtype")


def fingerprint_id(fp: records_pb2.ReferenceFingerprint) -> str:
    """Hash of what determines the scores (engine excluded: engines agree within tolerance)."""
    ident = {name: getattr(fp, name) for name in _FINGERPRINT_IDENTITY}
    return _sha256(json.dumps(ident, sort_keys=True).encode())[:16]


def with_fingerprint_id(fp: records_pb2.ReferenceFingerprint) -> records_pb2.ReferenceFingerprint:
    out = records_pb2.ReferenceFingerprint()
    out.CopyFrom(fp)
    out.fingerprint_id = fingerprint_id(fp)
    return out


def fingerprint_mismatch(expected: records_pb2.ReferenceFingerprint, got: records_pb2.ReferenceFingerprint) -> str:
    """Empty if the two identify the same reference; otherwise which fields differ."""
    diffs = [
        f"{name}: expected {getattr(expected, name)!r}, got {getattr(got, name)!r}"
        for name in _FINGERPRINT_IDENTITY
        if getattr(expected, name) != getattr(got, name)
    ]
    return "; ".join(diffs)


# -- Parquet shards -------------------------------------------------------------------------
SCORED_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("pair", pa.binary(), nullable=False),  # serialized PreferencePair
        pa.field("fingerprint_id", pa.string(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("chosen_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rejected_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("chosen_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("rejected_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("chosen_logprob_sum", pa.float64(), nullable=False),
        pa.field("rejected_logprob_sum", pa.float64(), nullable=False),
    ]
)


def validate_scored(row: records_pb2.ScoredPair) -> None:
    if len(row.chosen_token_ids) == 0 or len(row.rejected_token_ids) == 0:
        raise RecordError(f"scored pair {row.pair.pair_id}: an answer has no tokens")
    if len(row.chosen_logprobs) != len(row.chosen_token_ids):
        raise RecordError(
            f"scored pair {row.pair.pair_id}: {len(row.chosen_logprobs)} chosen log-probs for "
            f"{len(row.chosen_token_ids)} chosen tokens"
        )
    if len(row.rejected_logprobs) != len(row.rejected_token_ids):
        raise RecordError(
            f"scored pair {row.pair.pair_id}: {len(row.rejected_logprobs)} rejected log-probs for "
            f"{len(row.rejected_token_ids)} rejected tokens"
        )


def scored_pairs_to_parquet(
    rows: Sequence[records_pb2.ScoredPair], fingerprint: records_pb2.ReferenceFingerprint
) -> bytes:
    """One shard: all rows share `fingerprint`, which is also stored in the file's metadata."""
    fp_id = fingerprint.fingerprint_id or fingerprint_id(fingerprint)
    for row in rows:
        validate_scored(row)
    table = pa.table(
        {
            "pair_id": [r.pair.pair_id for r in rows],
            "pair": [r.pair.SerializeToString() for r in rows],
            "fingerprint_id": [fp_id] * len(rows),
            "prompt_token_ids": [list(r.prompt_token_ids) for r in rows],
            "chosen_token_ids": [list(r.chosen_token_ids) for r in rows],
            "rejected_token_ids": [list(r.rejected_token_ids) for r in rows],
            "chosen_logprobs": [list(r.chosen_logprobs) for r in rows],
            "rejected_logprobs": [list(r.rejected_logprobs) for r in rows],
            "chosen_logprob_sum": [r.chosen_logprob_sum for r in rows],
            "rejected_logprob_sum": [r.rejected_logprob_sum for r in rows],
        },
        schema=SCORED_SCHEMA,
    )
    meta = {
        b"offdpo.shard_format": SHARD_FORMAT_VERSION.encode(),
        b"offdpo.fingerprint": json_format.MessageToJson(fingerprint, indent=None).encode(),
    }
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    # Fixed writer settings and no timestamps: the same rows give the same bytes (idempotent redo).
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return buf.getvalue()


@dataclass
class Shard:
    fingerprint: records_pb2.ReferenceFingerprint
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def pair_ids(self) -> list[str]:
        return self.table.column("pair_id").to_pylist()

    def rows(self) -> Iterable[records_pb2.ScoredPair]:
        cols = {name: self.table.column(name).to_pylist() for name in SCORED_SCHEMA.names}
        for i in range(self.table.num_rows):
            row = records_pb2.ScoredPair(
                prompt_token_ids=cols["prompt_token_ids"][i],
                chosen_token_ids=cols["chosen_token_ids"][i],
                rejected_token_ids=cols["rejected_token_ids"][i],
                chosen_logprobs=cols["chosen_logprobs"][i],
                rejected_logprobs=cols["rejected_logprobs"][i],
                chosen_logprob_sum=cols["chosen_logprob_sum"][i],
                rejected_logprob_sum=cols["rejected_logprob_sum"][i],
            )
            row.pair.ParseFromString(cols["pair"][i])
            row.fingerprint.CopyFrom(self.fingerprint)
            yield row


def read_shard(data: bytes, what: str = "shard") -> Shard:
    """Parse and check a scored shard; raises CorruptShard with the reason if it is corrupt."""
    if len(data) > MAX_SHARD_BYTES:
        raise CorruptShard(f"{what} is {len(data)} bytes, over the limit of {MAX_SHARD_BYTES}")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptShard(f"{what} is not a readable Parquet file: {exc}") from None
    meta = table.schema.metadata or {}
    if meta.get(b"offdpo.shard_format") != SHARD_FORMAT_VERSION.encode():
        raise CorruptShard(
            f"{what} has shard format {meta.get(b'offdpo.shard_format')!r}, expected {SHARD_FORMAT_VERSION!r}"
        )
    if not table.schema.remove_metadata().equals(SCORED_SCHEMA):
        raise CorruptShard(f"{what} has schema {table.schema.remove_metadata()}, expected {SCORED_SCHEMA}")
    try:
        fingerprint = json_format.Parse(meta[b"offdpo.fingerprint"], records_pb2.ReferenceFingerprint())
    except (KeyError, json_format.ParseError) as exc:
        raise CorruptShard(f"{what} has no valid fingerprint metadata: {exc}") from None
    fp_ids = set(table.column("fingerprint_id").to_pylist())
    if fp_ids - {fingerprint.fingerprint_id}:
        raise CorruptShard(f"{what} mixes fingerprints {sorted(fp_ids)}; expected only {fingerprint.fingerprint_id}")
    # Token ids and log-probs must line up row by row.
    for a, b in (("chosen_token_ids", "chosen_logprobs"), ("rejected_token_ids", "rejected_logprobs")):
        la = pc.list_value_length(table.column(a))
        lb = pc.list_value_length(table.column(b))
        if not pc.all(pc.equal(la, lb)).as_py():
            raise CorruptShard(f"{what}: {a} and {b} have different lengths in some row")
    return Shard(fingerprint=fingerprint, table=table)


def shard_key(
    fp_id: str, topic: str, partition: int, first_offset: int, last_offset: int, topic_id: str | None = None
) -> str:
    """S3 key of the shard covering offsets [first_offset, last_offset] of one partition.

    `topic_id` names the topic's incarnation (Kafka's topic id, `offdpo.kafka.topic_id`):
    scores/<fingerprint>/<topic>/id-<topic id>/pNNNN-<first>-<last>.parquet. Offsets restart at 0
    when a topic is deleted and created again (or when a broker loses its log and the topic is
    created anew); the new incarnation gets a new topic id, so its shards never share a key with the
    old one's. Without `topic_id` the key has no incarnation segment (scores/<fp>/<topic>/pNNNN-...):
    keys of that form can alias across incarnations. Readers take keys from ShardReady events or list
    them under scores/<fingerprint>/, and parse nothing but the file name (`parse_shard_key`), so
    both forms are read alike.
    """
    return (
        f"{shard_key_prefix(fp_id, topic, partition, topic_id=topic_id)}{first_offset:012d}-{last_offset:012d}.parquet"
    )


def shard_key_prefix(
    fp_id: str, topic: str, partition: int, first_offset: int | None = None, topic_id: str | None = None
) -> str:
    incarnation = "" if topic_id is None else f"{safe_key_part('id-' + topic_id, 'topic id')}/"
    prefix = (
        f"scores/{safe_key_part(fp_id, 'fingerprint id')}/{safe_key_part(topic, 'topic')}/"
        f"{incarnation}p{partition:04d}-"
    )
    return prefix if first_offset is None else f"{prefix}{first_offset:012d}-"


def parse_shard_key(key: str) -> tuple[int, int, int]:
    """(partition, first_offset, last_offset) of a key made by shard_key (either form)."""
    name = key.rsplit("/", 1)[-1].removesuffix(".parquet")
    part, first, last = name.split("-")
    return int(part[1:]), int(first), int(last)


def sha256_hex(data: bytes) -> str:
    return _sha256(data)
