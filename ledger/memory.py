"""An in-memory :class:`~dprdm.ledger.api.Ledger`: the same semantics as the SQLite store, no
durability. For tests, benchmarks and throw-away servers; the conformance suite
(``tests/test_ledger_conformance.py``) runs the same behavioural tests against every store.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import DEFAULT_ORDERS, Budget

from .api import (
    BudgetExhausted,
    BudgetState,
    DomainExists,
    QuotaExhausted,
    ReleaseMissing,
    ReplayMismatch,
    Reservation,
    Spend,
    UnknownDomain,
)

__all__ = ["MemoryLedger"]


class MemoryLedger:
    """An in-memory ledger (same semantics as :class:`~dprdm.ledger.sqlite.SqliteLedger`, no durability)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, Budget] = {}
        self._spent: dict[str, npt.NDArray[np.float64]] = {}
        self._quotas: dict[str, dict[str, list[Any]]] = {}
        self._spends: dict[str, dict[str, Any]] = {}
        self._by_key: dict[tuple[str, str], str] = {}

    def create_budget(
        self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None
    ) -> None:
        with self._lock:
            if domain in self._budgets:
                raise DomainExists(domain)
            self._budgets[domain] = budget
            self._spent[domain] = np.zeros(len(DEFAULT_ORDERS))
            self._quotas[domain] = {
                t: [q, np.zeros(len(DEFAULT_ORDERS))] for t, q in (tenant_quotas or {}).items()
            }

    def _state(self, domain: str) -> BudgetState:
        if domain not in self._budgets:
            raise UnknownDomain(domain)
        b, spent = self._budgets[domain], self._spent[domain]
        n = sum(1 for s in self._spends.values() if s["domain"] == domain)
        return BudgetState(domain, b, spent.copy(), n, b.spent_epsilon(spent))

    def budget_state(self, domain: str) -> BudgetState:
        with self._lock:
            return self._state(domain)

    def domains(self) -> list[str]:
        with self._lock:
            return sorted(self._budgets)

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
        with self._lock:
            state = self._state(domain)
            sid = self._by_key.get((tenant, request_id))
            if sid is not None:
                s = self._spends[sid]
                if s["binding"] != binding_hash or s["domain"] != domain:
                    raise ReplayMismatch(request_id)
                if s["release"] is None:
                    raise ReleaseMissing(request_id)
                return Reservation(sid, True, state, s["release"].copy(), dict(s["receipt"]))
            b = self._budgets[domain]
            if not b.admits(self._spent[domain], charge_rdp):
                raise BudgetExhausted(domain, state.epsilon_spent, b.epsilon)
            quota = self._quotas[domain].get(tenant)
            if quota is not None and b.spent_epsilon(quota[1] + charge_rdp) > quota[0]:
                raise QuotaExhausted(domain, tenant, b.spent_epsilon(quota[1]), quota[0])
            sid = uuid.uuid4().hex
            self._spends[sid] = dict(
                domain=domain,
                tenant=tenant,
                request_id=request_id,
                binding=binding_hash,
                profile=dict(profile),
                charge=np.asarray(charge_rdp).copy(),
                release=None,
                receipt=None,
                epsilon=b.spent_epsilon(charge_rdp),
            )
            self._by_key[(tenant, request_id)] = sid
            self._spent[domain] = self._spent[domain] + charge_rdp
            if quota is not None:
                quota[1] = quota[1] + charge_rdp
            return Reservation(sid, False, self._state(domain))

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64], receipt: dict[str, Any]) -> None:
        with self._lock:
            s = self._spends[spend_id]
            if s["release"] is None:
                s["release"], s["receipt"] = np.asarray(release, dtype=np.float64).copy(), dict(receipt)

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], dict[str, Any]] | None:
        with self._lock:
            for sid, s in reversed(list(self._spends.items())):
                if (s["domain"], s["tenant"], s["binding"]) == (domain, tenant, binding_hash) and s[
                    "release"
                ] is not None:
                    return sid, s["release"].copy(), dict(s["receipt"])
            return None

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        with self._lock:
            sid = self._by_key.get((tenant, request_id))
            return None if sid is None else str(self._spends[sid]["binding"])

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        with self._lock:
            rows = [(sid, s) for sid, s in self._spends.items() if s["domain"] == domain]
            return [
                Spend(
                    sid,
                    domain,
                    s["tenant"],
                    s["request_id"],
                    s["binding"],
                    s["profile"],
                    s["epsilon"],
                    0.0,
                    "released" if s["release"] is not None else "reserved",
                )
                for sid, s in rows[offset : offset + limit]
            ]

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        with self._lock:
            b = self._budgets[domain]
            return {t: (q[0], b.spent_epsilon(q[1])) for t, q in self._quotas.get(domain, {}).items()}

    def close(self) -> None:
        pass
