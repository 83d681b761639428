import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_STRATEGY_UNSPECIFIED: _ClassVar[LabelStrategy]
    LABEL_STRATEGY_HUMAN: _ClassVar[LabelStrategy]
    LABEL_STRATEGY_RULES: _ClassVar[LabelStrategy]
    LABEL_STRATEGY_REWARD_MODEL: _ClassVar[LabelStrategy]
    LABEL_STRATEGY_LLM_JUDGE: _ClassVar[LabelStrategy]
    LABEL_STRATEGY_IMPORTED: _ClassVar[LabelStrategy]
LABEL_STRATEGY_UNSPECIFIED: LabelStrategy
LABEL_STRATEGY_HUMAN: LabelStrategy
LABEL_STRATEGY_RULES: LabelStrategy
LABEL_STRATEGY_REWARD_MODEL: LabelStrategy
LABEL_STRATEGY_LLM_JUDGE: LabelStrategy
LABEL_STRATEGY_IMPORTED: LabelStrategy

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("chat", "text", "token_ids")
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    chat: Conversation
    text: str
    token_ids: TokenIds
    def __init__(self, chat: _Optional[_Union[Conversation, _Mapping]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class JudgeVerdict(_message.Message):
    __slots__ = ("order", "verdict", "raw_response")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    RAW_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    order: str
    verdict: str
    raw_response: str
    def __init__(self, order: _Optional[str] = ..., verdict: _Optional[str] = ..., raw_response: _Optional[str] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("strategy", "source", "chosen_score", "rejected_score", "verdicts", "chosen_rule_hits", "rejected_rule_hits", "annotator", "judge_model", "reward_model", "labeled_at", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_RULE_HITS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RULE_HITS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    JUDGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    strategy: LabelStrategy
    source: str
    chosen_score: float
    rejected_score: float
    verdicts: _containers.RepeatedCompositeFieldContainer[JudgeVerdict]
    chosen_rule_hits: _containers.RepeatedScalarFieldContainer[str]
    rejected_rule_hits: _containers.RepeatedScalarFieldContainer[str]
    annotator: str
    judge_model: str
    reward_model: str
    labeled_at: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, strategy: _Optional[_Union[LabelStrategy, str]] = ..., source: _Optional[str] = ..., chosen_score: _Optional[float] = ..., rejected_score: _Optional[float] = ..., verdicts: _Optional[_Iterable[_Union[JudgeVerdict, _Mapping]]] = ..., chosen_rule_hits: _Optional[_Iterable[str]] = ..., rejected_rule_hits: _Optional[_Iterable[str]] = ..., annotator: _Optional[str] = ..., judge_model: _Optional[str] = ..., reward_model: _Optional[str] = ..., labeled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("pair_id", "prompt", "chosen", "rejected", "provenance", "reference_fingerprint_id")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    prompt: Prompt
    chosen: str
    rejected: str
    provenance: Provenance
    reference_fingerprint_id: str
    def __init__(self, pair_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., reference_fingerprint_id: _Optional[str] = ...) -> None: ...

class ReferenceFingerprint(_message.Message):
    __slots__ = ("model_id", "weights_hash", "tokenizer_hash", "chat_template_hash", "dtype", "engine", "engine_version", "fingerprint_id", "parallel_layout")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_HASH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights_hash: str
    tokenizer_hash: str
    chat_template_hash: str
    dtype: str
    engine: str
    engine_version: str
    fingerprint_id: str
    parallel_layout: str
    def __init__(self, model_id: _Optional[str] = ..., weights_hash: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., chat_template_hash: _Optional[str] = ..., dtype: _Optional[str] = ..., engine: _Optional[str] = ..., engine_version: _Optional[str] = ..., fingerprint_id: _Optional[str] = ..., parallel_layout: _Optional[str] = ...) -> None: ...

class ScoredPair(_message.Message):
    __slots__ = ("pair", "fingerprint", "prompt_token_ids", "chosen_token_ids", "rejected_token_ids", "chosen_logprobs", "rejected_logprobs", "chosen_logprob_sum", "rejected_logprob_sum")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    REJECTED_LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    pair: PreferencePair
    fingerprint: ReferenceFingerprint
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chosen_token_ids: _containers.RepeatedScalarFieldContainer[int]
    rejected_token_ids: _containers.RepeatedScalarFieldContainer[int]
    chosen_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rejected_logprobs: _containers.RepeatedScalarFieldContainer[float]
    chosen_logprob_sum: float
    rejected_logprob_sum: float
    def __init__(self, pair: _Optional[_Union[PreferencePair, _Mapping]] = ..., fingerprint: _Optional[_Union[ReferenceFingerprint, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., chosen_token_ids: _Optional[_Iterable[int]] = ..., rejected_token_ids: _Optional[_Iterable[int]] = ..., chosen_logprobs: _Optional[_Iterable[float]] = ..., rejected_logprobs: _Optional[_Iterable[float]] = ..., chosen_logprob_sum: _Optional[float] = ..., rejected_logprob_sum: _Optional[float] = ...) -> None: ...

class KafkaRange(_message.Message):
    __slots__ = ("topic", "partition", "first_offset", "last_offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., first_offset: _Optional[int] = ..., last_offset: _Optional[int] = ...) -> None: ...

class ShardReady(_message.Message):
    __slots__ = ("bucket", "object_key", "row_count", "pair_ids", "fingerprint", "source_ranges", "sha256", "created_at")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAIR_IDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RANGES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    bucket: str
    object_key: str
    row_count: int
    pair_ids: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: ReferenceFingerprint
    source_ranges: _containers.RepeatedCompositeFieldContainer[KafkaRange]
    sha256: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, bucket: _Optional[str] = ..., object_key: _Optional[str] = ..., row_count: _Optional[int] = ..., pair_ids: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[_Union[ReferenceFingerprint, _Mapping]] = ..., source_ranges: _Optional[_Iterable[_Union[KafkaRange, _Mapping]]] = ..., sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("original_value", "original_key", "topic", "partition", "offset", "reason", "error_type", "service", "failed_at", "original_truncated", "original_size", "original_sha256")
    ORIGINAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_KEY_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    original_value: bytes
    original_key: bytes
    topic: str
    partition: int
    offset: int
    reason: str
    error_type: str
    service: str
    failed_at: _timestamp_pb2.Timestamp
    original_truncated: bool
    original_size: int
    original_sha256: str
    def __init__(self, original_value: _Optional[bytes] = ..., original_key: _Optional[bytes] = ..., topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., reason: _Optional[str] = ..., error_type: _Optional[str] = ..., service: _Optional[str] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., original_truncated: bool = ..., original_size: _Optional[int] = ..., original_sha256: _Optional[str] = ...) -> None: ...
