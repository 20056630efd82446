"""Bearer-token authentication and role checks, as a ``grpc.aio`` server interceptor.

Tokens come from the configuration (only their SHA-256 digests are kept). Every RPC of the
``dprdm.v1`` services needs ``authorization: Bearer <token>``: an unknown or missing token is
``UNAUTHENTICATED``; a tenant token on the ``Admin`` service is ``PERMISSION_DENIED``. Health
checking and reflection are open (probes and ``grpcurl`` need no token; they reveal nothing
private). The caller is handed to the servicer through a context variable set by the wrapped
handler (it runs in the RPC's own task).
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from .api_types import Caller
from .config import TokenConfig, hash_token
from .errors import PermissionDenied, ServiceError, Unauthenticated
from .logs import ACCESS_LOGGER, event
from .status import code_of, to_rpc_status

__all__ = ["Authenticator", "AuthInterceptor", "current_caller", "OPEN_PREFIXES", "ADMIN_PREFIX"]

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_PREFIX = "/dprdm.v1.Admin/"
_LOG = logging.getLogger(ACCESS_LOGGER)
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("dprdm_caller", default=None)


def current_caller() -> Caller:
    """The authenticated caller of the current RPC.

    Raises:
        Unauthenticated: outside an authenticated RPC.
    """
    caller = _CALLER.get()
    if caller is None:
        raise Unauthenticated("no authenticated caller")
    return caller


class Authenticator:
    """Maps bearer tokens to callers."""

    def __init__(self, tokens: Sequence[TokenConfig]) -> None:
        self._by_digest = self._digests(tokens)

    @staticmethod
    def _digests(tokens: Sequence[TokenConfig]) -> dict[str, Caller]:
        return {
            t.token_sha256: Caller(tenant=t.tenant, role=t.role, indexes=t.indexes, domains=t.domains) for t in tokens
        }

    def __len__(self) -> int:
        return len(self._by_digest)

    def replace(self, tokens: Sequence[TokenConfig]) -> None:
        """Swap in a new token list atomically (``SIGHUP``): a call sees the old list or the new one.

        Raises:
            ValueError: ``tokens`` is empty (every call would be refused; the old list is kept).
        """
        if not tokens:
            raise ValueError("no token is configured; every call would be refused")
        self._by_digest = self._digests(tokens)  # one reference assignment

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Caller:
        """The caller for the ``authorization`` metadata.

        Raises:
            Unauthenticated: missing, malformed or unknown token.
        """
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if len(values) != 1:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata; expected 'Bearer <token>'")
        digest = hash_token(token.strip())
        for known, caller in self._by_digest.items():  # constant-time comparison of digests
            if hmac.compare_digest(known, digest):
                return caller
        raise Unauthenticated("unknown token")

    def authorize(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Caller | None:
        """The caller allowed to call ``method`` (None for open methods).

        Raises:
            Unauthenticated, PermissionDenied.
        """
        if method.startswith(OPEN_PREFIXES):
            return None
        caller = self.authenticate(metadata)
        if method.startswith(ADMIN_PREFIX) and not caller.is_admin:
            raise PermissionDenied(f"role {caller.role!r} may not call {method}; the admin role is required")
        return caller


def _method_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Any, bool], Any],
    deserializer: Callable[[Any], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by ``wrap(behaviour, streaming)`` (and, if given, its
    request deserializer by ``deserializer(original)``); every RPC kind, serializers kept."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attr, factory, streaming in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            request = handler.request_deserializer
            return factory(
                wrap(behaviour, streaming),
                request_deserializer=request if deserializer is None else deserializer(request),
                response_serializer=handler.response_serializer,
            )
    return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call; ``on_reject(method, code)`` counts refusals (metrics)."""

    def __init__(
        self, authenticator: Authenticator, on_reject: Callable[[str, grpc.StatusCode], None] | None = None
    ) -> None:
        self._auth = authenticator
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        try:
            caller = self._auth.authorize(details.method, details.invocation_metadata)
        except ServiceError as exc:
            error = exc
            if self._on_reject is not None:
                self._on_reject(_method_name(details.method), code_of(error))
            return rewrap_handler(handler, lambda _b, streaming: _refuse(error, details.method, streaming))
        if caller is None:
            return handler
        return rewrap_handler(handler, lambda b, streaming: _with_caller(b, caller, streaming))


def _refuse(exc: ServiceError, method: str, streaming: bool) -> Callable[..., Any]:
    status = to_rpc_status(exc, method)

    def log_refusal(context: grpc.aio.ServicerContext) -> None:
        # The reason is one of this module's fixed messages (never the token); the peer is the address.
        event(_LOG, logging.WARNING, "auth refused", method=_method_name(method), code=code_of(exc).name,
              error=type(exc).__name__, reason=str(exc), peer=context.peer())  # fmt: skip

    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        log_refusal(context)
        await context.abort_with_status(status)

    async def stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        log_refusal(context)
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    return stream if streaming else unary


def _with_caller(behaviour: Callable[..., Any], caller: Caller, streaming: bool) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _CALLER.set(caller)
        return await behaviour(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _CALLER.set(caller)
        async for item in behaviour(request, context):
            yield item

    return stream if streaming else unary
