from dprdm.proto.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveRequest(_message.Message):
    __slots__ = ("index", "profile", "prompt", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    profile: str
    prompt: str
    request_id: str
    def __init__(self, index: _Optional[str] = ..., profile: _Optional[str] = ..., prompt: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("embedding", "receipt")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    receipt: _types_pb2.Receipt
    def __init__(self, embedding: _Optional[_Iterable[float]] = ..., receipt: _Optional[_Union[_types_pb2.Receipt, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("index", "profile", "prompt", "request_id", "num_images", "steps", "seed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    index: str
    profile: str
    prompt: str
    request_id: str
    num_images: int
    steps: int
    seed: int
    def __init__(self, index: _Optional[str] = ..., profile: _Optional[str] = ..., prompt: _Optional[str] = ..., request_id: _Optional[str] = ..., num_images: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("queued", "retrieved", "progress", "image", "done")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    retrieved: Retrieved
    progress: Progress
    image: GeneratedImage
    done: Done
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., retrieved: _Optional[_Union[Retrieved, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Retrieved(_message.Message):
    __slots__ = ("receipt",)
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    receipt: _types_pb2.Receipt
    def __init__(self, receipt: _Optional[_Union[_types_pb2.Receipt, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "png", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("receipt", "seed", "num_images")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    receipt: _types_pb2.Receipt
    seed: int
    num_images: int
    def __init__(self, receipt: _Optional[_Union[_types_pb2.Receipt, _Mapping]] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("index", "domain")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    index: str
    domain: str
    def __init__(self, index: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: _types_pb2.BudgetInfo
    def __init__(self, budget: _Optional[_Union[_types_pb2.BudgetInfo, _Mapping]] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncoderInfo(_message.Message):
    __slots__ = ("name", "weights_sha256", "dimension")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights_sha256: str
    dimension: int
    def __init__(self, name: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., dimension: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "domain", "dimension", "public_size", "encoder", "version", "profiles", "budget", "private", "generation", "bundle")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    domain: str
    dimension: int
    public_size: int
    encoder: EncoderInfo
    version: str
    profiles: _containers.RepeatedCompositeFieldContainer[_types_pb2.Profile]
    budget: _types_pb2.BudgetInfo
    private: bool
    generation: bool
    bundle: str
    def __init__(self, name: _Optional[str] = ..., domain: _Optional[str] = ..., dimension: _Optional[int] = ..., public_size: _Optional[int] = ..., encoder: _Optional[_Union[EncoderInfo, _Mapping]] = ..., version: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[_types_pb2.Profile, _Mapping]]] = ..., budget: _Optional[_Union[_types_pb2.BudgetInfo, _Mapping]] = ..., private: _Optional[bool] = ..., generation: _Optional[bool] = ..., bundle: _Optional[str] = ...) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes",)
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ...) -> None: ...
