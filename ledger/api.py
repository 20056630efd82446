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

The ledger is the one place that writes receipts: ``reserve`` composes the :class:`Receipt` in
the same transaction (the figures right after this spend), stores it with the spend and returns
it; replays and release reuse read the stored one.

Reservations are never refunded. A reserved spend with no stored release (crash in between) is
answered with :class:`ReleaseMissing` on replay, never with a fresh draw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    "ReleaseConflict",
    "LedgerCorrupt",
    "LedgerUnavailable",
    "BudgetState",
    "Spend",
    "Receipt",
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


class ReleaseConflict(LedgerError):
    """``store_release`` of a spend that already has a different release (releases never change)."""


class LedgerCorrupt(LedgerError):
    """Stored running curves or counts do not add up to the spends (a consistency check failed)."""


class LedgerUnavailable(LedgerError):
    """The store cannot commit (disk full, I/O error, read-only or missing file, another process
    holding the write lock past the busy timeout): the transaction was rolled back, so nothing
    was written and nothing was charged (gRPC UNAVAILABLE with RetryInfo).

    Why "nothing was charged" holds for SQLite in WAL mode: a transaction exists once its commit
    frame is in the WAL and the WAL index header (what every connection reads) is advanced past
    it. A failed write (``SQLITE_FULL``: ENOSPC, or ``SQLITE_IOERR``) makes the COMMIT (or an
    earlier statement) fail before the header is advanced; the ledger then issues ``ROLLBACK``
    (or SQLite already did), and the next transaction overwrites those frames. The one exception
    is a failed fsync AFTER the frames were written: a crash could then recover the spend on
    restart. That errs on the safe side: a charge without a release, answered with
    :class:`ReleaseMissing` on replay, never a release without a charge.

    Attributes:
        path: the database file.
        cause: SQLite's description of the failure (e.g. "database or disk is full").
        retry_after_seconds: a public constant for the client's RetryInfo.
    """

    def __init__(self, path: str, cause: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(f"ledger {path} cannot commit: {cause} (rolled back: nothing was written or charged)")
        self.path = path
        self.cause = cause
        self.retry_after_seconds = retry_after_seconds


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
    """One row of the audit trail.

    Attributes:
        spend_id, domain, tenant, request_id, binding_hash: as reserved.
        profile: the profile JSON given to ``reserve``.
        epsilon_charged: epsilon of the charge alone, at the budget's delta.
        created_at: admission time, seconds since the epoch (``time.time()``).
        status: "reserved", or "released" once its release is stored.
    """

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
class Receipt:
    """The privacy cost of one answer, as the client sees it (SPEC §7; wire type ``dprdm.v1.Receipt``).

    Composed by the ledger when it admits a spend and stored with it; spent/left figures are
    informational (epsilon at the budget's delta) and are those right after that spend, also when
    the stored receipt answers a replay; a reuse shows the domain's current figures.

    Attributes:
        spend_id: the spend ("" for an answer that charged no ledger).
        request_id: the request the receipt answers.
        index: the index name the spend was made for ("" if none, e.g. a baseline run).
        domain: the privacy domain charged.
        profile: the profile's name ("" if the profile had none).
        epsilon_charged: epsilon of this charge alone (0 on a reused release).
        delta: the budget's delta.
        epsilon_spent: the domain's epsilon spent right after this spend.
        epsilon_left: ``max(0, epsilon_budget - epsilon_spent)``.
        epsilon_budget: the budget's epsilon.
        replayed: the answer is the stored release of this very (tenant, request id).
        reused: the answer is the stored release of another request of the same tenant and input.
    """

    spend_id: str
    request_id: str
    index: str
    domain: str
    profile: str
    epsilon_charged: float
    delta: float
    epsilon_spent: float
    epsilon_left: float
    epsilon_budget: float
    replayed: bool = False
    reused: bool = False

    @classmethod
    def free(
        cls, *, request_id: str, index: str, domain: str, profile: str, state: BudgetState | None = None
    ) -> Receipt:
        """The receipt of an answer that charged nothing (a profile that never retrieves, or an
        index whose domain has no budget): no spend, charged 0; with ``state`` (the domain's budget
        now) the budget's delta and epsilon, spent and left, else every figure 0."""
        if state is None:
            return cls("", request_id, index, domain, profile, 0.0, 0.0, 0.0, 0.0, 0.0)
        budget = state.budget
        return cls(
            "", request_id, index, domain, profile, 0.0, float(budget.delta),
            float(state.epsilon_spent), float(state.epsilon_left), float(budget.epsilon),
        )  # fmt: skip

    def as_replay(self) -> Receipt:
        """This receipt marked ``replayed`` (a replay of its own request: nothing new charged)."""
        return replace(self, replayed=True)

    def as_reuse(self, request_id: str, state: BudgetState | None = None) -> Receipt:
        """This receipt answering another request of the same tenant and public input from the
        stored release: ``reused``, charged 0, labelled with that ``request_id``; with ``state``
        (the domain's budget now), its spent/left figures are the current ones."""
        out = replace(self, request_id=request_id, epsilon_charged=0.0, reused=True)
        if state is not None:
            out = replace(out, epsilon_spent=state.epsilon_spent, epsilon_left=state.epsilon_left)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the stored form and the wire message's fields), in field order."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}  # asdict: 5x slower

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Receipt:
        """Inverse of :meth:`to_dict` (unknown keys ignored).

        Raises:
            ValueError: ``data`` lacks a field without a default.
        """
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"not a receipt: it has the keys {sorted(data)}") from exc


@dataclass(frozen=True)
class Reservation:
    """The result of :meth:`Ledger.reserve`.

    Attributes:
        spend_id: the spend's id (new, or the replayed one).
        replay: True if (tenant, request_id, binding) was seen before; ``release`` then holds the
            stored release, ``receipt`` the stored receipt marked ``replayed``, and nothing new
            was charged.
        state: the budget state right after this reservation (now, for a replay).
        receipt: the receipt the ledger composed and stored with the spend.
        release: stored release (replay only).
    """

    spend_id: str
    replay: bool
    state: BudgetState
    receipt: Receipt
    release: npt.NDArray[np.float64] | None = None


class Ledger(Protocol):
    """A durable store of budgets and spends. Implementations: SQLite (default), in-memory (tests);
    PostgreSQL later. ``tests/test_ledger_conformance.py`` runs one behavioural suite against each.
    """

    def create_budget(self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None) -> None:
        """Create the budget of a privacy domain.

        Raises:
            DomainExists: the domain already has a budget (never replaced).
            ValueError: naming a bad domain, tenant or quota.
        """
        ...

    def budget_state(self, domain: str) -> BudgetState:
        """Current state.

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        ...

    def domains(self) -> list[str]:
        """All domains with a budget, sorted."""
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
        index: str = "",
    ) -> Reservation:
        """Check and durably append a charge (one transaction, committed before returning), and
        compose, store and return its :class:`Receipt`.

        Args:
            domain: privacy domain.
            tenant: the authenticated tenant.
            request_id: the client's idempotency key (unique per tenant).
            binding_hash: hash of (index version, profile, prompt) the request id is bound to.
            profile: the profile as plain JSON (audit trail); its ``"name"``, if any, labels the receipt.
            charge_rdp: the charge, an RDP curve over ``DEFAULT_ORDERS`` (>= 0, may be ``+inf``).
            index: the index name the receipt is labelled with ("" if none).

        Returns:
            The new reservation, or the stored release and receipt of a replay (nothing charged).

        Raises:
            UnknownDomain, ReplayMismatch, ReleaseMissing, BudgetExhausted, QuotaExhausted,
            LedgerUnavailable (a durable store that cannot commit; nothing charged),
            ValueError (naming a malformed argument).
        """
        ...

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64]) -> None:
        """Durably attach the release to a reserved spend (its receipt was stored by ``reserve``).

        Idempotent: the same release again is a no-op.

        Raises:
            UnknownSpend: no spend has this id.
            ReleaseConflict: the spend already has a different release.
            LedgerUnavailable: a durable store cannot commit (the release is not stored).
        """
        ...

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], Receipt] | None:
        """A stored release of this tenant for the same public input (release reuse, charged 0):
        ``(spend_id, release, stored receipt)`` of the newest such release, or None.

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        ...

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        """The binding hash a (tenant, request id) was first charged with, or None if unused
        (lets the service refuse a reused request id before answering from release reuse)."""
        ...

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        """Spends of a domain, oldest first (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
            ValueError: ``limit`` not in [1, 100000] or ``offset`` < 0.
        """
        ...

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        """tenant -> (epsilon quota, epsilon spent) (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        ...

    def close(self) -> None:
        """Flush and release resources (idempotent); later calls raise :class:`LedgerError`."""
        ...
