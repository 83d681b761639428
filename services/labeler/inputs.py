"""Input formats: candidate sets (JSONL / protobuf), human annotations (JSONL / CSV) and already-labelled
preference data in TRL's standard and conversational forms (JSONL / Parquet).

Every reader yields `Item(source, offset, raw, value | error)`: `offset` is the 1-based line number
(files) or the row index (Parquet), so a malformed input can be dead-lettered with a precise position.
Turning a line, row or record into its message is decoding: whatever fails there is an
`offdpo.errors.DecodeError` (or `RecordTooLarge`), carried by the item with the position in its message.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from offdpo import errors, records
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.errors import InvalidCandidateSet, InvalidJudgement, LabelError
from services.labeler.names import StrategyName, candidate_strategy_problem

CandidateSet = labeler_pb2.CandidateSet
HumanJudgement = labeler_pb2.HumanJudgement
VERDICTS = ("Good", "Same", "Bad")

V = TypeVar("V")


@dataclass
class Item(Generic[V]):
    """One input and where it came from: `value` when it decoded, else `error` (dead-lettered with its
    `error_type`)."""

    source: str
    offset: int
    raw: bytes
    value: V | None = None
    error: errors.BadInput | None = None
    partition: int = -1
    key: bytes | None = None


def _located(where: str, exc: errors.BadInput) -> errors.BadInput:
    """The same kind of error, its message prefixed with where the input was read."""
    return type(exc)(f"{where}: {exc}")


# -- prompts --------------------------------------------------------------------------------
def _messages(value: Any, what: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise errors.DecodeError(f"{what} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise errors.DecodeError(f"{what}[{i}] must be an object with string 'role' and 'content'")
        if not m["role"]:
            raise errors.DecodeError(f"{what}[{i}].role is empty")
        out.append((m["role"], m["content"]))
    return out


def prompt_problem(prompt: records_pb2.Prompt, what: str = "prompt") -> str | None:
    """What is wrong with a prompt, or None. The one prompt check: decoders, the candidate-set and
    judgement validators and the gRPC server all ask it."""
    kind = prompt.WhichOneof("kind")
    if kind is None:
        return f"{what} is missing: set prompt.chat, prompt.text or prompt.token_ids"
    if kind == "chat" and not prompt.chat.messages:
        return f"{what}.chat has no messages"
    if kind == "text" and not prompt.text.strip():
        return f"{what} is empty"
    if kind == "token_ids" and not prompt.token_ids.ids:
        return f"{what}.token_ids is empty"
    return None


def parse_prompt(value: Any, what: str = "prompt") -> records_pb2.Prompt:
    """A prompt from JSON: a string (plain text, no template) or a list of chat messages."""
    if isinstance(value, str):
        prompt = records.text_prompt(value)
    elif isinstance(value, list):
        prompt = records.chat_prompt(_messages(value, what))
    elif value is None:
        raise errors.DecodeError(f"missing '{what}': give a string or a list of {{role, content}} messages")
    else:
        raise errors.DecodeError(f"{what} must be a string or a list of messages, not {type(value).__name__}")
    wrong = prompt_problem(prompt, what)
    if wrong:
        raise errors.DecodeError(wrong)
    return prompt


def readable_kind(prompt: records_pb2.Prompt, who: str) -> Literal["text", "chat"]:
    """The prompt's kind for strategies that read text; LabelError for token ids."""
    kind = prompt.WhichOneof("kind")
    if kind == "text" or kind == "chat":
        return kind
    raise LabelError(f"{who} needs a text or chat prompt, not token ids")


def prompt_text(prompt: records_pb2.Prompt) -> str:
    """Readable text of a prompt for judges and rules: chat rendered as 'role: content' lines."""
    if readable_kind(prompt, "this strategy") == "text":
        return prompt.text
    return "\n".join(f"{m.role}: {m.content}" for m in prompt.chat.messages)


# -- candidate sets -------------------------------------------------------------------------
_CANDIDATE_KEYS = {"id", "set_id", "prompt", "answers", "reference", "metadata", "strategy", "generate_n"}


def candidate_set_from_json(obj: Any) -> CandidateSet:
    if not isinstance(obj, dict):
        raise errors.DecodeError(f"a candidate set must be a JSON object, not {type(obj).__name__}")
    unknown = set(obj) - _CANDIDATE_KEYS
    if unknown:
        raise errors.DecodeError(f"unknown keys {sorted(unknown)}; a candidate set has {sorted(_CANDIDATE_KEYS)}")
    cs = CandidateSet(set_id=str(obj.get("set_id", obj.get("id", "")) or ""))
    cs.prompt.CopyFrom(parse_prompt(obj.get("prompt")))
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise errors.DecodeError("'answers' must be a list of strings")
    cs.answers.extend(answers)
    if obj.get("reference") is not None:
        if not isinstance(obj["reference"], str):
            raise errors.DecodeError("'reference' must be a string")
        cs.reference = obj["reference"]
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise errors.DecodeError("'metadata' must be an object")
    for k, v in meta.items():
        cs.metadata[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    if obj.get("strategy") is not None:
        if not isinstance(obj["strategy"], str):
            raise errors.DecodeError("'strategy' must be a string")
        cs.strategy = obj["strategy"]
    gen = obj.get("generate_n", 0)
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
        raise errors.DecodeError("'generate_n' must be a non-negative integer")
    cs.generate_n = gen
    return cs


def validate_candidate_set(cs: CandidateSet, max_answers: int, generating: bool = False) -> None:
    """Raise InvalidCandidateSet saying what is wrong with a candidate set (before any generation)."""
    wrong = prompt_problem(cs.prompt)
    if wrong:
        raise InvalidCandidateSet(wrong)
    n = len(cs.answers)
    if n > max_answers:
        raise InvalidCandidateSet(f"{n} answers, over the limit of {max_answers}")
    if not (generating or cs.generate_n > 0) and n < 2:
        raise InvalidCandidateSet(
            f"needs at least 2 answers to compare, got {n} (or set generate_n for on-policy samples)"
        )
    for i, a in enumerate(cs.answers):
        if not a.strip():
            raise InvalidCandidateSet(f"answers[{i}] is empty")
    if len(set(cs.answers)) != n:
        raise InvalidCandidateSet("answers contain duplicates: each answer must be distinct")
    wrong = candidate_strategy_problem(cs.strategy) if cs.strategy else None
    if wrong:
        raise InvalidCandidateSet(wrong)


def _decode_json_line(line: bytes, max_bytes: int) -> Any:
    if len(line) > max_bytes:
        raise errors.RecordTooLarge(f"line is {len(line)} bytes, over the limit of {max_bytes}")
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.DecodeError(f"not valid JSON: {exc}") from None


def read_jsonl(path: str | Path, parse: Callable[[Any], V], max_bytes: int) -> Iterator[Item[V]]:
    """Yield one Item per non-blank line; `parse(obj)` builds the value or raises a BadInput."""
    path = Path(path)
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            item: Item[V] = Item(source=str(path), offset=lineno, raw=line.rstrip(b"\r\n"))
            try:
                item.value = parse(_decode_json_line(item.raw, max_bytes))
            except errors.BadInput as exc:
                item.error = _located(f"{path}:{lineno}", exc)
            yield item


def read_candidates_file(path: str | Path, max_bytes: int) -> Iterator[Item[CandidateSet]]:
    return read_jsonl(path, candidate_set_from_json, max_bytes)


def candidate_set_from_record(value: bytes | None, max_bytes: int) -> CandidateSet:
    return records.decode(CandidateSet, value, max_bytes, "candidate set")


def candidate_item(record: Any, max_bytes: int) -> Item[CandidateSet]:
    """A kafka-python ConsumerRecord of the candidates topic as an Item."""
    item: Item[CandidateSet] = Item(
        source=record.topic, offset=record.offset, raw=record.value or b"", partition=record.partition, key=record.key
    )
    try:
        item.value = candidate_set_from_record(record.value, max_bytes)
    except errors.BadInput as exc:
        item.error = _located(f"{record.topic}[{record.partition}]@{record.offset}", exc)
    return item


# -- human annotations ----------------------------------------------------------------------
def judgement_from_json(obj: Any) -> HumanJudgement:
    """{prompt, chosen, rejected, annotator} or {prompt, answer_a, answer_b, verdict, annotator}."""
    if not isinstance(obj, dict):
        raise errors.DecodeError(f"an annotation must be an object, not {type(obj).__name__}")
    prompt = obj.get("prompt")
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        try:  # CSV cells carry message lists as JSON text
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            pass
    j = HumanJudgement(annotator=str(obj.get("annotator") or ""), source=str(obj.get("source") or ""))
    j.prompt.CopyFrom(parse_prompt(prompt))
    if "chosen" in obj or "rejected" in obj:
        if "verdict" in obj:
            raise errors.DecodeError("give either chosen/rejected or answer_a/answer_b/verdict, not both")
        j.answer_a, j.answer_b, j.verdict = obj.get("chosen") or "", obj.get("rejected") or "", "Good"
    else:
        j.answer_a, j.answer_b = obj.get("answer_a") or "", obj.get("answer_b") or ""
        j.verdict = str(obj.get("verdict") or "")
    meta = obj.get("metadata") or {}
    if isinstance(meta, dict):
        for k, v in meta.items():
            j.metadata[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    validate_judgement(j)
    return j


def validate_judgement(j: HumanJudgement) -> None:
    wrong = prompt_problem(j.prompt)
    if wrong:
        raise InvalidJudgement(wrong)
    if not j.annotator.strip():
        raise InvalidJudgement("annotator is required (who made this judgement)")
    if not isinstance(j.answer_a, str) or not j.answer_a.strip():
        raise InvalidJudgement("answer_a (or chosen) is missing or empty")
    if not j.answer_b.strip():
        raise InvalidJudgement("answer_b (or rejected) is missing or empty")
    if j.answer_a == j.answer_b:
        raise InvalidJudgement("the two answers are identical: no preference to record")
    if j.verdict not in VERDICTS:
        raise InvalidJudgement(f"verdict {j.verdict!r} is not one of {list(VERDICTS)} (Good = answer_a is better)")


def read_annotations(path: str | Path, max_bytes: int) -> Iterator[Item[HumanJudgement]]:
    path = Path(path)
    if path.suffix.lower() != ".csv":
        yield from read_jsonl(path, judgement_from_json, max_bytes)
        return
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            lineno = reader.line_num
            buf = io.StringIO()
            csv.writer(buf).writerow(list(row.values()))
            item: Item[HumanJudgement] = Item(
                source=str(path), offset=lineno, raw=buf.getvalue().rstrip("\r\n").encode()
            )
            try:
                if None in row:
                    raise errors.DecodeError("row has more cells than the header")
                item.value = judgement_from_json({k: v for k, v in row.items() if v not in (None, "")})
            except errors.BadInput as exc:
                item.error = _located(f"{path}:{lineno}", exc)
            yield item


# -- imported preference data (TRL formats) -------------------------------------------------
def _answer_from_messages(
    conv: list[tuple[str, str]], prompt_msgs: list[tuple[str, str]] | None, what: str
) -> tuple[list[tuple[str, str]], str]:
    """Split a conversation into (prompt messages, final assistant answer)."""
    if prompt_msgs is not None and conv[: len(prompt_msgs)] == prompt_msgs and len(conv) > len(prompt_msgs):
        rest = conv[len(prompt_msgs) :]
    elif prompt_msgs is not None and len(conv) == 1:
        rest = conv
    else:
        prompt_msgs, rest = conv[:-1], conv[-1:]
    if len(rest) != 1 or rest[0][0] != "assistant":
        raise errors.DecodeError(f"{what} must end in exactly one assistant message after the prompt")
    if not prompt_msgs:
        raise errors.DecodeError(f"{what} has no prompt messages before the answer, and no 'prompt' was given")
    return prompt_msgs, rest[0][1]


def imported_pair(obj: Any, source: str) -> records_pb2.PreferencePair:
    """A TRL-style preference row -> PreferencePair with provenance "imported".

    Standard: prompt/chosen/rejected strings. Conversational: message lists, either with an explicit
    prompt (chosen/rejected hold the assistant turn) or implicit (chosen/rejected hold the whole
    conversation, as in UltraFeedback-binarized, where `prompt` is also given as the user's text).
    """
    if not isinstance(obj, dict):
        raise errors.DecodeError(f"a preference row must be an object, not {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj or obj[key] in (None, "", []):
            raise errors.DecodeError(f"missing or empty '{key}'")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            raise errors.DecodeError("standard format needs a 'prompt' when chosen/rejected are strings")
        pb_prompt, c_text, r_text = parse_prompt(prompt), chosen, rejected
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pb_prompt, c_text, r_text = _conversational(prompt, chosen, rejected)
    else:
        raise errors.DecodeError("chosen and rejected must both be strings or both be message lists")
    if not c_text.strip() or not r_text.strip():
        raise errors.DecodeError("an answer is empty")
    if c_text == r_text:
        raise errors.DecodeError("chosen and rejected answers are identical: no preference to learn")
    return records.make_pair(pb_prompt, c_text, r_text, _imported_provenance(obj, source))


def _conversational(prompt: Any, chosen: list[Any], rejected: list[Any]) -> tuple[records_pb2.Prompt, str, str]:
    """(prompt, chosen answer, rejected answer) from conversational rows, explicit or implicit prompt."""
    c_conv, r_conv = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if isinstance(prompt, list):
        p_msgs: list[tuple[str, str]] | None = _messages(prompt, "prompt")
    elif isinstance(prompt, str):
        p_msgs = [("user", prompt)]
    elif prompt is None:
        p_msgs = None
    else:
        raise errors.DecodeError("'prompt' must be a string or a list of messages")
    pc, c_text = _answer_from_messages(c_conv, p_msgs, "chosen")
    pr, r_text = _answer_from_messages(r_conv, p_msgs, "rejected")
    if pc != pr:
        raise errors.DecodeError("chosen and rejected conversations have different prompts")
    return records.chat_prompt(pc), c_text, r_text


def _imported_provenance(obj: dict[str, Any], source: str) -> records_pb2.Provenance:
    prov = records_pb2.Provenance(strategy=StrategyName.IMPORTED.label_strategy, source=source)
    for key, attr in (("score_chosen", "chosen_score"), ("score_rejected", "rejected_score")):
        if obj.get(key) is not None:
            try:
                setattr(prov, attr, float(obj[key]))
            except (TypeError, ValueError):
                raise errors.DecodeError(f"'{key}' must be a number") from None
    for key in ("prompt_id", "source", "annotator"):
        if isinstance(obj.get(key), str) and obj[key]:
            if key == "annotator":
                prov.annotator = obj[key]
            else:
                prov.metadata[key] = obj[key]
    return prov


def read_preferences(path: str | Path, max_bytes: int) -> Iterator[Item[records_pb2.PreferencePair]]:
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        yield from read_jsonl(path, lambda obj: imported_pair(obj, str(path)), max_bytes)
        return
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row_index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            raw = json.dumps(row, ensure_ascii=False, default=str).encode()
            item: Item[records_pb2.PreferencePair] = Item(source=str(path), offset=row_index, raw=raw)
            try:
                if len(raw) > max_bytes:
                    raise errors.RecordTooLarge(f"row is {len(raw)} bytes, over the limit of {max_bytes}")
                item.value = imported_pair(row, str(path))
            except errors.BadInput as exc:
                item.error = _located(f"{path} row {row_index}", exc)
            row_index += 1
            yield item
