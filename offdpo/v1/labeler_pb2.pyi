from offdpo.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CandidateSet(_message.Message):
    __slots__ = ("set_id", "prompt", "answers", "reference", "metadata", "strategy", "generate_n")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SET_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    GENERATE_N_FIELD_NUMBER: _ClassVar[int]
    set_id: str
    prompt: _records_pb2.Prompt
    answers: _containers.RepeatedScalarFieldContainer[str]
    reference: str
    metadata: _containers.ScalarMap[str, str]
    strategy: str
    generate_n: int
    def __init__(self, set_id: _Optional[str] = ..., prompt: _Optional[_Union[_records_pb2.Prompt, _Mapping]] = ..., answers: _Optional[_Iterable[str]] = ..., reference: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., strategy: _Optional[str] = ..., generate_n: _Optional[int] = ...) -> None: ...

class HumanJudgement(_message.Message):
    __slots__ = ("prompt", "answer_a", "answer_b", "verdict", "annotator", "metadata", "source")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_A_FIELD_NUMBER: _ClassVar[int]
    ANSWER_B_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    prompt: _records_pb2.Prompt
    answer_a: str
    answer_b: str
    verdict: str
    annotator: str
    metadata: _containers.ScalarMap[str, str]
    source: str
    def __init__(self, prompt: _Optional[_Union[_records_pb2.Prompt, _Mapping]] = ..., answer_a: _Optional[str] = ..., answer_b: _Optional[str] = ..., verdict: _Optional[str] = ..., annotator: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ...) -> None: ...

class SubmitCandidatesRequest(_message.Message):
    __slots__ = ("sets", "strategy")
    SETS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    sets: _containers.RepeatedCompositeFieldContainer[CandidateSet]
    strategy: str
    def __init__(self, sets: _Optional[_Iterable[_Union[CandidateSet, _Mapping]]] = ..., strategy: _Optional[str] = ...) -> None: ...

class SetResult(_message.Message):
    __slots__ = ("index", "set_id", "strategy", "pair_ids", "duplicate_pair_ids", "ties", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SET_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PAIR_IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_PAIR_IDS_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    set_id: str
    strategy: str
    pair_ids: _containers.RepeatedScalarFieldContainer[str]
    duplicate_pair_ids: _containers.RepeatedScalarFieldContainer[str]
    ties: int
    error: str
    def __init__(self, index: _Optional[int] = ..., set_id: _Optional[str] = ..., strategy: _Optional[str] = ..., pair_ids: _Optional[_Iterable[str]] = ..., duplicate_pair_ids: _Optional[_Iterable[str]] = ..., ties: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitCandidatesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SetResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SetResult, _Mapping]]] = ...) -> None: ...

class SubmitJudgementResponse(_message.Message):
    __slots__ = ("pair_id", "published", "duplicate")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    published: bool
    duplicate: bool
    def __init__(self, pair_id: _Optional[str] = ..., published: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...
