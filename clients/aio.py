"""The asyncio client of the dprdm gRPC API (``grpc.aio``): :class:`AsyncClient`, the same
methods as :class:`dprdm.clients.client.Client`, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import numpy as np

from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc, types_pb2

from .wire import (
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

__all__ = ["AsyncClient"]


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
