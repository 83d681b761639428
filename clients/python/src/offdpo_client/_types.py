"""Requests built from plain Python values, and typed results read out of the responses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

from offdpo_client.v1 import records_pb2, refscore_pb2

# A chat message: ("user", "hi") or {"role": "user", "content": "hi"}.
Message = Union[tuple[str, str], Mapping[str, str]]
# A prompt: plain text (used verbatim, no chat template), chat messages (the server applies the model's
# chat template with the generation prompt), or a records_pb2.Prompt (e.g. token_prompt's).
PromptLike = Union[str, Sequence[Message], records_pb2.Prompt]
# An answer: text (tokenised by the server) or token ids (scored verbatim).
AnswerLike = Union[str, Sequence[int]]


def text_prompt(text: str) -> records_pb2.Prompt:
    return records_pb2.Prompt(text=text)


def chat_prompt(messages: Iterable[Message]) -> records_pb2.Prompt:
    conversation = records_pb2.Conversation()
    for message in messages:
        if isinstance(message, Mapping):
            role, content = message["role"], message["content"]
        else:
            role, content = message
        conversation.messages.add(role=role, content=content)
    return records_pb2.Prompt(chat=conversation)


def token_prompt(token_ids: Iterable[int]) -> records_pb2.Prompt:
    return records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=list(token_ids)))


def to_prompt(prompt: PromptLike) -> records_pb2.Prompt:
    if isinstance(prompt, str):
        return text_prompt(prompt)
    if isinstance(prompt, records_pb2.Prompt):
        return prompt
    return chat_prompt(prompt)


def score_item(prompt: PromptLike, answer: AnswerLike, item_id: str = "") -> refscore_pb2.ScoreItem:
    """One (prompt, answer) to score; `item_id` is echoed back in the result."""
    item = refscore_pb2.ScoreItem(prompt=to_prompt(prompt), item_id=item_id)
    if isinstance(answer, str):
        item.answer_text = answer
    else:
        item.answer_token_ids.ids.extend(answer)
    return item


ItemLike = Union[refscore_pb2.ScoreItem, tuple[PromptLike, AnswerLike]]


def to_item(item: ItemLike) -> refscore_pb2.ScoreItem:
    if isinstance(item, refscore_pb2.ScoreItem):
        return item
    prompt, answer = item
    return score_item(prompt, answer)


@dataclass(frozen=True)
class Fingerprint:
    """What produced a score. Two scores are comparable only if their fingerprint_id is equal."""

    fingerprint_id: str
    model_id: str
    weights_hash: str
    tokenizer_hash: str
    chat_template_hash: str
    dtype: str
    engine: str
    engine_version: str
    parallel_layout: str = ""  # "tp=2,pp=1" when the engine split the model over GPUs (not part of the id)

    @classmethod
    def from_proto(cls, fp: records_pb2.ReferenceFingerprint) -> Fingerprint:
        return cls(
            fingerprint_id=fp.fingerprint_id,
            model_id=fp.model_id,
            weights_hash=fp.weights_hash,
            tokenizer_hash=fp.tokenizer_hash,
            chat_template_hash=fp.chat_template_hash,
            dtype=fp.dtype,
            engine=fp.engine,
            engine_version=fp.engine_version,
            parallel_layout=fp.parallel_layout,
        )


@dataclass(frozen=True)
class ScoredItem:
    """One scored (prompt, answer). `token_logprobs[i]` = log p(answer_token_ids[i] | prompt, answer[:i]),
    float32 on the wire (exactly representable as Python floats). `index`: the item's position in what
    was submitted (the request for `score`, the whole job for `score_many` and `score_stream`)."""

    index: int
    item_id: str
    prompt_token_ids: tuple[int, ...]
    answer_token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    logprob_sum: float
    fingerprint: Fingerprint

    @classmethod
    def from_proto(cls, item: refscore_pb2.ScoredItem, fingerprint: Fingerprint, index: int) -> ScoredItem:
        return cls(
            index=index,
            item_id=item.item_id,
            prompt_token_ids=tuple(item.prompt_token_ids),
            answer_token_ids=tuple(item.answer_token_ids),
            token_logprobs=tuple(item.token_logprobs),
            logprob_sum=item.logprob_sum,
            fingerprint=fingerprint,
        )


@dataclass(frozen=True)
class ScoreResult:
    items: tuple[ScoredItem, ...]
    fingerprint: Fingerprint

    @classmethod
    def from_proto(cls, response: refscore_pb2.ScoreResponse, first_index: int = 0) -> ScoreResult:
        fingerprint = Fingerprint.from_proto(response.fingerprint)
        return cls(
            items=tuple(
                ScoredItem.from_proto(item, fingerprint, first_index + item.item_index) for item in response.items
            ),
            fingerprint=fingerprint,
        )


@dataclass(frozen=True)
class GeneratedAnswer:
    text: str
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    logprob_sum: float
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class GenerateResult:
    prompt_token_ids: tuple[int, ...]
    answers: tuple[GeneratedAnswer, ...]
    fingerprint: Fingerprint

    @classmethod
    def from_proto(cls, response: refscore_pb2.GenerateResponse) -> GenerateResult:
        return cls(
            prompt_token_ids=tuple(response.prompt_token_ids),
            answers=tuple(
                GeneratedAnswer(
                    text=a.text,
                    token_ids=tuple(a.token_ids),
                    token_logprobs=tuple(a.token_logprobs),
                    logprob_sum=a.logprob_sum,
                    finish_reason=a.finish_reason,
                )
                for a in response.answers
            ),
            fingerprint=Fingerprint.from_proto(response.fingerprint),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A served model's fingerprint and the server's limits; `served`: every model the server serves."""

    fingerprint: Fingerprint
    max_model_len: int
    max_items_per_request: int
    max_tokens_per_request: int
    max_message_bytes: int
    bos_token_id: int  # -1 if none
    eos_token_id: int
    engine_settings: dict[str, str]
    served: tuple[Fingerprint, ...]

    @classmethod
    def from_proto(cls, info: refscore_pb2.ModelInfo) -> ModelInfo:
        return cls(
            fingerprint=Fingerprint.from_proto(info.fingerprint),
            max_model_len=info.max_model_len,
            max_items_per_request=info.max_items_per_request,
            max_tokens_per_request=info.max_tokens_per_request,
            max_message_bytes=info.max_message_bytes,
            bos_token_id=info.bos_token_id,
            eos_token_id=info.eos_token_id,
            engine_settings=dict(info.engine_settings),
            served=tuple(Fingerprint.from_proto(fp) for fp in info.served),
        )
