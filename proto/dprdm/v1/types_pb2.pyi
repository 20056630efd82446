from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Profile(_message.Message):
    __slots__ = ("name", "k", "q", "sigma", "epsilon_per_query")
    NAME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    name: str
    k: int
    q: float
    sigma: float
    epsilon_per_query: float
    def __init__(self, name: _Optional[str] = ..., k: _Optional[int] = ..., q: _Optional[float] = ..., sigma: _Optional[float] = ..., epsilon_per_query: _Optional[float] = ..., **kwargs) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("spend_id", "request_id", "index", "domain", "profile", "epsilon_charged", "delta", "epsilon_spent", "epsilon_left", "epsilon_budget", "replayed", "reused")
    SPEND_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_CHARGED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_LEFT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    spend_id: str
    request_id: str
    index: str
    domain: str
    profile: str
    epsilon_charged: float
    delta: float
    epsilon_spent: float
    epsilon_left: float
    epsilon_budget: float
    replayed: bool
    reused: bool
    def __init__(self, spend_id: _Optional[str] = ..., request_id: _Optional[str] = ..., index: _Optional[str] = ..., domain: _Optional[str] = ..., profile: _Optional[str] = ..., epsilon_charged: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., epsilon_left: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., replayed: _Optional[bool] = ..., reused: _Optional[bool] = ...) -> None: ...

class TenantQuota(_message.Message):
    __slots__ = ("tenant", "epsilon_quota", "epsilon_spent")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_QUOTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    epsilon_quota: float
    epsilon_spent: float
    def __init__(self, tenant: _Optional[str] = ..., epsilon_quota: _Optional[float] = ..., epsilon_spent: _Optional[float] = ...) -> None: ...

class BudgetInfo(_message.Message):
    __slots__ = ("domain", "epsilon", "delta", "epsilon_spent", "epsilon_left", "rule", "filter_order", "neighbouring", "quota")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_LEFT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    FILTER_ORDER_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURING_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    domain: str
    epsilon: float
    delta: float
    epsilon_spent: float
    epsilon_left: float
    rule: str
    filter_order: float
    neighbouring: str
    quota: TenantQuota
    def __init__(self, domain: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., epsilon_left: _Optional[float] = ..., rule: _Optional[str] = ..., filter_order: _Optional[float] = ..., neighbouring: _Optional[str] = ..., quota: _Optional[_Union[TenantQuota, _Mapping]] = ...) -> None: ...
