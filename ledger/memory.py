"""An in-memory :class:`~dprdm.ledger.api.Ledger`: the same semantics as the SQLite store, no
durability. For tests, benchmarks and throw-away servers; the conformance suite
(``tests/test_ledger_conformance.py``) runs the same behavioural tests against every store.

It builds the same validated operations (:mod:`dprdm.ledger.ops`) and decides admissions and
receipts with the same code (:mod:`dprdm.ledger.state`) as the SQLite writer; one lock
serialises every call, so admission is sequential.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import Budget

from .api import BudgetState, DomainExists, LedgerError, Receipt, Reservation, Spend
from .ops import CreateBudget, Reserve, StoreRelease
from .state import (
    ORDERS,
    DomainState,
    Rule,
    decode_release,
    unknown_domain,
    unknown_spend,
)

__all__ = ["MemoryLedger"]


@dataclass
class _Spend:
    """One spend as the memory store keeps it (the release as float64 bytes and JSON shape)."""

    spend_id: str
    domain: str
    tenant: str
    request_id: str
    binding: str
    profile_json: str
    epsilon_charged: float
    created_at: float
    receipt: Receipt
    release: bytes | None = None
    shape: str | None = None


class MemoryLedger:
    """An in-memory ledger (same semantics as :class:`~dprdm.ledger.sqlite.SqliteLedger`, no durability).

    Thread-safe (one lock). See :class:`~dprdm.ledger.api.Ledger` for every method's contract.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._domains: dict[str, DomainState] = {}
        self._spends: dict[str, _Spend] = {}  # admission order
        self._by_key: dict[tuple[str, str], _Spend] = {}  # (tenant, request_id)
        self._by_binding: dict[tuple[str, str, str], list[_Spend]] = {}  # (domain, tenant, binding)
        self._trails: dict[str, list[_Spend]] = {}  # domain -> spends in admission order

    def _domain(self, domain: str) -> DomainState:
        if self._closed:
            raise LedgerError("ledger is closed")
        st = self._domains.get(domain)
        if st is None:
            raise unknown_domain(domain)
        return st

    def create_budget(self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None) -> None:
        """Create the budget of a privacy domain (see :meth:`Ledger.create_budget`).

        Raises:
            DomainExists: the domain already has a budget.
            ValueError: naming a bad domain, tenant or quota.
        """
        op = CreateBudget.build(domain, budget, tenant_quotas)
        zero = np.zeros_like(ORDERS)
        zero.flags.writeable = False
        with self._lock:
            if self._closed:
                raise LedgerError("ledger is closed")
            if op.domain in self._domains:
                raise DomainExists(f"privacy domain {op.domain!r} already has a budget")
            tenants = {t: (q, zero, 0) for t, q in op.quotas.items()}
            self._domains[op.domain] = DomainState(Rule(op.budget), zero, 0, tenants)
            self._trails[op.domain] = []

    def budget_state(self, domain: str) -> BudgetState:
        """The domain's current state.

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._lock:
            return self._domain(domain).state(domain)

    def domains(self) -> list[str]:
        """All domains with a budget, sorted."""
        with self._lock:
            if self._closed:
                raise LedgerError("ledger is closed")
            return sorted(self._domains)

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
        """Check and append a charge with its receipt (see :meth:`Ledger.reserve`).

        Raises:
            UnknownDomain, ReplayMismatch, ReleaseMissing, BudgetExhausted, QuotaExhausted,
            ValueError (naming a malformed argument).
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
        with self._lock:
            st = self._domain(op.domain)
            known = self._by_key.get((op.tenant, op.request_id))
            if known is not None:
                op.check_replay(
                    binding_hash=known.binding, domain=known.domain, has_release=known.release is not None
                )
                assert known.release is not None and known.shape is not None
                release = decode_release(known.release, known.shape)
                return Reservation(known.spend_id, True, st.state(op.domain), known.receipt.as_replay(), release)
            (_curve_id, _text, eps_charged), state = st.charge(op.domain, op.tenant, op.charge, op.charge_key)
            spend_id, receipt = op.new_spend(eps_charged, state)
            spend = _Spend(
                spend_id, op.domain, op.tenant, op.request_id, op.binding_hash, op.profile_json, eps_charged,
                time.time(), receipt,
            )  # fmt: skip
            self._spends[spend_id] = self._by_key[(op.tenant, op.request_id)] = spend
            self._by_binding.setdefault((op.domain, op.tenant, op.binding_hash), []).append(spend)
            self._trails[op.domain].append(spend)
            return Reservation(spend_id, False, state, receipt)

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64]) -> None:
        """Attach the release to a reserved spend (idempotent; see :meth:`Ledger.store_release`).

        Raises:
            UnknownSpend: no spend has this id.
            ReleaseConflict: the spend already has a different release.
            ValueError: a malformed argument.
        """
        op = StoreRelease.build(spend_id, release)
        with self._lock:
            if self._closed:
                raise LedgerError("ledger is closed")
            spend = self._spends.get(op.spend_id)
            if spend is None:
                raise unknown_spend(op.spend_id)
            if op.needs_write(spend.release, spend.shape):
                spend.release, spend.shape = op.blob, op.shape

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], Receipt] | None:
        """The newest stored release of ``tenant`` for the same public input, or None.

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._lock:
            self._domain(domain)
            for spend in reversed(self._by_binding.get((domain, tenant, binding_hash), [])):
                if spend.release is not None and spend.shape is not None:
                    return spend.spend_id, decode_release(spend.release, spend.shape), spend.receipt
            return None

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        """The binding hash of the spend charged for (tenant, request id), or None."""
        with self._lock:
            if self._closed:
                raise LedgerError("ledger is closed")
            spend = self._by_key.get((tenant, request_id))
            return None if spend is None else spend.binding

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        """Spends of a domain in admission order.

        Raises:
            UnknownDomain: no budget for ``domain``.
            ValueError: ``limit`` not in [1, 100000] or ``offset`` < 0.
        """
        if not (isinstance(limit, int) and 1 <= limit <= 100_000):
            raise ValueError(f"limit must be an integer in [1, 100000]; found {limit!r}")
        if not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"offset must be an integer >= 0; found {offset!r}")
        with self._lock:
            self._domain(domain)
            rows = self._trails[domain][offset : offset + limit]
            return [
                Spend(
                    s.spend_id, s.domain, s.tenant, s.request_id, s.binding, json.loads(s.profile_json),
                    s.epsilon_charged, s.created_at, "reserved" if s.release is None else "released",
                )  # fmt: skip
                for s in rows
            ]

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        """tenant -> (epsilon quota, epsilon spent at the budget's delta).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        with self._lock:
            st = self._domain(domain)
            return {t: (q, st.rule.epsilon(curve)) for t, (q, curve, _n) in st.tenants.items()}

    def close(self) -> None:
        """Refuse every later call (idempotent); the contents are dropped with the object."""
        with self._lock:
            self._closed = True
