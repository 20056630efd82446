from dprdm.proto.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProfileParams(_message.Message):
    __slots__ = ("k", "q", "sigma")
    K_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    k: int
    q: float
    sigma: float
    def __init__(self, k: _Optional[int] = ..., q: _Optional[float] = ..., sigma: _Optional[float] = ..., **kwargs) -> None: ...

class CreateBudgetRequest(_message.Message):
    __slots__ = ("domain", "epsilon", "delta", "profiles", "renyi_filter", "filter_order", "tenant_quotas")
    class TenantQuotasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    RENYI_FILTER_FIELD_NUMBER: _ClassVar[int]
    FILTER_ORDER_FIELD_NUMBER: _ClassVar[int]
    TENANT_QUOTAS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    epsilon: float
    delta: float
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileParams]
    renyi_filter: bool
    filter_order: float
    tenant_quotas: _containers.ScalarMap[str, float]
    def __init__(self, domain: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., profiles: _Optional[_Iterable[_Union[ProfileParams, _Mapping]]] = ..., renyi_filter: _Optional[bool] = ..., filter_order: _Optional[float] = ..., tenant_quotas: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CreateBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: _types_pb2.BudgetInfo
    def __init__(self, budget: _Optional[_Union[_types_pb2.BudgetInfo, _Mapping]] = ...) -> None: ...

class GetAuditTrailRequest(_message.Message):
    __slots__ = ("domain", "limit", "offset")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    offset: int
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Spend(_message.Message):
    __slots__ = ("spend_id", "tenant", "request_id", "binding_hash", "profile", "epsilon_charged", "created_at", "status")
    SPEND_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BINDING_HASH_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_CHARGED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    spend_id: str
    tenant: str
    request_id: str
    binding_hash: str
    profile: ProfileParams
    epsilon_charged: float
    created_at: float
    status: str
    def __init__(self, spend_id: _Optional[str] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., binding_hash: _Optional[str] = ..., profile: _Optional[_Union[ProfileParams, _Mapping]] = ..., epsilon_charged: _Optional[float] = ..., created_at: _Optional[float] = ..., status: _Optional[str] = ...) -> None: ...

class GetAuditTrailResponse(_message.Message):
    __slots__ = ("spends",)
    SPENDS_FIELD_NUMBER: _ClassVar[int]
    spends: _containers.RepeatedCompositeFieldContainer[Spend]
    def __init__(self, spends: _Optional[_Iterable[_Union[Spend, _Mapping]]] = ...) -> None: ...

class GetCountsRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class IndexCount(_message.Message):
    __slots__ = ("name", "version", "exact_size", "public_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXACT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    exact_size: int
    public_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., exact_size: _Optional[int] = ..., public_size: _Optional[int] = ...) -> None: ...

class GetCountsResponse(_message.Message):
    __slots__ = ("domain", "spends", "budget", "indexes")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SPENDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    domain: str
    spends: int
    budget: _types_pb2.BudgetInfo
    indexes: _containers.RepeatedCompositeFieldContainer[IndexCount]
    def __init__(self, domain: _Optional[str] = ..., spends: _Optional[int] = ..., budget: _Optional[_Union[_types_pb2.BudgetInfo, _Mapping]] = ..., indexes: _Optional[_Iterable[_Union[IndexCount, _Mapping]]] = ...) -> None: ...

class ListQuotasRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class ListQuotasResponse(_message.Message):
    __slots__ = ("quotas",)
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    quotas: _containers.RepeatedCompositeFieldContainer[_types_pb2.TenantQuota]
    def __init__(self, quotas: _Optional[_Iterable[_Union[_types_pb2.TenantQuota, _Mapping]]] = ...) -> None: ...
