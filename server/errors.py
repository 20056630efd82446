"""Domain errors of the service layer (no gRPC types; ``status.py`` maps them to status codes).

Every message here is safe to send to a client: it names a field or a public name, never a
private-derived value (SPEC §3) and never a traceback.
"""

from __future__ import annotations

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


class StartupError(Exception):
    """The server refuses to start (message names the configuration key or index)."""
