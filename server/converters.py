"""Conversions between protobuf messages and the service layer's types (no logic, no checks
beyond what a field's protobuf type cannot express)."""

from __future__ import annotations

from collections.abc import Iterable

from dprdm.ledger.api import Spend
from dprdm.proto.v1 import admin_pb2, dprdm_pb2, types_pb2

from .admin import Counts, CreateBudgetArgs
from .api_types import (
    Answer,
    BudgetView,
    Done,
    GenerateArgs,
    GenerateEvent,
    ImageOut,
    IndexView,
    Progress,
    QueryArgs,
    Queued,
    QuotaView,
    Receipt,
    Retrieved,
    validate_generate,
    validate_query,
)
from .config import Limits

__all__ = [
    "query_args",
    "generate_args",
    "receipt_pb",
    "budget_pb",
    "retrieve_response",
    "generate_event",
    "list_indexes_response",
    "create_budget_args",
    "spend_pb",
    "counts_response",
    "quotas_response",
]


def query_args(request: dprdm_pb2.RetrieveRequest | dprdm_pb2.GenerateRequest, limits: Limits) -> QueryArgs:
    """Validated :class:`QueryArgs` from a Retrieve or Generate request."""
    return validate_query(request.index, request.profile, request.prompt, request.request_id, limits)


def generate_args(request: dprdm_pb2.GenerateRequest, limits: Limits) -> GenerateArgs:
    """Validated :class:`GenerateArgs`."""
    seed = request.seed if request.HasField("seed") else None
    return validate_generate(query_args(request, limits), request.num_images, request.steps, seed, limits)


def receipt_pb(r: Receipt) -> types_pb2.Receipt:
    """Receipt message."""
    return types_pb2.Receipt(**r.to_dict())


def quota_pb(q: QuotaView) -> types_pb2.TenantQuota:
    """TenantQuota message."""
    return types_pb2.TenantQuota(
        tenant=q.tenant, epsilon_quota=q.epsilon_quota, epsilon_spent=q.epsilon_spent
    )


def budget_pb(b: BudgetView) -> types_pb2.BudgetInfo:
    """BudgetInfo message (with the neighbouring relation the guarantee is stated for)."""
    from .api_types import NEIGHBOURING

    msg = types_pb2.BudgetInfo(
        domain=b.domain,
        epsilon=b.epsilon,
        delta=b.delta,
        epsilon_spent=b.epsilon_spent,
        epsilon_left=b.epsilon_left,
        rule=b.rule,
        filter_order=b.filter_order,
        neighbouring=NEIGHBOURING,
    )
    if b.quota is not None:
        msg.quota.CopyFrom(quota_pb(b.quota))
    return msg


def retrieve_response(a: Answer) -> dprdm_pb2.RetrieveResponse:
    """RetrieveResponse: the release and its receipt."""
    return dprdm_pb2.RetrieveResponse(embedding=a.release.tolist(), receipt=receipt_pb(a.receipt))


def generate_event(ev: GenerateEvent) -> dprdm_pb2.GenerateEvent:
    """One GenerateEvent."""
    if isinstance(ev, Queued):
        return dprdm_pb2.GenerateEvent(queued=dprdm_pb2.Queued(position=ev.position))
    if isinstance(ev, Retrieved):
        return dprdm_pb2.GenerateEvent(retrieved=dprdm_pb2.Retrieved(receipt=receipt_pb(ev.receipt)))
    if isinstance(ev, Progress):
        return dprdm_pb2.GenerateEvent(progress=dprdm_pb2.Progress(step=ev.step, total_steps=ev.total_steps))
    if isinstance(ev, ImageOut):
        return dprdm_pb2.GenerateEvent(
            image=dprdm_pb2.GeneratedImage(index=ev.index, png=ev.png, width=ev.width, height=ev.height)
        )
    if isinstance(ev, Done):
        return dprdm_pb2.GenerateEvent(
            done=dprdm_pb2.Done(receipt=receipt_pb(ev.receipt), seed=ev.seed, num_images=ev.num_images)
        )
    raise TypeError(f"unknown generation event {type(ev).__name__}")


def list_indexes_response(views: Iterable[IndexView]) -> dprdm_pb2.ListIndexesResponse:
    """ListIndexesResponse (public facts only)."""
    out = dprdm_pb2.ListIndexesResponse()
    for v in views:
        info = out.indexes.add(
            name=v.name,
            domain=v.domain,
            dimension=v.dimension,
            public_size=v.public_size,
            version=v.version,
            private=v.private,
            generation=v.generation,
            bundle=v.bundle,
        )
        info.encoder.CopyFrom(
            dprdm_pb2.EncoderInfo(
                name=str(v.encoder["name"]),
                weights_sha256=str(v.encoder["weights_sha256"]),
                dimension=int(v.encoder["dimension"]),
            )
        )
        for p in v.profiles:
            info.profiles.add(
                name=p.name,
                k=p.k,
                q=p.q,
                sigma=p.sigma,
                epsilon_per_query=p.epsilon_per_query,
                **{"lambda": p.lam},
            )
        if v.budget is not None:
            info.budget.CopyFrom(budget_pb(v.budget))
    return out


def create_budget_args(r: admin_pb2.CreateBudgetRequest) -> CreateBudgetArgs:
    """CreateBudgetArgs (profile parameters validated by the admin service)."""
    profiles = [{"k": p.k, "q": p.q, "sigma": p.sigma, "lambda": getattr(p, "lambda")} for p in r.profiles]
    return CreateBudgetArgs(
        domain=r.domain,
        epsilon=r.epsilon,
        delta=r.delta,
        profiles=profiles,
        renyi_filter=r.renyi_filter,
        filter_order=r.filter_order or None,
        tenant_quotas=dict(r.tenant_quotas),
    )


def spend_pb(s: Spend) -> admin_pb2.Spend:
    """Spend message of the audit trail."""
    p = s.profile
    params = admin_pb2.ProfileParams(
        k=int(p.get("k", 0)),
        q=float(p.get("q", 0.0)),
        sigma=float(p.get("sigma", 0.0)),
        **{"lambda": float(p.get("lambda", 0.0))},
    )
    return admin_pb2.Spend(
        spend_id=s.spend_id,
        tenant=s.tenant,
        request_id=s.request_id,
        binding_hash=s.binding_hash,
        profile=params,
        epsilon_charged=s.epsilon_charged,
        created_at=s.created_at,
        status=s.status,
    )


def counts_response(c: Counts) -> admin_pb2.GetCountsResponse:
    """GetCountsResponse (operator-only exact counts)."""
    return admin_pb2.GetCountsResponse(
        domain=c.domain,
        spends=c.spends,
        budget=budget_pb(c.budget),
        indexes=[
            admin_pb2.IndexCount(
                name=i.name, version=i.version, exact_size=i.exact_size, public_size=i.public_size
            )
            for i in c.indexes
        ],
    )


def quotas_response(quotas: Iterable[QuotaView]) -> admin_pb2.ListQuotasResponse:
    """ListQuotasResponse."""
    return admin_pb2.ListQuotasResponse(quotas=[quota_pb(q) for q in quotas])
