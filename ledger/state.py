"""The parts every store shares: the admission rule, a domain's running state (admission and the
charge applied in one place), receipt composition, a batch transaction's state, the errors' texts
and the encoding helpers.

Nothing here touches the database by itself; :class:`~dprdm.ledger.memory.MemoryLedger` and the
SQLite writer (:mod:`dprdm.ledger.writer`) decide admissions with the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import DEFAULT_ORDERS, Budget
from dprdm.privacy.accountant import curve_to_json

from .api import (
    BudgetExhausted,
    BudgetState,
    QuotaExhausted,
    Receipt,
    ReleaseConflict,
    ReleaseMissing,
    ReplayMismatch,
    UnknownDomain,
    UnknownSpend,
)

__all__ = [
    "ORDERS", "MAX_TEXT", "Rule", "DomainState", "SpendRow", "Tx", "curve_text", "curve_id_of", "short_repr",
    "check_text", "check_curve", "chunks", "decode_release", "new_spend_id", "compose_receipt", "unknown_domain",
    "unknown_spend", "replay_mismatch", "release_missing", "release_conflict",
]

ORDERS = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
"""The Rényi order grid every stored curve is over."""
MAX_TEXT = 1024
"""Longest domain, tenant, request id or binding accepted (characters)."""


def curve_text(curve: npt.NDArray[np.float64]) -> str:
    """``json.dumps(curve_to_json(curve))``, fast when every value is finite (the same text)."""
    if np.isfinite(curve).all():
        return json.dumps(curve.tolist())
    return json.dumps(curve_to_json(curve))


def curve_id_of(text: str) -> str:
    """Content address of a curve's JSON text."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def short_repr(value: object) -> str:
    """``repr(value)`` cut to 80 characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Rule:
    """A domain's admission rule: ``Budget.admits`` / ``Budget.spent_epsilon`` (O(#orders), with
    the grid constants precomputed in the privacy core), plus a cache of charge-curve facts.

    A PLD budget (``budget.accountant == "pld"``) admits while the number of queries read off the
    running curve stays <= T_max, and reports spent epsilons from its per-T table (both in
    ``Budget``); its plan is the one stored with the budget, loaded here, never recomputed.

    Args:
        budget: the domain's budget.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.epsilon_budget = float(budget.epsilon)
        self._charges: dict[bytes, tuple[str, str, float]] = {}
        if budget.accountant == "pld":
            _ = budget.pld  # the stored plan (computed here only for a budget built without one)

    def epsilon(self, curve: npt.NDArray[np.float64]) -> float:
        """Informational epsilon of ``curve`` at the budget's delta (``Budget.spent_epsilon``)."""
        return float(self.budget.spent_epsilon(curve))

    def admits(self, spent: npt.NDArray[np.float64], charge: npt.NDArray[np.float64]) -> bool:
        """``Budget.admits(spent, charge)``."""
        return bool(self.budget.admits(spent, charge))

    def admit(self, spent: npt.NDArray[np.float64], charge: npt.NDArray[np.float64]) -> tuple[bool, float | None]:
        """``(Budget.admits(spent, charge), epsilon of spent + charge if computed on the way)``."""
        if self.budget.filter_order is not None:
            return bool(self.budget.admits(spent, charge)), None
        if self.budget.accountant == "pld":  # T <= T_max, never the table's rounded-up epsilon
            admitted = bool(self.budget.admits(spent, charge))
            return admitted, self.epsilon(spent + charge) if admitted else None
        eps = self.epsilon(spent + charge)
        return eps <= self.epsilon_budget, eps

    def charge_info(self, charge: npt.NDArray[np.float64], key: bytes) -> tuple[str, str, float]:
        """(curve id, JSON text, informational epsilon) of a charge; epsilon 0 for the zero curve."""
        info = self._charges.get(key)
        if info is None:
            eps = 0.0 if not charge.any() else self.epsilon(charge)
            text = curve_text(charge)
            info = (curve_id_of(text), text, eps)
            if len(self._charges) >= 4096:
                self._charges.clear()
            self._charges[key] = info
        return info


@dataclass
class DomainState:
    """A domain's running state: its rule, spent curve, spend count and quota tenants
    (tenant -> (epsilon quota, spent curve, spends)). The SQLite writer copies it on first use in
    a transaction and marks what it must write back (``dirty``)."""

    rule: Rule
    spent: npt.NDArray[np.float64]
    spends: int
    tenants: dict[str, tuple[float, npt.NDArray[np.float64], int]]
    dirty: bool = False
    dirty_tenants: set[str] = field(default_factory=set)

    def copy(self) -> DomainState:
        """A copy whose updates do not touch this one (curves are replaced, never mutated)."""
        return DomainState(self.rule, self.spent, self.spends, dict(self.tenants))

    def state(self, domain: str, epsilon_spent: float | None = None) -> BudgetState:
        """A snapshot (``spent`` is read-only and replaced, never mutated, on each spend)."""
        eps = self.rule.epsilon(self.spent) if epsilon_spent is None else epsilon_spent
        return BudgetState(domain, self.rule.budget, self.spent, self.spends, eps)

    def charge(
        self, domain: str, tenant: str, charge: npt.NDArray[np.float64], key: bytes
    ) -> tuple[tuple[str, str, float], BudgetState]:
        """Admit ``charge`` (domain budget, then the tenant's quota) and apply it.

        Nothing changes when the charge is refused.

        Args:
            domain: the domain's name (errors and the snapshot).
            tenant: the charged tenant.
            charge: read-only charge curve over ``ORDERS``.
            key: ``charge.tobytes()`` (the rule's charge cache key).

        Returns:
            ``((curve id, curve JSON, epsilon of the charge), state right after the charge)``.

        Raises:
            BudgetExhausted: the domain budget does not admit the charge.
            QuotaExhausted: the tenant's quota does not admit it.
        """
        rule = self.rule
        admitted, eps_total = rule.admit(self.spent, charge)
        if not admitted:
            raise BudgetExhausted(domain, rule.epsilon(self.spent), rule.epsilon_budget)
        quota = self.tenants.get(tenant)
        if quota is not None and rule.epsilon(quota[1] + charge) > quota[0]:
            raise QuotaExhausted(domain, tenant, rule.epsilon(quota[1]), quota[0])
        info = rule.charge_info(charge, key)
        self.spent = self.spent + charge
        self.spent.flags.writeable = False
        self.spends += 1
        self.dirty = True
        if quota is not None:
            self.tenants[tenant] = (quota[0], quota[1] + charge, quota[2] + 1)
            self.dirty_tenants.add(tenant)
        return info, self.state(domain, eps_total)


def compose_receipt(
    *, spend_id: str, request_id: str, index: str, profile: str, epsilon_charged: float, state: BudgetState
) -> Receipt:
    """The receipt of a new spend: its charge and the domain's figures right after it."""
    budget = state.budget
    return Receipt(
        spend_id=spend_id,
        request_id=request_id,
        index=index,
        domain=state.domain,
        profile=profile,
        epsilon_charged=float(epsilon_charged),
        delta=float(budget.delta),
        epsilon_spent=float(state.epsilon_spent),
        epsilon_left=float(state.epsilon_left),
        epsilon_budget=float(budget.epsilon),
    )


def new_spend_id() -> str:
    """A fresh spend id: nanosecond time then 64 random bits, in hex (time-ordered: appends to
    its index)."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


@dataclass(eq=False)
class SpendRow:
    """What a batch knows of one spend (prefetched, or reserved earlier in the batch).

    ``receipt`` is the stored JSON text, or the :class:`Receipt` composed in this batch.
    """

    spend_id: str
    domain: str
    binding: str
    release: bytes | None
    shape: str | None
    receipt: str | Receipt | None


@dataclass
class Tx:
    """Working state of one batch transaction.

    ``known`` holds the spends of the batch's (tenant, request_id) keys and ``by_id`` those of its
    ``store_release`` ids (one :class:`SpendRow` per spend, shared by both maps), prefetched with
    one query each and updated as the batch proceeds, so decisions run in Python and the writes
    go out as a few multi-row statements at the end (each statement releases and re-takes the
    GIL: per-operation statements convoy behind the callers).
    """

    conn: sqlite3.Connection
    domains: dict[str, DomainState] = field(default_factory=dict)
    known: dict[tuple[str, str], SpendRow] = field(default_factory=dict)
    by_id: dict[str, SpendRow] = field(default_factory=dict)
    new_spends: list[tuple[Any, ...]] = field(default_factory=list)
    new_curves: dict[str, str] = field(default_factory=dict)
    new_releases: list[tuple[str, bytes, str]] = field(default_factory=list)


def unknown_domain(domain: str) -> UnknownDomain:
    """The error for a domain without a budget."""
    return UnknownDomain(f"no budget for privacy domain {domain!r}")


def unknown_spend(spend_id: str) -> UnknownSpend:
    """The error for a spend id no reservation returned."""
    return UnknownSpend(f"no spend with id {spend_id!r}")


def replay_mismatch(tenant: str, request_id: str) -> ReplayMismatch:
    """The error for a request id reused with another binding or domain."""
    return ReplayMismatch(f"request_id {request_id!r} of tenant {tenant!r} was used for another request")


def release_missing(tenant: str, request_id: str) -> ReleaseMissing:
    """The error for a replay of a spend whose release was never stored."""
    return ReleaseMissing(f"request_id {request_id!r} of tenant {tenant!r} has no stored release")


def release_conflict(spend_id: str) -> ReleaseConflict:
    """The error for a second, different release of a spend (names no private-derived value)."""
    return ReleaseConflict(f"spend {spend_id!r} already has a different release")


def check_text(name: str, value: object) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a non-empty string of <= MAX_TEXT chars."""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_TEXT} characters; found {short_repr(value)}")


def check_curve(charge_rdp: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A read-only float64 copy of a charge curve over ``ORDERS``; ValueError if malformed."""
    try:
        charge = np.array(charge_rdp, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"charge_rdp must be an array of floats; found {type(charge_rdp).__name__}") from exc
    if charge.shape != ORDERS.shape:
        raise ValueError(f"charge_rdp must have shape {ORDERS.shape} (DEFAULT_ORDERS); found {charge.shape}")
    if not (charge >= 0.0).all():  # False for NaN too
        raise ValueError("charge_rdp values must be >= 0 and not NaN")
    charge.flags.writeable = False
    return charge


def chunks(items: list[Any], size: int = 200) -> list[list[Any]]:
    """``items`` in consecutive lists of at most ``size`` (SQLite's bound-parameter limit)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_release(blob: bytes, shape: str) -> npt.NDArray[np.float64]:
    """A stored release: little-endian float64 bytes and their JSON shape."""
    return np.frombuffer(blob, dtype="<f8").reshape(json.loads(shape)).astype(np.float64)
