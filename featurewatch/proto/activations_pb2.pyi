from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType

class ActivationBatch(_message.Message):
    __slots__ = ("replica_id", "stream_epoch", "seq", "model", "model_version", "layer", "site", "dtype", "rows", "width", "data", "request_ids", "request_index", "token_pos", "token_id", "ts_unix_nanos", "token_text", "engine", "verdicts")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_POS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    stream_epoch: int
    seq: int
    model: str
    model_version: str
    layer: int
    site: str
    dtype: DType
    rows: int
    width: int
    data: bytes
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    request_index: _containers.RepeatedScalarFieldContainer[int]
    token_pos: _containers.RepeatedScalarFieldContainer[int]
    token_id: _containers.RepeatedScalarFieldContainer[int]
    ts_unix_nanos: _containers.RepeatedScalarFieldContainer[int]
    token_text: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, replica_id: _Optional[str] = ..., stream_epoch: _Optional[int] = ..., seq: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., layer: _Optional[int] = ..., site: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., rows: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ..., request_ids: _Optional[_Iterable[str]] = ..., request_index: _Optional[_Iterable[int]] = ..., token_pos: _Optional[_Iterable[int]] = ..., token_id: _Optional[_Iterable[int]] = ..., ts_unix_nanos: _Optional[_Iterable[int]] = ..., token_text: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "tag", "score", "threshold", "flagged", "action", "attempt", "probe", "ts_unix_nanos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tag: str
    score: float
    threshold: float
    flagged: bool
    action: str
    attempt: int
    probe: str
    ts_unix_nanos: int
    def __init__(self, request_id: _Optional[str] = ..., tag: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ..., action: _Optional[str] = ..., attempt: _Optional[int] = ..., probe: _Optional[str] = ..., ts_unix_nanos: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("replica_id", "stream_epoch", "seq", "duplicate")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    stream_epoch: int
    seq: int
    duplicate: bool
    def __init__(self, replica_id: _Optional[str] = ..., stream_epoch: _Optional[int] = ..., seq: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...
