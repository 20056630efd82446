"""The writer's working parts of :mod:`dprdm.ledger.sqlite`: the admission rule, a domain's running
state, queued operations and a batch transaction's state, plus the encoding helpers they share.

Split from ``ledger.py`` to keep it readable; nothing here touches the database by itself.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import DEFAULT_ORDERS, Budget
from dprdm.privacy.accountant import curve_to_json

from .api import BudgetState

__all__ = [
    "ORDERS", "MAX_TEXT", "Rule", "DomainState", "Op", "Tx", "curve_text", "curve_id_of", "short_repr",
    "check_text", "check_curve", "chunks", "decode_release",
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

    Args:
        budget: the domain's budget.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.epsilon_budget = float(budget.epsilon)
        self._charges: dict[bytes, tuple[str, str, float]] = {}

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
    """A domain's running state inside the writer (copied on first use in a transaction)."""

    rule: Rule
    spent: npt.NDArray[np.float64]
    spends: int
    tenants: dict[str, tuple[float, npt.NDArray[np.float64], int]]
    dirty: bool = False
    dirty_tenants: set[str] = field(default_factory=set)

    def copy(self) -> DomainState:
        return DomainState(self.rule, self.spent, self.spends, dict(self.tenants))

    def state(self, domain: str, epsilon_spent: float | None = None) -> BudgetState:
        """A snapshot (``spent`` is read-only and replaced, never mutated, on each spend)."""
        eps = self.rule.epsilon(self.spent) if epsilon_spent is None else epsilon_spent
        return BudgetState(domain, self.rule.budget, self.spent, self.spends, eps)


@dataclass
class Op:
    """One queued write, ``kind`` in {"create", "reserve", "store"}; the caller waits on ``done``."""

    kind: str
    args: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None
    done: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Tx:
    """Working state of one batch transaction.

    ``known`` holds the spends of the batch's (tenant, request_id) keys and ``by_id`` those of its
    ``store_release`` ids, prefetched with one query each and updated as the batch proceeds, so
    decisions run in Python and the writes go out as a few multi-row statements at the end (each
    statement releases and re-takes the GIL: per-operation statements convoy behind the callers).
    """

    conn: sqlite3.Connection
    domains: dict[str, DomainState] = field(default_factory=dict)
    known: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    by_id: dict[str, list[Any]] = field(default_factory=dict)
    new_spends: list[tuple[Any, ...]] = field(default_factory=list)
    new_curves: dict[str, str] = field(default_factory=dict)
    new_releases: list[tuple[str, bytes, str, str]] = field(default_factory=list)


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
