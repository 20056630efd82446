"""Python client of the dprdm gRPC API: :class:`Client` (sync) and :class:`AsyncClient`.

The address and token default to the ``DPRDM_ADDRESS`` and ``DPRDM_TOKEN`` environment
variables; TLS is used when a CA certificate is given (``DPRDM_CA_CERT``), with a client
certificate and key for mTLS (``DPRDM_CLIENT_CERT``, ``DPRDM_CLIENT_KEY``).

Every spending call sends a request id (a fresh UUID unless given): retrying with the same id
returns the stored release and receipt without a new charge. Errors are raised as
:class:`DprdmError` with the status code and the ``google.rpc`` details decoded;
:class:`BudgetExhaustedError` is the refusal of an exhausted budget or quota.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc, types_pb2

__all__ = [
    "Client",
    "AsyncClient",
    "DprdmError",
    "BudgetExhaustedError",
    "RetrieveResult",
    "GenerateResult",
    "ChannelSettings",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class DprdmError(Exception):
    """A failed call: status ``code`` name, ``message``, ``reason`` (ErrorInfo) and decoded details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.metadata = dict(metadata or {})
        self.details = list(details)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> DprdmError:
        """Decode a ``grpc.RpcError`` (sync or aio) with its rich status."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        details: list[Any] = []
        reason, meta = "", {}
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
        for packed in status.details if status is not None else ():
            for kind in (
                error_details_pb2.ErrorInfo,
                error_details_pb2.QuotaFailure,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
                error_details_pb2.RequestInfo,
                error_details_pb2.ResourceInfo,
            ):
                if packed.Is(kind.DESCRIPTOR):
                    msg = kind()
                    packed.Unpack(msg)
                    details.append(msg)
                    if isinstance(msg, error_details_pb2.ErrorInfo):
                        reason, meta = msg.reason, dict(msg.metadata)
        klass = BudgetExhaustedError if code == grpc.StatusCode.RESOURCE_EXHAUSTED else cls
        return klass(code, message or "", reason, meta, details)


class BudgetExhaustedError(DprdmError):
    """RESOURCE_EXHAUSTED: the privacy budget (or the tenant's quota) does not admit the query."""


@dataclass(frozen=True)
class RetrieveResult:
    """The release (float64 vector) and its receipt."""

    embedding: npt.NDArray[np.float64]
    receipt: types_pb2.Receipt


@dataclass
class GenerateResult:
    """PNG images, the receipt, and the sampler seed used."""

    images: list[bytes] = field(default_factory=list)
    receipt: types_pb2.Receipt | None = None
    seed: int = 0


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to connect."""

    address: str
    token: str
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    @classmethod
    def from_env(
        cls, address: str | None = None, token: str | None = None, **tls: str | None
    ) -> ChannelSettings:
        """Fill unset fields from ``DPRDM_ADDRESS``, ``DPRDM_TOKEN``, ``DPRDM_CA_CERT``, ..."""
        env = os.environ
        return cls(
            address=address or env.get("DPRDM_ADDRESS", "127.0.0.1:50051"),
            token=token or env.get("DPRDM_TOKEN", ""),
            ca_cert=tls.get("ca_cert") or env.get("DPRDM_CA_CERT"),
            client_cert=tls.get("client_cert") or env.get("DPRDM_CLIENT_CERT"),
            client_key=tls.get("client_key") or env.get("DPRDM_CLIENT_KEY"),
            server_name=tls.get("server_name") or env.get("DPRDM_SERVER_NAME"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options (raised message limits, TLS name override)."""
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext."""
        if not self.ca_cert:
            return None
        key = Path(self.client_key).read_bytes() if self.client_key else None
        cert = Path(self.client_cert).read_bytes() if self.client_cert else None
        return grpc.ssl_channel_credentials(Path(self.ca_cert).read_bytes(), key, cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer token."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _retrieve_request(
    index: str, prompt: str, profile: str, request_id: str | None
) -> dprdm_pb2.RetrieveRequest:
    return dprdm_pb2.RetrieveRequest(
        index=index, profile=profile, prompt=prompt, request_id=request_id or uuid.uuid4().hex
    )


def _generate_request(
    index: str,
    prompt: str,
    profile: str,
    request_id: str | None,
    num_images: int,
    steps: int,
    seed: int | None,
) -> dprdm_pb2.GenerateRequest:
    for name, value, bits in (("num_images", num_images, 32), ("steps", steps, 32), ("seed", seed, 64)):
        if value is not None and not (isinstance(value, int) and 0 <= value < 2**bits):
            raise ValueError(f"{name} must be an integer in [0, 2**{bits}); found {value!r}")
    req = dprdm_pb2.GenerateRequest(
        index=index,
        profile=profile,
        prompt=prompt,
        num_images=num_images,
        steps=steps,
        request_id=request_id or uuid.uuid4().hex,
    )
    if seed is not None:
        req.seed = seed
    return req


def _budget_request(index: str | None, domain: str | None) -> dprdm_pb2.GetBudgetRequest:
    return (
        dprdm_pb2.GetBudgetRequest(domain=domain) if domain else dprdm_pb2.GetBudgetRequest(index=index or "")
    )


def _create_budget_request(
    domain: str,
    epsilon: float,
    delta: float,
    profiles: Sequence[dict[str, float]],
    renyi_filter: bool,
    filter_order: float | None,
    quotas: dict[str, float] | None,
) -> admin_pb2.CreateBudgetRequest:
    return admin_pb2.CreateBudgetRequest(
        domain=domain,
        epsilon=epsilon,
        delta=delta,
        renyi_filter=renyi_filter,
        filter_order=filter_order or 0.0,
        tenant_quotas=quotas or {},
        profiles=[
            admin_pb2.ProfileParams(k=int(p["k"]), q=p["q"], sigma=p["sigma"], **{"lambda": p["lambda"]})
            for p in profiles
        ],
    )


def _fold(result: GenerateResult, event: dprdm_pb2.GenerateEvent) -> None:
    kind = event.WhichOneof("event")
    if kind == "image":
        result.images.append(event.image.png)
    elif kind == "retrieved":
        result.receipt = event.retrieved.receipt
    elif kind == "done":
        result.receipt, result.seed = event.done.receipt, event.done.seed


class Client:
    """Synchronous client. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = 60.0,
        **tls: str | None,
    ) -> None:
        self.settings = ChannelSettings.from_env(address, token, **tls)
        creds = self.settings.credentials()
        opts = self.settings.options()
        self._channel = (
            grpc.secure_channel(self.settings.address, creds, options=opts)
            if creds
            else grpc.insecure_channel(self.settings.address, options=opts)
        )
        self._stub = dprdm_pb2_grpc.DprdmStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self.timeout = timeout

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self.settings.metadata(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise DprdmError.from_rpc(err) from None

    def retrieve(
        self,
        index: str,
        prompt: str,
        *,
        profile: str = "default",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> RetrieveResult:
        """The private conditioning vector for ``prompt`` and its receipt."""
        resp = self._call(self._stub.Retrieve, _retrieve_request(index, prompt, profile, request_id), timeout)
        return RetrieveResult(np.asarray(resp.embedding, dtype=np.float64), resp.receipt)

    def generate_events(
        self,
        index: str,
        prompt: str,
        *,
        profile: str = "default",
        num_images: int = 1,
        steps: int = 0,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[dprdm_pb2.GenerateEvent]:
        """The raw event stream of ``Generate``."""
        req = _generate_request(index, prompt, profile, request_id, num_images, steps, seed)
        try:
            yield from self._stub.Generate(
                req, metadata=self.settings.metadata(), timeout=timeout or self.timeout
            )
        except grpc.RpcError as err:
            raise DprdmError.from_rpc(err) from None

    def generate(
        self,
        index: str,
        prompt: str,
        *,
        on_event: Callable[[dprdm_pb2.GenerateEvent], None] | None = None,
        **kwargs: Any,
    ) -> GenerateResult:
        """Generate images; ``on_event`` sees every event (progress display)."""
        result = GenerateResult()
        for event in self.generate_events(index, prompt, **kwargs):
            if on_event is not None:
                on_event(event)
            _fold(result, event)
        return result

    def budget(self, index: str | None = None, *, domain: str | None = None) -> types_pb2.BudgetInfo:
        """The budget of an index's privacy domain (or of a domain)."""
        return self._call(self._stub.GetBudget, _budget_request(index, domain)).budget

    def list_indexes(self) -> list[dprdm_pb2.IndexInfo]:
        """Public facts about the served indexes."""
        return list(self._call(self._stub.ListIndexes, dprdm_pb2.ListIndexesRequest()).indexes)

    def create_budget(
        self,
        domain: str,
        epsilon: float,
        delta: float,
        profiles: Sequence[dict[str, float]],
        *,
        renyi_filter: bool = False,
        filter_order: float | None = None,
        quotas: dict[str, float] | None = None,
    ) -> types_pb2.BudgetInfo:
        """Admin: create a domain budget."""
        req = _create_budget_request(domain, epsilon, delta, profiles, renyi_filter, filter_order, quotas)
        return self._call(self._admin.CreateBudget, req).budget

    def audit_trail(self, domain: str, *, limit: int = 100, offset: int = 0) -> list[admin_pb2.Spend]:
        """Admin: the spends of a domain, oldest first."""
        req = admin_pb2.GetAuditTrailRequest(domain=domain, limit=limit, offset=offset)
        return list(self._call(self._admin.GetAuditTrail, req).spends)

    def counts(self, domain: str) -> admin_pb2.GetCountsResponse:
        """Admin: exact counts of a domain."""
        return self._call(self._admin.GetCounts, admin_pb2.GetCountsRequest(domain=domain))

    def quotas(self, domain: str) -> list[types_pb2.TenantQuota]:
        """Admin: tenants' quotas on a domain."""
        return list(self._call(self._admin.ListQuotas, admin_pb2.ListQuotasRequest(domain=domain)).quotas)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (``grpc.aio``); same methods as :class:`Client`, awaitable."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = 60.0,
        **tls: str | None,
    ) -> None:
        self.settings = ChannelSettings.from_env(address, token, **tls)
        creds = self.settings.credentials()
        opts = self.settings.options()
        self._channel = (
            grpc.aio.secure_channel(self.settings.address, creds, options=opts)
            if creds
            else grpc.aio.insecure_channel(self.settings.address, options=opts)
        )
        self._stub = dprdm_pb2_grpc.DprdmStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self.timeout = timeout

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self.settings.metadata(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise DprdmError.from_rpc(err) from None

    async def retrieve(
        self,
        index: str,
        prompt: str,
        *,
        profile: str = "default",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> RetrieveResult:
        """The private conditioning vector for ``prompt`` and its receipt."""
        resp = await self._call(
            self._stub.Retrieve, _retrieve_request(index, prompt, profile, request_id), timeout
        )
        return RetrieveResult(np.asarray(resp.embedding, dtype=np.float64), resp.receipt)

    async def generate_events(
        self,
        index: str,
        prompt: str,
        *,
        profile: str = "default",
        num_images: int = 1,
        steps: int = 0,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[dprdm_pb2.GenerateEvent]:
        """The raw event stream of ``Generate``."""
        req = _generate_request(index, prompt, profile, request_id, num_images, steps, seed)
        call = self._stub.Generate(req, metadata=self.settings.metadata(), timeout=timeout or self.timeout)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as err:
            raise DprdmError.from_rpc(err) from None

    async def generate(
        self,
        index: str,
        prompt: str,
        *,
        on_event: Callable[[dprdm_pb2.GenerateEvent], None] | None = None,
        **kwargs: Any,
    ) -> GenerateResult:
        """Generate images; ``on_event`` sees every event."""
        result = GenerateResult()
        async for event in self.generate_events(index, prompt, **kwargs):
            if on_event is not None:
                on_event(event)
            _fold(result, event)
        return result

    async def budget(self, index: str | None = None, *, domain: str | None = None) -> types_pb2.BudgetInfo:
        """The budget of an index's privacy domain (or of a domain)."""
        return (await self._call(self._stub.GetBudget, _budget_request(index, domain))).budget

    async def list_indexes(self) -> list[dprdm_pb2.IndexInfo]:
        """Public facts about the served indexes."""
        return list((await self._call(self._stub.ListIndexes, dprdm_pb2.ListIndexesRequest())).indexes)

    async def create_budget(
        self,
        domain: str,
        epsilon: float,
        delta: float,
        profiles: Sequence[dict[str, float]],
        *,
        renyi_filter: bool = False,
        filter_order: float | None = None,
        quotas: dict[str, float] | None = None,
    ) -> types_pb2.BudgetInfo:
        """Admin: create a domain budget."""
        req = _create_budget_request(domain, epsilon, delta, profiles, renyi_filter, filter_order, quotas)
        return (await self._call(self._admin.CreateBudget, req)).budget

    async def audit_trail(self, domain: str, *, limit: int = 100, offset: int = 0) -> list[admin_pb2.Spend]:
        """Admin: the spends of a domain, oldest first."""
        req = admin_pb2.GetAuditTrailRequest(domain=domain, limit=limit, offset=offset)
        return list((await self._call(self._admin.GetAuditTrail, req)).spends)

    async def counts(self, domain: str) -> admin_pb2.GetCountsResponse:
        """Admin: exact counts of a domain."""
        return await self._call(self._admin.GetCounts, admin_pb2.GetCountsRequest(domain=domain))

    async def quotas(self, domain: str) -> list[types_pb2.TenantQuota]:
        """Admin: tenants' quotas on a domain."""
        return list(
            (await self._call(self._admin.ListQuotas, admin_pb2.ListQuotasRequest(domain=domain))).quotas
        )

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
