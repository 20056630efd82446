"""The operator service layer (admin role): budgets, exact counts, quotas, the audit trail.

Exact counts and the audit trail are operator-only (SPEC §3): they never reach tenants.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dprdm.ledger.api import Ledger, Spend
from dprdm.privacy import Budget, Profile, check_delta_for_size

from .api_types import BudgetView, QuotaView, check_finite, validate_name
from .catalog import Catalog
from .errors import InvalidArgument
from .service import budget_view

__all__ = ["CreateBudgetArgs", "IndexCount", "Counts", "AdminService", "MAX_AUDIT_LIMIT"]

MAX_AUDIT_LIMIT = 10_000
MAX_EPSILON = 1e6


@dataclass(frozen=True)
class CreateBudgetArgs:
    """An admin's request to create a domain budget (unvalidated profile parameters)."""

    domain: str
    epsilon: float
    delta: float
    profiles: Sequence[dict[str, Any]]
    renyi_filter: bool = False
    filter_order: float | None = None
    tenant_quotas: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexCount:
    """Exact and public sizes of a served index (operator-only)."""

    name: str
    version: str
    exact_size: int
    public_size: int


@dataclass(frozen=True)
class Counts:
    """Exact counts of a domain (operator-only)."""

    domain: str
    spends: int
    budget: BudgetView
    indexes: tuple[IndexCount, ...]


def _profiles(raw: Sequence[dict[str, Any]]) -> list[Profile]:
    out = []
    for i, p in enumerate(raw):
        try:
            prof = Profile(k=int(p["k"]), q=float(p["q"]), sigma=float(p["sigma"]), lam=float(p["lambda"]))
            prof.require_private_ok()
        except ValueError as exc:
            raise InvalidArgument(f"profiles[{i}]", str(exc)) from None
        out.append(prof)
    retrieving = list(dict.fromkeys(p for p in out if p.retrieves))
    if not retrieving:
        raise InvalidArgument("profiles", "at least one profile with lambda > 0 is required")
    return retrieving


ADMIN_THREADS = 2
"""Threads of the admin calls' own executor: an operator's call is answered even while every
query thread is busy (a flood of Retrieve never delays ``Counts`` or ``CreateBudget``)."""


class AdminService:
    """Admin operations over the ledger and the catalog (no gRPC types).

    Blocking ledger work runs on ``executor``; by default the service's own pool of
    :data:`ADMIN_THREADS` threads (closed by :meth:`close`), never the query threads."""

    def __init__(self, catalog: Catalog, ledger: Ledger, executor: Executor | None = None) -> None:
        self.catalog, self.ledger = catalog, ledger
        self._own = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="dprdm-admin")

    def close(self) -> None:
        """Stop the admin executor if this service created it (running calls finish)."""
        if self._own:
            self._executor.shutdown(wait=True)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _budget(self, args: CreateBudgetArgs) -> Budget:
        validate_name("domain", args.domain)
        check_finite("epsilon", args.epsilon, low=0.0, high=MAX_EPSILON)
        check_finite("delta", args.delta, low=0.0, high=0.5)
        profiles = _profiles(args.profiles)
        for tenant, eps in args.tenant_quotas.items():
            validate_name("tenant_quotas", tenant)
            check_finite(f"tenant_quotas[{tenant}]", eps, low=0.0, high=MAX_EPSILON)
        order = args.filter_order or None
        if order is not None and not math.isfinite(order):
            raise InvalidArgument("filter_order", "must be finite")
        try:
            if len(profiles) == 1 and not args.renyi_filter and order is None:
                return self._single(args, profiles[0])
            return Budget.renyi_filter(args.epsilon, args.delta, profiles, order=order)
        except ValueError as exc:
            raise InvalidArgument("filter_order" if order is not None else "epsilon", str(exc)) from None

    def _single(self, args: CreateBudgetArgs, profile: Profile) -> Budget:
        """A single-profile budget for the mechanism the domain serves with ``profile``: its noise
        kind comes from the served indexes (not recorded when none serves it yet: the server then
        requires ONE mechanism); several noise kinds need a Rényi filter (SPEC §4)."""
        dims = {
            p.hardened_dimension
            for s in self.catalog.indexes.values()
            if s.domain == args.domain
            for p in s.profiles.values()
            if p.profile == profile
        }
        if len(dims) > 1:
            raise InvalidArgument(
                "profiles",
                f"domain {args.domain!r} serves this profile with {len(dims)} noise kinds (two mechanisms); "
                f"use a Rényi filter (renyi_filter = true)",
            )
        if not dims:
            return Budget.single(args.epsilon, args.delta, profile, noise_recorded=False)
        return Budget.single(args.epsilon, args.delta, profile, hardened_dimension=dims.pop())

    async def create_budget(self, args: CreateBudgetArgs) -> BudgetView:
        """Create a domain budget (never replaces one: ``DomainExists``).

        Raises:
            InvalidArgument: naming the bad field; DomainExists.
        """
        budget = self._budget(args)
        for served in self.catalog.indexes.values():
            if served.domain == args.domain:
                try:
                    check_delta_for_size(budget.delta, served.index.public_size)
                except ValueError as exc:
                    raise InvalidArgument("delta", str(exc)) from None
        quotas = dict(args.tenant_quotas) or None
        await self._io(lambda: self.ledger.create_budget(args.domain, budget, tenant_quotas=quotas))
        return budget_view(await self._io(self.ledger.budget_state, args.domain))

    async def audit_trail(self, domain: str, limit: int = 0, offset: int = 0) -> list[Spend]:
        """Spends of a domain, oldest first. ``limit`` 0 means 100.

        Raises:
            InvalidArgument, UnknownDomain.
        """
        validate_name("domain", domain)
        if not (0 <= limit <= MAX_AUDIT_LIMIT):
            raise InvalidArgument("limit", f"must be in [0, {MAX_AUDIT_LIMIT}]; found {limit}")
        if offset < 0 or offset > 2**62:
            raise InvalidArgument("offset", "must be in [0, 2^62]")
        # every store raises UnknownDomain (-> NOT_FOUND) here (tests/test_ledger_conformance.py)
        return list(
            await self._io(lambda: self.ledger.audit_trail(domain, limit=limit or 100, offset=offset))
        )

    async def counts(self, domain: str) -> Counts:
        """Exact spend count and exact index sizes of a domain.

        Raises:
            InvalidArgument, UnknownDomain.
        """
        validate_name("domain", domain)
        state = await self._io(self.ledger.budget_state, domain)
        indexes = tuple(
            IndexCount(s.name, s.index.version, int(s.index.exact_size), int(s.index.public_size))
            for s in self.catalog.indexes.values()
            if s.domain == domain
        )
        return Counts(domain=domain, spends=int(state.spends), budget=budget_view(state), indexes=indexes)

    async def quotas(self, domain: str) -> list[QuotaView]:
        """Every tenant quota of a domain with its spent epsilon.

        Raises:
            InvalidArgument, UnknownDomain.
        """
        validate_name("domain", domain)
        quotas = await self._io(self.ledger.tenant_quotas, domain)  # UnknownDomain -> NOT_FOUND
        return [QuotaView(t, float(q), float(s)) for t, (q, s) in sorted(quotas.items())]
