"""Transport-free request and response types of the service layer, and request validation.

The servicer converts protobuf messages to and from these; the service layer never sees gRPC.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.ledger.api import Receipt  # the ledger composes receipts; the server only converts them

from .config import Limits
from .errors import InvalidArgument

__all__ = [
    "Caller",
    "QueryArgs",
    "GenerateArgs",
    "Receipt",
    "Answer",
    "QuotaView",
    "BudgetView",
    "ProfileView",
    "IndexView",
    "Queued",
    "Retrieved",
    "Progress",
    "ImageOut",
    "Done",
    "GenerateEvent",
    "validate_query",
    "validate_generate",
    "validate_name",
    "NEIGHBOURING",
]

NEIGHBOURING = "add/remove one record (one image, or one owner's records)"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Caller:
    """The authenticated principal of a call."""

    tenant: str
    role: str
    indexes: frozenset[str] | None = None
    """The only indexes this caller may use (None: all)."""
    domains: frozenset[str] | None = None
    """The only privacy domains whose indexes this caller may use (None: all)."""

    @property
    def is_admin(self) -> bool:
        """Whether the caller has the admin role."""
        return self.role == "admin"

    def may_use(self, index: str, domain: str) -> bool:
        """Whether the caller's token allows index ``index`` of privacy domain ``domain``."""
        return (self.indexes is None or index in self.indexes) and (self.domains is None or domain in self.domains)


@dataclass(frozen=True)
class QueryArgs:
    """A validated query: index and profile names, the public prompt, the idempotency key.

    ``client_request_id`` is False when the server generated ``request_id`` (no replay possible).
    """

    index: str
    profile: str
    prompt: str
    request_id: str
    client_request_id: bool = True


@dataclass(frozen=True)
class GenerateArgs:
    """A validated generation request."""

    query: QueryArgs
    num_images: int
    steps: int
    seed: int | None


@dataclass(frozen=True)
class Answer:
    """A release with its receipt."""

    release: npt.NDArray[np.float64]
    receipt: Receipt


@dataclass(frozen=True)
class QuotaView:
    """A tenant's quota on a domain."""

    tenant: str
    epsilon_quota: float
    epsilon_spent: float


@dataclass(frozen=True)
class BudgetView:
    """Public view of a domain budget."""

    domain: str
    epsilon: float
    delta: float
    epsilon_spent: float
    epsilon_left: float
    rule: str
    filter_order: float
    quota: QuotaView | None = None


@dataclass(frozen=True)
class ProfileView:
    """A named profile with its one-query epsilon at the domain's delta."""

    name: str
    k: int
    q: float
    sigma: float
    lam: float
    epsilon_per_query: float


@dataclass(frozen=True)
class IndexView:
    """Public facts about a served index (never the exact count)."""

    name: str
    domain: str
    version: str
    dimension: int
    public_size: int
    encoder: dict[str, Any]
    profiles: tuple[ProfileView, ...]
    budget: BudgetView | None
    private: bool
    generation: bool
    bundle: str


@dataclass(frozen=True)
class Queued:
    """Generation event: admitted to the generation queue."""

    position: int


@dataclass(frozen=True)
class Retrieved:
    """Generation event: the release is charged and stored."""

    receipt: Receipt


@dataclass(frozen=True)
class Progress:
    """Generation event: a denoising step finished."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class ImageOut:
    """Generation event: one image as PNG bytes."""

    index: int
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Done:
    """Generation event: all images sent."""

    receipt: Receipt
    seed: int
    num_images: int


GenerateEvent = Queued | Retrieved | Progress | ImageOut | Done


def validate_name(field: str, value: str) -> str:
    """A required index/profile/domain name.

    Raises:
        InvalidArgument: naming ``field``.
    """
    if not value:
        raise InvalidArgument(field, "required")
    if not NAME_RE.match(value):
        raise InvalidArgument(field, f"must match {NAME_RE.pattern}")
    return value


def validate_query(index: str, profile: str, prompt: str, request_id: str, limits: Limits) -> QueryArgs:
    """Validate the fields shared by ``Retrieve`` and ``Generate``.

    Raises:
        InvalidArgument: naming the first bad field.
    """
    validate_name("index", index)
    validate_name("profile", profile)
    if not prompt or not prompt.strip():
        raise InvalidArgument("prompt", "required (non-blank)")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument("prompt", f"at most {limits.max_prompt_chars} characters; found {len(prompt)}")
    if _CONTROL_RE.search(prompt):
        raise InvalidArgument("prompt", "must not contain control characters")
    if request_id and not REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id", f"must match {REQUEST_ID_RE.pattern}")
    rid = request_id or f"srv-{uuid.uuid4().hex}"
    return QueryArgs(index, profile, prompt, rid, client_request_id=bool(request_id))


def validate_generate(
    query: QueryArgs, num_images: int, steps: int, seed: int | None, limits: Limits
) -> GenerateArgs:
    """Validate the generation fields (0 means the default for ``num_images`` and ``steps``).

    Raises:
        InvalidArgument: naming the first bad field.
    """
    n = num_images or 1
    if not (1 <= n <= limits.max_images):
        raise InvalidArgument("num_images", f"must be in [1, {limits.max_images}]; found {num_images}")
    s = steps or limits.default_steps
    if not (1 <= s <= limits.max_steps):
        raise InvalidArgument("steps", f"must be in [1, {limits.max_steps}]; found {steps}")
    if seed is not None and not (0 <= seed <= MAX_SEED):
        raise InvalidArgument("seed", "must be in [0, 2^64 - 1]")
    return GenerateArgs(query=query, num_images=n, steps=s, seed=seed)


def check_finite(field: str, value: float, *, low: float, high: float, low_open: bool = True) -> float:
    """A finite float in (low, high] (or [low, high] with ``low_open=False``).

    Raises:
        InvalidArgument: naming ``field``.
    """
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(field, f"must be finite and in {bracket}{low:g}, {high:g}]; found {value!r}")
    return value
