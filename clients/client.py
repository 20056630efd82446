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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc, types_pb2

from .aio import AsyncClient
from .wire import (
    MAX_MESSAGE_BYTES,
    BudgetExhaustedError,
    ChannelSettings,
    DprdmError,
    GenerateResult,
    RetrieveResult,
    _budget_request,
    _create_budget_request,
    _fold,
    _generate_request,
    _retrieve_request,
)

__all__ = [
    "Client",
    "AsyncClient",
    "DprdmError",
    "BudgetExhaustedError",
    "RetrieveResult",
    "GenerateResult",
    "ChannelSettings",
    "MAX_MESSAGE_BYTES",
]


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
