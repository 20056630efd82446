from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("corpus_id", "shard_number", "shard_count", "manifest_sha256", "dimension")
    CORPUS_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    corpus_id: str
    shard_number: int
    shard_count: int
    manifest_sha256: str
    dimension: int
    def __init__(self, corpus_id: _Optional[str] = ..., shard_number: _Optional[int] = ..., shard_count: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., dimension: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "k", "q", "nprobe")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    query: bytes
    k: int
    q: float
    nprobe: int
    def __init__(self, query: _Optional[bytes] = ..., k: _Optional[int] = ..., q: _Optional[float] = ..., nprobe: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("scores", "ids", "vectors")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    scores: bytes
    ids: bytes
    vectors: bytes
    def __init__(self, scores: _Optional[bytes] = ..., ids: _Optional[bytes] = ..., vectors: _Optional[bytes] = ...) -> None: ...
