"""THE table mapping domain errors to gRPC status codes, and rich error details (``google.rpc``).

Every servicer method goes through :func:`to_rpc_status`; an exception that is not in the table
is ``INTERNAL`` with an opaque error id (logged with its stack but without its message, which
could carry a private-derived value); a traceback never reaches the client.

A ledger that cannot commit is UNAVAILABLE with RetryInfo and its cause (nothing was charged;
the file's path is logged, not sent). A call charged but not answered names its request id
(server-chosen ones too) in the message, the ErrorInfo metadata and a RequestInfo:
UNAVAILABLE when a replay will return the release, INTERNAL (with an error id) when none exists.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dprdm.ledger import api as L

from . import errors as E

__all__ = ["ERROR_DOMAIN", "STATUS_TABLE", "to_rpc_status", "code_of"]

log = logging.getLogger("dprdm.server")
ERROR_DOMAIN = "dprdm.v1"

# (error class, status code, ErrorInfo reason). First match wins: subclasses before bases.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (E.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (E.NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (E.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (E.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (E.Overloaded, grpc.StatusCode.UNAVAILABLE, "OVERLOADED"),
    (E.NoiseExhausted, grpc.StatusCode.UNAVAILABLE, "NOISE_POOL_EMPTY"),
    (E.DeadlineTooShort, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT"),
    (E.Cancelled, grpc.StatusCode.CANCELLED, "CANCELLED_BEFORE_CHARGE"),
    (E.GeneratorLoading, grpc.StatusCode.UNAVAILABLE, "GENERATOR_LOADING"),
    (E.GeneratorFailed, grpc.StatusCode.FAILED_PRECONDITION, "GENERATOR_FAILED"),
    (E.Unsupported, grpc.StatusCode.FAILED_PRECONDITION, "UNSUPPORTED"),
    (E.AnswerPending, grpc.StatusCode.UNAVAILABLE, "CHARGED_REPLAY_TO_RECEIVE"),
    (E.ChargedShardUnavailable, grpc.StatusCode.UNAVAILABLE, "CHARGED_SHARD_UNAVAILABLE"),
    (E.AnswerLost, grpc.StatusCode.INTERNAL, "CHARGED_ANSWER_LOST"),
    (E.ShardUnavailable, grpc.StatusCode.UNAVAILABLE, "SHARD_UNAVAILABLE"),
    (L.LedgerUnavailable, grpc.StatusCode.UNAVAILABLE, "LEDGER_UNAVAILABLE"),
    (E.ShuttingDown, grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (L.BudgetExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "PRIVACY_BUDGET_EXHAUSTED"),
    (L.QuotaExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXHAUSTED"),
    (L.UnknownDomain, grpc.StatusCode.NOT_FOUND, "UNKNOWN_PRIVACY_DOMAIN"),
    (L.DomainExists, grpc.StatusCode.ALREADY_EXISTS, "BUDGET_EXISTS"),
    (L.ReplayMismatch, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"),
    (L.ReleaseMissing, grpc.StatusCode.FAILED_PRECONDITION, "RELEASE_MISSING"),
)

_MESSAGES: dict[type[BaseException], str] = {
    L.ReplayMismatch: "request_id was already used with a different index version, profile or prompt",
    L.ReleaseMissing: (
        "request_id has a committed charge but no stored release (the server stopped in "
        "between); the charge is kept and no fresh release will be drawn for it"
    ),
}


def _pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _retry_info(secs: float) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
    )


def _message(exc: BaseException, cls: type[BaseException]) -> str:
    if isinstance(exc, L.LedgerUnavailable):  # the cause, not the server's file path (logged instead)
        return f"the privacy ledger cannot commit ({exc.cause}); this call charged nothing, retry later"
    return _MESSAGES.get(cls, str(exc))


def _charged_details(exc: E.ChargedNotAnswered, meta: dict[str, str], method: str) -> list[Any]:
    """A charged call that could not answer: the request id to replay with (server-chosen too)."""
    meta.update(request_id=exc.request_id, spend_id=exc.spend_id, charged="true")
    extra: list[Any] = [error_details_pb2.RequestInfo(request_id=exc.request_id)]
    if isinstance(exc, E.AnswerPending):
        extra.append(_retry_info(float(exc.retry_after_seconds)))
        log.warning("%s: spend %s charged, its release held until the ledger can store it: %s",
                    method, exc.spend_id, exc.cause)  # fmt: skip
    elif isinstance(exc, E.AnswerLost):
        meta["error_id"] = exc.error_id
        cause = exc.__cause__ or exc
        frames = "".join(traceback.format_tb(cause.__traceback__))
        log.error("internal error %s in %s after the charge of spend %s: %s\n%s",
                  exc.error_id, method, exc.spend_id, type(cause).__name__, frames)  # fmt: skip
    return extra


def _details(exc: BaseException, reason: str, method: str = "") -> list[Any]:
    meta: dict[str, str] = {}
    extra: list[Any] = []
    if isinstance(exc, E.ChargedNotAnswered):
        extra = _charged_details(exc, meta, method)
    elif isinstance(exc, L.LedgerUnavailable):
        meta["cause"] = exc.cause
        extra.append(_retry_info(float(exc.retry_after_seconds)))
    if isinstance(exc, E.InvalidArgument):
        meta["field"] = exc.field
        extra.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
                ]
            )
        )
    elif isinstance(exc, E.NotFound):
        meta["field"] = exc.field
        extra.append(error_details_pb2.ResourceInfo(resource_type=exc.field, resource_name=exc.name))
    elif isinstance(exc, L.BudgetExhausted):
        meta.update(
            privacy_domain=exc.domain,
            epsilon_budget=repr(float(exc.epsilon_budget)),
            epsilon_spent=repr(float(exc.epsilon_spent)),
        )
        extra.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"privacy_domain:{exc.domain}",
                        description="the privacy budget does not admit this query; nothing was charged",
                    )
                ]
            )
        )
    elif isinstance(exc, L.QuotaExhausted):
        meta.update(
            privacy_domain=exc.domain,
            tenant=exc.tenant,
            epsilon_quota=repr(float(exc.epsilon_quota)),
            epsilon_spent=repr(float(exc.epsilon_spent)),
        )
        extra.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"tenant:{exc.tenant}/privacy_domain:{exc.domain}",
                        description="the tenant's quota does not admit this query; nothing was charged",
                    )
                ]
            )
        )
    elif isinstance(exc, (E.Overloaded, E.NoiseExhausted, E.GeneratorLoading, E.ShardUnavailable)):
        secs = float(exc.retry_after_seconds)
        extra.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
            )
        )
    if isinstance(exc, (E.GeneratorLoading, E.GeneratorFailed)):
        meta["bundle"] = exc.bundle
    if isinstance(exc, E.ShuttingDown):  # the id to retry with (server-chosen ids too)
        meta["request_id"] = exc.request_id
        extra.append(error_details_pb2.RequestInfo(request_id=exc.request_id))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=meta)
    return [info, *extra]


def _rule(exc: BaseException) -> tuple[type[BaseException], grpc.StatusCode, str] | None:
    return next((row for row in STATUS_TABLE if isinstance(exc, row[0])), None)


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code the table assigns to ``exc`` (INTERNAL if none)."""
    row = _rule(exc)
    return grpc.StatusCode.INTERNAL if row is None else row[1]


def _internal(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str, list[Any]]:
    error_id = uuid.uuid4().hex[:16]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    # The exception's message may quote data (e.g. a shape); log its type and stack only.
    log.error("internal error %s in %s: %s\n%s", error_id, method, type(exc).__name__, frames)
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"error_id": error_id}
    )
    req = error_details_pb2.RequestInfo(request_id=error_id)
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})", [info, req]


def to_rpc_status(exc: BaseException, method: str) -> grpc.Status:
    """A ``grpc.Status`` with ``google.rpc`` details for ``exc``, via :data:`STATUS_TABLE`."""
    row = _rule(exc)
    if row is None:
        code, message, details = _internal(exc, method)
    else:
        cls, code, reason = row
        message, details = _message(exc, cls), _details(exc, reason, method)
    proto = status_pb2.Status(code=code.value[0], message=message, details=[_pack(d) for d in details])
    return rpc_status.to_status(proto)
