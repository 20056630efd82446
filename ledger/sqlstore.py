"""The public face shared by the SQL stores (SQLite, PostgreSQL): writes through the batching
writer (:mod:`dprdm.ledger.writer`), reads, and the consistency check (SPEC §6).

A store subclass supplies the writer and :meth:`SqlLedger._reading` (a connection for reads whose
``execute`` takes ``?`` placeholders); the SQL is shared. Running curves are updated by
``spent = spent + charge`` in admission order, so they equal, bit for bit, the sequential sum of
the spends' charge curves in ``seq`` order; :meth:`SqlLedger.verify` checks exactly that.
Reservations are never refunded and there is no delete.

Admission uses :class:`~dprdm.ledger.state.Rule`, a thin wrapper over the privacy core's
``Budget.admits`` / ``Budget.spent_epsilon`` (O(#orders), the grid constants precomputed by
``EpsilonConverter``, ~15 us), so every store and the privacy core share one admission rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import Budget
from dprdm.privacy.accountant import curve_from_json

from .api import BudgetState, LedgerCorrupt, Receipt, Reservation, Spend
from .ops import CheckWritable, CreateBudget, Reserve, StoreRelease
from .state import ORDERS, Rule, curve_id_of, decode_release, unknown_domain
from .writer import CommitObserver, Writer, stored_receipt

__all__ = ["SqlLedger"]


class SqlLedger:
    """The :class:`~dprdm.ledger.api.Ledger` methods every SQL store shares (see the module docstring).

    Subclasses set ``self._writer`` (a :class:`~dprdm.ledger.writer.Writer`) and implement
    :meth:`_reading` and :meth:`close`; :data:`SNAPSHOT` is how a read transaction with one
    snapshot begins (``verify``).
    """

    SNAPSHOT = "BEGIN"
    _writer: Writer

    def _reading(self) -> AbstractContextManager[Any]:
        """A read connection (``execute(sql, params)`` with ``?`` placeholders) for one call.

        Raises:
            LedgerError: the ledger is closed ("ledger is closed").
            LedgerUnavailable: the store cannot be reached (a network store).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Finish queued writes and close every connection (idempotent)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- public writes

    def create_budget(self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None) -> None:
        """Create the budget of a privacy domain, with optional per-tenant epsilon quotas.

        Args:
            domain: privacy domain (corpus id).
            budget: its (epsilon, delta) budget and admission rule.
            tenant_quotas: tenant -> epsilon quota at the budget's delta (bookkeeping under the
                domain budget; tenants without a quota are limited by the budget only).

        Raises:
            DomainExists: the domain already has a budget (never replaced).
            ValueError: naming a bad domain, tenant or quota.
        """
        self._writer.submit(CreateBudget.build(domain, budget, tenant_quotas))

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
        """Check and durably append a charge with its receipt; committed before returning.

        Args:
            domain: privacy domain.
            tenant: the authenticated tenant.
            request_id: the client's idempotency key (unique per tenant).
            binding_hash: hash of (index version, profile, prompt) the request id is bound to.
            profile: the profile as plain JSON (audit trail); its ``"name"`` labels the receipt.
            charge_rdp: the charge, an RDP curve over ``DEFAULT_ORDERS`` (>= 0, may be ``+inf``).
            index: the index name the receipt is labelled with ("" if none).

        Returns:
            The new reservation and its receipt, or the stored release and receipt (marked
            ``replayed``) of a replay (nothing charged).

        Raises:
            UnknownDomain: no budget for ``domain``.
            ReplayMismatch: ``request_id`` was used with another binding or domain.
            ReleaseMissing: ``request_id`` was reserved but its release never stored.
            BudgetExhausted: the domain budget does not admit the charge (nothing written).
            QuotaExhausted: the tenant's quota does not admit the charge (nothing written).
            LedgerUnavailable: the store cannot commit (rolled back: nothing charged).
            ValueError: naming a malformed argument.
        """
        op = Reserve.build(
            domain=domain,
            tenant=tenant,
            request_id=request_id,
            binding_hash=binding_hash,
            profile=profile,
            charge_rdp=charge_rdp,
            index=index,
        )
        res: Reservation = self._writer.submit(op)
        return res

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64]) -> None:
        """Durably attach the release to a reserved spend (its receipt was stored at reservation).

        Idempotent: storing the same release (bit for bit, same shape) again is a no-op.

        Args:
            spend_id: the reservation's spend id.
            release: the released array (stored as float64).

        Raises:
            UnknownSpend: no spend has this id.
            ReleaseConflict: the spend already has a different release.
            LedgerUnavailable: the store cannot commit (the release is not stored).
            ValueError: a malformed argument.
        """
        self._writer.submit(StoreRelease.build(spend_id, release))

    def check_writable(self) -> None:
        """Commit a small write that changes no budget or spend, through the writer, so its
        outcome reaches the commit observers (the health probe; it rewrites the ``meta`` row
        ``write_check``).

        Raises:
            LedgerUnavailable: the store still cannot commit.
        """
        self._writer.submit(CheckWritable())

    def add_commit_observer(self, observer: CommitObserver) -> None:
        """Tell ``observer`` every write transaction's outcome: None once committed, the
        :class:`~dprdm.ledger.api.LedgerUnavailable` when the store could not commit. It is
        called on the committing thread, in commit order, and must be quick and not raise."""
        self._writer.observers.append(observer)

    def remove_commit_observer(self, observer: CommitObserver) -> None:
        """Stop telling ``observer`` (no error if it was not added)."""
        if observer in self._writer.observers:
            self._writer.observers.remove(observer)

    # -------------------------------------------------------------------------------------- reads

    def _read_rule(self, conn: Any, domain: str) -> Rule:
        rule = self._writer.known_rule(domain)
        if rule is None:
            row = conn.execute("SELECT budget FROM budgets WHERE domain = ?", (domain,)).fetchone()
            if row is None:
                raise unknown_domain(domain)
            rule = self._writer.rule(domain, row[0])
        return rule

    def budget_state(self, domain: str) -> BudgetState:
        """The domain's committed state (including other processes' commits).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._reading() as conn:
            row = conn.execute("SELECT budget, spent_rdp, spends FROM budgets WHERE domain = ?", (domain,)).fetchone()
        if row is None:
            raise unknown_domain(domain)
        rule = self._writer.rule(domain, row[0])
        spent = curve_from_json(json.loads(row[1]))
        spent.flags.writeable = False
        return BudgetState(domain, rule.budget, spent, int(row[2]), rule.epsilon(spent))

    def domains(self) -> list[str]:
        """All domains with a budget, sorted."""
        with self._reading() as conn:
            return [r[0] for r in conn.execute("SELECT domain FROM budgets ORDER BY domain").fetchall()]

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], Receipt] | None:
        """The newest stored release of ``tenant`` for the same public input (reuse, charged 0).

        Returns:
            ``(spend_id, release, stored receipt)``, or None. Other tenants' releases are never
            returned.

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._reading() as conn:
            self._read_rule(conn, domain)
            row = conn.execute(
                "SELECT spend_id, release, release_shape, receipt FROM spends WHERE tenant = ? AND binding_hash = ? "
                "AND domain = ? AND release IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (tenant, binding_hash, domain),
            ).fetchone()
        if row is None:
            return None
        return row[0], decode_release(bytes(row[1]), row[2]), stored_receipt(row[3])

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        """The binding hash of the spend charged for (tenant, request id), or None."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT binding_hash FROM spends WHERE tenant = ? AND request_id = ? LIMIT 1", (tenant, request_id)
            ).fetchone()
        return None if row is None else str(row[0])

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        """Spends of a domain in admission order (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
            ValueError: ``limit`` not in [1, 100000] or ``offset`` < 0.
        """
        if not (isinstance(limit, int) and 1 <= limit <= 100_000):
            raise ValueError(f"limit must be an integer in [1, 100000]; found {limit!r}")
        if not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"offset must be an integer >= 0; found {offset!r}")
        with self._reading() as conn:
            self._read_rule(conn, domain)
            rows = conn.execute(
                "SELECT spend_id, domain, tenant, request_id, binding_hash, profile, epsilon_charged, created_at, "
                "status FROM spends WHERE domain = ? ORDER BY seq LIMIT ? OFFSET ?",
                (domain, limit, offset),
            ).fetchall()
        return [Spend(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8]) for r in rows]

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        """tenant -> (epsilon quota, epsilon spent at the budget's delta) (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._reading() as conn:
            rule = self._read_rule(conn, domain)
            rows = conn.execute(
                "SELECT tenant, epsilon_quota, spent_rdp FROM tenant_quotas WHERE domain = ?", (domain,)
            ).fetchall()
        return {t: (float(q), rule.epsilon(curve_from_json(json.loads(c)))) for t, q, c in rows}

    def verify(self, domain: str | None = None) -> None:
        """Check that stored running curves and counts equal what the spends add up to.

        Recomputes, in one read snapshot, the sequential sum of the charge curves in admission
        order per domain and per quota tenant, which must equal the running curves bit for bit,
        and checks the spend counts and that a spend is ``released`` iff it has a release. After a
        migration to a new order grid (:mod:`dprdm.ledger.migration`) the same equality holds: the
        running and charge curves were migrated by the same selection of stored values.

        Args:
            domain: one domain, or None for all.

        Raises:
            UnknownDomain: ``domain`` has no budget.
            LedgerCorrupt: naming the domain (and tenant) that does not add up.
        """
        with self._reading() as conn:
            conn.execute(self.SNAPSHOT)
            try:
                names = [domain] if domain is not None else [
                    r[0] for r in conn.execute("SELECT domain FROM budgets ORDER BY domain").fetchall()
                ]
                for name in names:
                    _verify_domain(conn, name)
            finally:
                conn.execute("COMMIT")

    def stats(self) -> dict[str, int]:
        """Write transactions committed, operations they carried and batches run again (this process)."""
        return self._writer.stats()

    def __enter__(self) -> SqlLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verify_domain(conn: Any, domain: str) -> None:
    row = conn.execute("SELECT spent_rdp, spends FROM budgets WHERE domain = ?", (domain,)).fetchone()
    if row is None:
        raise unknown_domain(domain)
    quotas = {
        t: (curve_from_json(json.loads(c)), n)
        for t, c, n in conn.execute(
            "SELECT tenant, spent_rdp, spends FROM tenant_quotas WHERE domain = ?", (domain,)
        ).fetchall()
    }
    total = np.zeros_like(ORDERS)
    tenants = {t: np.zeros_like(ORDERS) for t in quotas}
    tenant_counts = dict.fromkeys(quotas, 0)
    decoded: dict[str, npt.NDArray[np.float64]] = {}  # by curve id
    count = 0
    for tenant, curve_id, text, status, has_release in _rows(conn.execute(
        "SELECT s.tenant, s.charge_id, c.rdp, s.status, s.release IS NOT NULL FROM spends s "
        "LEFT JOIN curves c ON c.curve_id = s.charge_id WHERE s.domain = ? ORDER BY s.seq",
        (domain,),
    )):
        charge = decoded.get(curve_id)
        if charge is None:
            if text is None or curve_id_of(text) != curve_id:
                raise LedgerCorrupt(f"domain {domain!r}: charge curve {curve_id!r} is missing or altered")
            charge = decoded[curve_id] = curve_from_json(json.loads(text))
        total = total + charge
        count += 1
        if tenant in tenants:
            tenants[tenant] = tenants[tenant] + charge
            tenant_counts[tenant] += 1
        if (status == "released") != bool(has_release):
            raise LedgerCorrupt(f"domain {domain!r} has a spend whose status {status!r} disagrees with its release")
    if count != row[1] or not np.array_equal(total, curve_from_json(json.loads(row[0]))):
        raise LedgerCorrupt(f"domain {domain!r}: running curve or count ({row[1]}) differs from its {count} spends")
    for tenant, (curve, n) in quotas.items():
        if n != tenant_counts[tenant] or not np.array_equal(curve, tenants[tenant]):
            raise LedgerCorrupt(f"domain {domain!r}: quota curve of tenant {tenant!r} differs from its spends")


def _rows(cursor: Any) -> Iterator[tuple[Any, ...]]:
    """A cursor's rows, streamed in blocks (a domain's trail may be long)."""
    while True:
        block = cursor.fetchmany(4096)
        if not block:
            return
        yield from block
