"""Thin gRPC servicers: convert the request, call the service layer, convert the reply.

Every method runs inside :class:`_Call`, which maps exceptions through the one status table
(:mod:`dprdm.server.status`), counts the request by method and final code, and reports that code
to the access line (:func:`dprdm.server.access.note_outcome`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc

from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc

from . import converters as conv
from .access import note_outcome
from .admin import AdminService
from .api_types import Caller
from .auth import current_caller
from .metrics import Metrics
from .service import DprdmService
from .status import code_of, to_rpc_status

__all__ = ["DprdmServicer", "AdminServicer"]


class _Call:
    """Per-call wrapper: caller, deadline, error mapping and the request counter."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, metrics: Metrics | None) -> None:
        self.context, self.method, self.metrics = context, method, metrics

    @property
    def caller(self) -> Caller:
        """The authenticated caller (set by the auth interceptor)."""
        return current_caller()

    @property
    def deadline(self) -> float | None:
        """The call's absolute ``time.monotonic()`` deadline, or None."""
        remaining = self.context.time_remaining()
        return None if remaining is None else time.monotonic() + float(remaining)

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(
        self, etype: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            self._count("OK", None)
            return False
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self._count("CANCELLED", None)
            return False
        if isinstance(exc, grpc.aio.AbortError):
            return False
        self._count(code_of(exc).name, exc)
        await self.context.abort_with_status(to_rpc_status(exc, self.method))
        return False  # pragma: no cover - abort_with_status raises

    def _count(self, code: str, exc: BaseException | None) -> None:
        note_outcome(code, exc)
        if self.metrics is not None:
            self.metrics.request(self.method, code)


class DprdmServicer(dprdm_pb2_grpc.DprdmServicer):
    """The public API."""

    def __init__(self, service: DprdmService, metrics: Metrics | None = None) -> None:
        self.service, self.metrics = service, metrics
        self.limits = service.options.limits

    async def Retrieve(self, request: dprdm_pb2.RetrieveRequest, context: Any) -> dprdm_pb2.RetrieveResponse:
        async with _Call(context, "Retrieve", self.metrics) as call:
            args = conv.query_args(request, self.limits)
            answer = await self.service.retrieve(call.caller, args, deadline=call.deadline)
            return conv.retrieve_response(answer)

    async def Generate(
        self, request: dprdm_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[dprdm_pb2.GenerateEvent]:
        async with _Call(context, "Generate", self.metrics) as call:
            args = conv.generate_args(request, self.limits)
            async for event in self.service.generate(call.caller, args, deadline=call.deadline):
                yield conv.generate_event(event)

    async def GetBudget(
        self, request: dprdm_pb2.GetBudgetRequest, context: Any
    ) -> dprdm_pb2.GetBudgetResponse:
        async with _Call(context, "GetBudget", self.metrics) as call:
            target = request.WhichOneof("target")
            view = await self.service.get_budget(
                call.caller,
                index=request.index if target == "index" else None,
                domain=request.domain if target != "index" else None,
            )
            return dprdm_pb2.GetBudgetResponse(budget=conv.budget_pb(view))

    async def ListIndexes(
        self, request: dprdm_pb2.ListIndexesRequest, context: Any
    ) -> dprdm_pb2.ListIndexesResponse:
        async with _Call(context, "ListIndexes", self.metrics) as call:
            return conv.list_indexes_response(await self.service.list_indexes(call.caller))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """The operator API (admin role, enforced by the auth interceptor)."""

    def __init__(self, service: AdminService, metrics: Metrics | None = None) -> None:
        self.service, self.metrics = service, metrics

    async def CreateBudget(
        self, request: admin_pb2.CreateBudgetRequest, context: Any
    ) -> admin_pb2.CreateBudgetResponse:
        async with _Call(context, "CreateBudget", self.metrics):
            view = await self.service.create_budget(conv.create_budget_args(request))
            return admin_pb2.CreateBudgetResponse(budget=conv.budget_pb(view))

    async def GetAuditTrail(
        self, request: admin_pb2.GetAuditTrailRequest, context: Any
    ) -> admin_pb2.GetAuditTrailResponse:
        async with _Call(context, "GetAuditTrail", self.metrics):
            spends = await self.service.audit_trail(request.domain, request.limit, request.offset)
            return admin_pb2.GetAuditTrailResponse(spends=[conv.spend_pb(s) for s in spends])

    async def GetCounts(
        self, request: admin_pb2.GetCountsRequest, context: Any
    ) -> admin_pb2.GetCountsResponse:
        async with _Call(context, "GetCounts", self.metrics):
            return conv.counts_response(await self.service.counts(request.domain))

    async def ListQuotas(
        self, request: admin_pb2.ListQuotasRequest, context: Any
    ) -> admin_pb2.ListQuotasResponse:
        async with _Call(context, "ListQuotas", self.metrics):
            return conv.quotas_response(await self.service.quotas(request.domain))
