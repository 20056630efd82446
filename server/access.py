"""The access interceptor: safe request decoding and one access line per call.

* **Decoding.** The protobuf runtime refuses a ``string`` field that is not valid UTF-8 (bytes
  0xFF, an encoded lone surrogate); left to grpc, that failure is ``UNKNOWN`` with a protobuf class
  name and an ERROR traceback per request. Here the deserializer returns an :class:`Undecodable`
  marker instead, and the call is answered ``INVALID_ARGUMENT`` with a ``BadRequest`` naming the
  field (found by walking the wire format; ``request`` when no single field is to blame), counted
  in ``dprdm_bad_requests_total``, without a traceback.
* **Access lines** (:mod:`dprdm.server.logs`): method, status code, error class, tenant, index,
  profile, domain, request id, spend id, replayed/reused, epsilon charged; ``duration_ms`` only for
  :data:`~dprdm.server.logs.TIMED_METHODS`. Never the prompt.

Installed after the auth interceptor (which refuses before decoding matters and logs its own
refusals), so the caller is known here. The servicer's :class:`_Call` reports each call's final
code and error class through :func:`note_outcome`.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .api_types import NAME_RE, REQUEST_ID_RE
from .auth import OPEN_PREFIXES, current_caller, rewrap_handler
from .errors import InvalidArgument, ServiceError
from .logs import ACCESS_LOGGER, TIMED_METHODS, event
from .metrics import Metrics
from .status import to_rpc_status

__all__ = ["AccessInterceptor", "Undecodable", "note_outcome", "undecodable_field"]

log = logging.getLogger(ACCESS_LOGGER)
_REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED"})


@dataclass(frozen=True)
class Undecodable:
    """What the safe deserializer returns for bytes the protobuf runtime refuses."""

    field: str
    description: str


@dataclass
class _Record:
    method: str
    start: float
    code: str = "OK"
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


_RECORD: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("dprdm_access", default=None)


def note_outcome(code: str, error: BaseException | None) -> None:
    """Record the current call's final status code and error class (called by the servicer)."""
    record = _RECORD.get()
    if record is not None:
        record.code = code
        record.error = None if error is None else type(error).__name__


# -- decoding -------------------------------------------------------------------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]  # IndexError past the end: a truncated message
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def undecodable_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The (dotted) name of the first string field of ``data`` that is not valid UTF-8, or None."""
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(data, i)
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            elif wire == 2:
                size, i = _varint(data, i)
                chunk, i = data[i : i + size], i + size
                f = descriptor.fields_by_number.get(number)
                if f is None:
                    continue
                if f.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + f.name
                elif f.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = undecodable_field(f.message_type, chunk, f"{prefix}{f.name}.")
                    if inner is not None:
                        return inner
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)

    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            name = undecodable_field(descriptor, data) if descriptor is not None else None
            if name is None:
                return Undecodable("request", "the request message could not be decoded")
            return Undecodable(name, "must be valid UTF-8")

    return run


# -- access lines ---------------------------------------------------------------------------------
def _clean(value: str, pattern: Any) -> str | None:
    if not value:
        return None
    return value if pattern.match(value) else "<invalid>"


def _request_fields(request: Any) -> dict[str, Any]:
    if not isinstance(request, Message):
        return {}
    names = request.DESCRIPTOR.fields_by_name
    out: dict[str, Any] = {}
    for name in ("index", "profile", "domain"):
        if name in names and isinstance(getattr(request, name), str):
            out[name] = _clean(getattr(request, name), NAME_RE)
    if "request_id" in names:
        out["request_id"] = _clean(request.request_id, REQUEST_ID_RE)
    return out


def _receipt_fields(message: Any) -> dict[str, Any] | None:
    holder = message
    if isinstance(message, Message) and message.DESCRIPTOR.oneofs_by_name.get("event") is not None:
        kind = message.WhichOneof("event")
        holder = getattr(message, kind) if kind else None
    if not isinstance(holder, Message) or "receipt" not in holder.DESCRIPTOR.fields_by_name:
        return None
    if not holder.HasField("receipt"):
        return None
    r = holder.receipt
    return {
        "domain": r.domain or None,
        "spend_id": r.spend_id or None,
        "epsilon_charged": r.epsilon_charged,
        "replayed": r.replayed,
        "reused": r.reused,
    }


def _emit(record: _Record) -> None:
    fields: dict[str, Any] = {"method": record.method, "code": record.code, "error": record.error}
    try:
        fields["tenant"] = current_caller().tenant
    except ServiceError:
        fields["tenant"] = None
    fields.update(record.fields)
    if record.method in TIMED_METHODS:
        fields["duration_ms"] = round((time.monotonic() - record.start) * 1000.0, 3)
    if record.code in _REFUSALS:
        event(log, logging.WARNING, "refused", **fields)
    elif record.code in ("INTERNAL", "UNKNOWN"):
        event(log, logging.ERROR, "access", **fields)
    else:
        event(log, logging.INFO, "access", **fields)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Safe decoding (INVALID_ARGUMENT for undecodable bytes) and access lines for the dprdm APIs."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler  # the dprdm APIs have unary requests only

        def wrap(behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            return self._stream(behaviour, method) if streaming else self._unary(behaviour, method)

        return rewrap_handler(handler, wrap, _safe_deserializer)

    async def _refuse_undecodable(self, bad: Undecodable, record: _Record, context: Any) -> None:
        record.code, record.error, record.fields["field"] = "INVALID_ARGUMENT", "Undecodable", bad.field
        if self._metrics is not None:
            self._metrics.bad_request(record.method, bad.field)
            self._metrics.request(record.method, "INVALID_ARGUMENT")
        await context.abort_with_status(to_rpc_status(InvalidArgument(bad.field, bad.description), record.method))

    def _unary(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = _Record(method, time.monotonic())
            _RECORD.set(record)
            try:
                if isinstance(request, Undecodable):
                    await self._refuse_undecodable(request, record, context)
                record.fields.update(_request_fields(request))
                response = await behaviour(request, context)
                record.fields.update(_receipt_fields(response) or {})
                return response
            except BaseException as exc:
                _fail(record, exc)
                raise
            finally:
                _emit(record)

        return unary

    def _stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = _Record(method, time.monotonic())
            _RECORD.set(record)
            try:
                if isinstance(request, Undecodable):
                    await self._refuse_undecodable(request, record, context)
                record.fields.update(_request_fields(request))
                async for item in behaviour(request, context):
                    record.fields.update(_receipt_fields(item) or {})
                    yield item
            except BaseException as exc:
                _fail(record, exc)
                raise
            finally:
                _emit(record)

        return stream


def _fail(record: _Record, exc: BaseException) -> None:
    """An exception leaving the servicer: keep the code the servicer noted, else classify it."""
    if record.code != "OK":
        return
    if isinstance(exc, Exception):
        record.code, record.error = "UNKNOWN", type(exc).__name__
    else:  # CancelledError, GeneratorExit: the client went away
        record.code = "CANCELLED"
