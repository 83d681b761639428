from offdpo_client.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "answer_text", "answer_token_ids", "item_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: _records_pb2.Prompt
    answer_text: str
    answer_token_ids: _records_pb2.TokenIds
    item_id: str
    def __init__(self, prompt: _Optional[_Union[_records_pb2.Prompt, _Mapping]] = ..., answer_text: _Optional[str] = ..., answer_token_ids: _Optional[_Union[_records_pb2.TokenIds, _Mapping]] = ..., item_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "expected_fingerprint_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    expected_fingerprint_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., expected_fingerprint_id: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_index", "item_id", "prompt_token_ids", "answer_token_ids", "token_logprobs", "logprob_sum")
    ITEM_INDEX_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    item_index: int
    item_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    answer_token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logprob_sum: float
    def __init__(self, item_index: _Optional[int] = ..., item_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., answer_token_ids: _Optional[_Iterable[int]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., logprob_sum: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("items", "fingerprint")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    fingerprint: _records_pb2.ReferenceFingerprint
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., fingerprint: _Optional[_Union[_records_pb2.ReferenceFingerprint, _Mapping]] = ...) -> None: ...

class ScoreStreamResult(_message.Message):
    __slots__ = ("request_index", "item", "fingerprint")
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    request_index: int
    item: ScoredItem
    fingerprint: _records_pb2.ReferenceFingerprint
    def __init__(self, request_index: _Optional[int] = ..., item: _Optional[_Union[ScoredItem, _Mapping]] = ..., fingerprint: _Optional[_Union[_records_pb2.ReferenceFingerprint, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "n", "max_tokens", "temperature", "top_p", "seed", "expected_fingerprint_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: _records_pb2.Prompt
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    expected_fingerprint_id: str
    def __init__(self, prompt: _Optional[_Union[_records_pb2.Prompt, _Mapping]] = ..., n: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., expected_fingerprint_id: _Optional[str] = ...) -> None: ...

class GeneratedAnswer(_message.Message):
    __slots__ = ("text", "token_ids", "token_logprobs", "logprob_sum", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logprob_sum: float
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., logprob_sum: _Optional[float] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_token_ids", "answers", "fingerprint")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    answers: _containers.RepeatedCompositeFieldContainer[GeneratedAnswer]
    fingerprint: _records_pb2.ReferenceFingerprint
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., answers: _Optional[_Iterable[_Union[GeneratedAnswer, _Mapping]]] = ..., fingerprint: _Optional[_Union[_records_pb2.ReferenceFingerprint, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("fingerprint_id",)
    FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    fingerprint_id: str
    def __init__(self, fingerprint_id: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("fingerprint", "max_model_len", "max_items_per_request", "max_tokens_per_request", "max_message_bytes", "bos_token_id", "eos_token_id", "engine_settings", "served")
    class EngineSettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    fingerprint: _records_pb2.ReferenceFingerprint
    max_model_len: int
    max_items_per_request: int
    max_tokens_per_request: int
    max_message_bytes: int
    bos_token_id: int
    eos_token_id: int
    engine_settings: _containers.ScalarMap[str, str]
    served: _containers.RepeatedCompositeFieldContainer[_records_pb2.ReferenceFingerprint]
    def __init__(self, fingerprint: _Optional[_Union[_records_pb2.ReferenceFingerprint, _Mapping]] = ..., max_model_len: _Optional[int] = ..., max_items_per_request: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., engine_settings: _Optional[_Mapping[str, str]] = ..., served: _Optional[_Iterable[_Union[_records_pb2.ReferenceFingerprint, _Mapping]]] = ...) -> None: ...
