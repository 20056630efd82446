"""Domain errors of the service layer (no gRPC types; ``status.py`` maps them to status codes).

Every message here is safe to send to a client: it names a field or a public name, never a
private-derived value (SPEC §3) and never a traceback.
"""

from __future__ import annotations

import uuid

__all__ = [
    "ServiceError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "PermissionDenied",
    "Overloaded",
    "NoiseExhausted",
    "DeadlineTooShort",
    "Cancelled",
    "Unsupported",
    "GeneratorLoading",
    "GeneratorFailed",
    "ShuttingDown",
    "ChargedNotAnswered",
    "AnswerPending",
    "AnswerLost",
    "ShardUnavailable",
    "ChargedShardUnavailable",
    "StartupError",
]


class ServiceError(Exception):
    """Base class: an expected, client-visible failure with a safe message."""


class InvalidArgument(ServiceError):
    """A request field is missing, malformed or out of bounds."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(ServiceError):
    """A named index, profile or privacy domain does not exist on this server."""

    def __init__(self, field: str, name: str) -> None:
        super().__init__(f"{field}: no {field.rsplit('.', 1)[-1]} named {name!r} on this server")
        self.field = field
        self.name = name


class Unauthenticated(ServiceError):
    """No valid bearer token."""


class PermissionDenied(ServiceError):
    """The token's role does not allow this method."""


class Overloaded(ServiceError):
    """The generation queue is full; nothing was charged."""

    def __init__(self, retry_after_seconds: float = 1.0) -> None:
        super().__init__("the generation queue is full; nothing was charged, retry later")
        self.retry_after_seconds = retry_after_seconds


class NoiseExhausted(ServiceError):
    """No pre-generated noise vector is ready (the pool drained under load); nothing was charged.

    Raised BEFORE the reservation: the noise is data-independent and taken from the pool first,
    so a drained pool refuses instead of sampling on the request path (whose run time would
    depend on the noise released). ``retry_after_seconds`` is a public constant, never a
    measured sampling time (which depends on the noise).
    """

    def __init__(self, retry_after_seconds: float = 0.1) -> None:
        super().__init__("no noise vector is ready (the noise pool is refilling); nothing was charged, retry later")
        self.retry_after_seconds = retry_after_seconds


class DeadlineTooShort(ServiceError):
    """The deadline leaves no time to answer; checked before any charge."""

    def __init__(self) -> None:
        super().__init__("the deadline leaves no time to answer; nothing was charged")


class Cancelled(ServiceError):
    """The caller went away before the charge; nothing was charged."""

    def __init__(self) -> None:
        super().__init__("cancelled before the charge; nothing was charged")


class Unsupported(ServiceError):
    """The request is valid but this server cannot serve it (e.g. no generator loaded)."""


class GeneratorLoading(ServiceError):
    """The index's generator is still loading in the background (the server serves Retrieve while
    it loads); checked before any charge, so nothing was charged. ``retry_after_seconds`` is a
    public constant."""

    def __init__(self, bundle: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(
            f"the generator of bundle {bundle!r} is still loading; nothing was charged, retry later "
            "(Retrieve is available now)"
        )
        self.bundle = bundle
        self.retry_after_seconds = retry_after_seconds


class GeneratorFailed(Unsupported):
    """The index's generator failed to load in the background (the cause is in the server log, not
    sent); checked before any charge. Retrieve keeps working."""

    def __init__(self, bundle: str) -> None:
        super().__init__(
            f"the generator of bundle {bundle!r} failed to load (see the server log); nothing was "
            "charged; use Retrieve"
        )
        self.bundle = bundle


class ShuttingDown(ServiceError):
    """The server is draining (SIGTERM) and cut this call; ``request_id`` is the call's id
    (server-chosen ones too): a retry with it returns the stored release if the call was charged."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"the server is shutting down and cut this call; retry with request_id {request_id!r}: "
            f"if it was charged, the retry returns its stored release without a new charge"
        )
        self.request_id = request_id


class ChargedNotAnswered(ServiceError):
    """The query's charge was committed but its answer could not be delivered (SPEC §6: the charge
    is kept). The message and the ErrorInfo metadata carry ``request_id`` (also a server-chosen
    one), the key a replay uses; a replay never draws a fresh release.

    Attributes:
        request_id: the request's id (send it back as ``request_id`` to replay).
        spend_id: the committed spend.
    """

    def __init__(self, message: str, *, request_id: str, spend_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.spend_id = spend_id


class AnswerPending(ChargedNotAnswered):
    """Charged, and the release exists but could not be stored (the ledger cannot commit): the
    server holds it, and a replay with ``request_id`` once the ledger commits again stores and
    returns it, charging nothing (UNAVAILABLE with RetryInfo). Held releases live in memory: after
    a restart the replay is answered RELEASE_MISSING, as after a crash."""

    def __init__(self, *, request_id: str, spend_id: str, cause: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(
            f"request_id {request_id!r} was charged, but the privacy ledger cannot store its release "
            f"({cause}); replay request_id {request_id!r} to receive it (no new charge)",
            request_id=request_id,
            spend_id=spend_id,
        )
        self.cause = cause
        self.retry_after_seconds = retry_after_seconds


class AnswerLost(ChargedNotAnswered):
    """Charged, but no release exists (an unexpected error after the charge): the charge is kept
    and a replay with ``request_id`` is answered RELEASE_MISSING, never with a fresh draw
    (INTERNAL; ``error_id`` names the logged stack)."""

    def __init__(self, *, request_id: str, spend_id: str) -> None:
        self.error_id = uuid.uuid4().hex[:16]
        super().__init__(
            f"request_id {request_id!r} was charged, but its answer failed (error id {self.error_id}); "
            f"the charge is kept and a replay of request_id {request_id!r} returns RELEASE_MISSING, "
            "never a fresh release",
            request_id=request_id,
            spend_id=spend_id,
        )


class ShardUnavailable(ServiceError):
    """A shard server of a sharded index cannot answer (down, unreachable, timed out). Raised before
    the charge when a shard's channel is known to be failing (nothing charged); the shard's address
    is logged, never sent. ``retry_after_seconds`` is a public constant."""

    def __init__(self, index: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(f"a shard server of index {index!r} is unavailable; nothing was charged, retry later")
        self.index = index
        self.retry_after_seconds = retry_after_seconds


class ChargedShardUnavailable(AnswerLost):
    """Charged, then a shard server failed during the search: no release exists (UNAVAILABLE). As
    for every failure after the reservation (SPEC §6) the charge is kept and a replay of
    ``request_id`` is answered RELEASE_MISSING, never with a fresh draw."""

    def __init__(self, *, request_id: str, spend_id: str, index: str) -> None:
        super().__init__(request_id=request_id, spend_id=spend_id)
        self.args = (
            f"request_id {request_id!r} was charged, but a shard server of index {index!r} failed during the "
            f"search (error id {self.error_id}); the charge is kept and a replay of request_id "
            f"{request_id!r} returns RELEASE_MISSING, never a fresh release",
        )


class StartupError(Exception):
    """The server refuses to start (message names the configuration key or index)."""
