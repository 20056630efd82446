"""The durable privacy ledger's interface (SPEC §6), shared by every store implementation.

Contract (reserve, then compute):

1. The service validates a request and computes the charge (an RDP curve over
   ``dprdm.privacy.DEFAULT_ORDERS``) from public inputs only.
2. ``reserve`` runs ONE durable transaction: idempotency check on (tenant, request_id), budget
   check with the domain's admission rule (``dprdm.privacy.Budget.admits``) against the running
   spent curve (kept incrementally: admission is O(#orders), not O(history)), optional tenant
   quota check, then appends the spend as ``reserved`` and updates the running curve; it commits
   (fsync, SQLite ``synchronous=FULL``) BEFORE returning.
3. Only then does the service touch private data; it stores the release with
   ``store_release`` (idempotent per spend) and returns it.

Reservations are never refunded. A reserved spend with no stored release (crash in between) is
answered with :class:`ReleaseMissing` on replay, never with a fresh draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dprdm.privacy import Budget

__all__ = [
    "LedgerError",
    "BudgetExhausted",
    "QuotaExhausted",
    "UnknownDomain",
    "DomainExists",
    "ReplayMismatch",
    "ReleaseMissing",
    "SchemaMismatch",
    "UnknownSpend",
    "LedgerCorrupt",
    "BudgetState",
    "Spend",
    "Reservation",
    "Ledger",
]


class LedgerError(Exception):
    """Base class of ledger errors. Messages never contain private-derived values."""


class BudgetExhausted(LedgerError):
    """The domain budget does not admit this charge (gRPC RESOURCE_EXHAUSTED,
    ErrorInfo reason PRIVACY_BUDGET_EXHAUSTED)."""

    def __init__(self, domain: str, epsilon_spent: float, epsilon_budget: float) -> None:
        super().__init__(f"privacy budget of domain {domain!r} exhausted")
        self.domain = domain
        self.epsilon_spent = epsilon_spent
        self.epsilon_budget = epsilon_budget


class QuotaExhausted(LedgerError):
    """The tenant's quota under the domain budget does not admit this charge."""

    def __init__(self, domain: str, tenant: str, epsilon_spent: float, epsilon_quota: float) -> None:
        super().__init__(f"quota of tenant {tenant!r} on domain {domain!r} exhausted")
        self.domain = domain
        self.tenant = tenant
        self.epsilon_spent = epsilon_spent
        self.epsilon_quota = epsilon_quota


class UnknownDomain(LedgerError):
    """No budget exists for this privacy domain (a private index without a ledger is not served)."""


class DomainExists(LedgerError):
    """A budget already exists for this domain (budgets are never silently replaced)."""


class ReplayMismatch(LedgerError):
    """(tenant, request_id) was already used with a different (index version, profile, prompt)."""


class ReleaseMissing(LedgerError):
    """(tenant, request_id) has a reserved spend but no stored release (crash in between)."""


class SchemaMismatch(LedgerError):
    """The store's schema version is not the one this code understands."""


class UnknownSpend(LedgerError):
    """No spend has this id (``store_release`` with an id ``reserve`` never returned)."""


class LedgerCorrupt(LedgerError):
    """Stored running curves or counts do not add up to the spends (a consistency check failed)."""


@dataclass(frozen=True)
class BudgetState:
    """A domain's budget and what has been charged to it.

    Attributes:
        domain: privacy domain (corpus id).
        budget: the (epsilon, delta) budget and its admission rule.
        spent_rdp: running RDP curve over ``DEFAULT_ORDERS``.
        spends: number of charged spends (admin-only; public responses show epsilon only).
        epsilon_spent: informational epsilon at the budget's delta.
    """

    domain: str
    budget: Budget
    spent_rdp: npt.NDArray[np.float64]
    spends: int
    epsilon_spent: float

    @property
    def epsilon_left(self) -> float:
        """max(0, epsilon - epsilon_spent) (informational)."""
        return max(0.0, float(self.budget.epsilon) - self.epsilon_spent)


@dataclass(frozen=True)
class Spend:
    """One row of the audit trail."""

    spend_id: str
    domain: str
    tenant: str
    request_id: str
    binding_hash: str
    profile: dict[str, Any]
    epsilon_charged: float
    created_at: float
    status: str  # "reserved" | "released"


@dataclass(frozen=True)
class Reservation:
    """The result of :meth:`Ledger.reserve`.

    Attributes:
        spend_id: the spend's id (new, or the replayed one).
        replay: True if (tenant, request_id, binding) was seen before; ``release`` then holds the
            stored release and ``receipt`` the stored receipt, and nothing new was charged.
        release: stored release (replay only).
        receipt: stored receipt dict (replay only), or the new receipt fields.
        state: the budget state right after this reservation.
    """

    spend_id: str
    replay: bool
    state: BudgetState
    release: npt.NDArray[np.float64] | None = None
    receipt: dict[str, Any] = field(default_factory=dict)


class Ledger(Protocol):
    """A durable store of budgets and spends. Implementations: SQLite (default); PostgreSQL later."""

    def create_budget(self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None) -> None:
        """Create the budget of a privacy domain. Raises :class:`DomainExists`."""
        ...

    def budget_state(self, domain: str) -> BudgetState:
        """Current state. Raises :class:`UnknownDomain`."""
        ...

    def domains(self) -> list[str]:
        """All domains with a budget."""
        ...

    def reserve(
        self,
        *,
        domain: str,
        tenant: str,
        request_id: str,
        binding_hash: str,
        profile: dict[str, Any],
        charge_rdp: npt.NDArray[np.float64],
    ) -> Reservation:
        """Check and durably append a charge (one transaction, committed before returning).

        Raises:
            BudgetExhausted, QuotaExhausted, UnknownDomain, ReplayMismatch, ReleaseMissing.
        """
        ...

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64], receipt: dict[str, Any]) -> None:
        """Durably attach the release and receipt to a reserved spend (idempotent: a second call
        with a different release raises ``LedgerError``)."""
        ...

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], dict[str, Any]] | None:
        """A stored release of this tenant for the same public input (release reuse, charged 0):
        ``(spend_id, release, receipt)`` of the newest such release, or None."""
        ...

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        """The binding hash a (tenant, request id) was first charged with, or None if unused
        (lets the service refuse a reused request id before answering from release reuse)."""
        ...

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        """Spends of a domain, oldest first (admin only)."""
        ...

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        """tenant -> (epsilon quota, epsilon spent) (admin only)."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...
