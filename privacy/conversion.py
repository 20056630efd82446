"""Conversion of an RDP curve to (epsilon, delta)-DP.

Source: B. Balle, G. Barthe, M. Gaboardi, J. Hsu, T. Sato, "Hypothesis Testing Interpretations
and Rényi Differential Privacy", AISTATS 2020, Theorem 21: a mechanism that is (a, R)-RDP is
(eps, delta)-DP with

    eps = R + log((a - 1) / a) - (log delta + log a) / (a - 1).

Solving the same inequality for delta at a fixed eps gives

    log delta = (a - 1) (R - eps + log(1 - 1/a)) - log a,

which is the bound dp-accounting's ``RdpAccountant.get_delta`` uses (its ``compute_delta``).
Both are minimised over the order grid. Results are clipped at eps >= 0 and delta <= 1.

A second, sound bound is also applied (as dp-accounting's ``compute_epsilon`` does): the Rényi
divergence is non-decreasing in the order (van Erven & Harremoës 2014, Thm 3), so KL <= R(a) for
every a > 1, and by the Bretagnolle-Huber inequality TV <= sqrt(1 - exp(-KL)); a mechanism whose
total variation is at most delta is (0, delta)-DP. Hence delta <= sqrt(1 - exp(-min_a R(a)))
gives epsilon = 0; in particular zero queries cost exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .orders import validate_orders

__all__ = ["EpsilonConverter", "EpsilonResult", "DeltaResult", "epsilon_from_rdp", "delta_from_rdp", "epsilon_per_order"]


@dataclass(frozen=True)
class EpsilonResult:
    """Epsilon at a given delta and the Rényi order that achieved it."""

    epsilon: float
    order: float


@dataclass(frozen=True)
class DeltaResult:
    """Delta at a given epsilon and the Rényi order that achieved it."""

    delta: float
    order: float


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1); found {delta!r}")
    return d


def _check_curve(rdp: npt.ArrayLike, orders: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a = validate_orders(orders)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != a.shape:
        raise ValueError(f"rdp has {r.size} values but there are {a.size} orders")
    if np.isnan(r).any() or (r < 0).any():
        raise ValueError(f"rdp values must be >= 0 and not NaN; found {r[np.isnan(r) | (r < 0)][0]!r}")
    return r, a


def epsilon_per_order(rdp: npt.ArrayLike, orders: npt.ArrayLike, delta: float) -> npt.NDArray[np.float64]:
    """Balle et al. 2020 Thm 21 evaluated at every order (``+inf`` where the RDP is infinite)."""
    d = _check_delta(delta)
    r, a = _check_curve(rdp, orders)
    with np.errstate(invalid="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(d) + np.log(a)) / (a - 1.0)
    return np.where(np.isinf(r), np.inf, eps)


class EpsilonConverter:
    """Thm 21 + the TV shortcut at a fixed (order grid, delta), with the grid constants
    precomputed: the hot path of admission (a ledger evaluates it inside every transaction).

    :meth:`epsilon` performs exactly the float operations of :func:`epsilon_from_rdp`, so both
    return bit-identical values; it skips input validation (callers pass curves they built).

    Args:
        orders: the Rényi orders (> 1).
        delta: target delta in (0, 1).
    """

    def __init__(self, orders: npt.ArrayLike, delta: float) -> None:
        self.delta = _check_delta(delta)
        self.orders = validate_orders(orders)
        self._log1p = np.log1p(-1.0 / self.orders)
        self._shift = (math.log(self.delta) + np.log(self.orders)) / (self.orders - 1.0)

    def result(self, curve: npt.NDArray[np.float64]) -> EpsilonResult:
        """Smallest epsilon over the grid and its order (see :func:`epsilon_from_rdp`)."""
        r_min = int(np.argmin(curve))
        if self.delta**2 + math.expm1(-float(curve[r_min])) >= 0.0:  # TV bound: (0, delta)-DP
            return EpsilonResult(epsilon=0.0, order=float(self.orders[r_min]))
        with np.errstate(invalid="ignore"):
            eps = curve + self._log1p - self._shift
        eps = np.where(np.isinf(curve), np.inf, eps)
        idx = int(np.argmin(eps))
        return EpsilonResult(epsilon=max(float(eps[idx]), 0.0), order=float(self.orders[idx]))

    def epsilon(self, curve: npt.NDArray[np.float64]) -> float:
        """Smallest epsilon over the grid."""
        return self.result(curve).epsilon


def epsilon_from_rdp(rdp: npt.ArrayLike, orders: npt.ArrayLike, delta: float) -> EpsilonResult:
    """Smallest epsilon over the orders for the given delta (Balle et al. 2020, Thm 21).

    Args:
        rdp: RDP value per order (>= 0, may be ``+inf``).
        orders: the Rényi orders (> 1).
        delta: target delta in (0, 1).

    Returns:
        ``EpsilonResult(epsilon, order)``; epsilon is ``+inf`` if every order is infinite (the
        reported order is then the first one), and never negative or NaN.

    Raises:
        ValueError: naming a bad delta, order or RDP value.
    """
    r, a = _check_curve(rdp, orders)
    return EpsilonConverter(a, delta).result(r)


def delta_from_rdp(rdp: npt.ArrayLike, orders: npt.ArrayLike, epsilon: float) -> DeltaResult:
    """Smallest delta over the orders for the given epsilon (inverse of Thm 21).

    Args:
        rdp: RDP value per order (>= 0, may be ``+inf``).
        orders: the Rényi orders (> 1).
        epsilon: target epsilon >= 0.

    Returns:
        ``DeltaResult(delta, order)`` with delta in [0, 1].

    Raises:
        ValueError: naming a bad epsilon, order or RDP value.
    """
    e = float(epsilon)
    if not (e >= 0.0) or math.isinf(e):
        raise ValueError(f"epsilon must be finite and >= 0; found {epsilon!r}")
    r, a = _check_curve(rdp, orders)
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (a - 1.0) * (r - e + np.log1p(-1.0 / a)) - np.log(a)
    log_delta = np.where(np.isinf(r), np.inf, log_delta)
    idx = int(np.argmin(log_delta))
    delta = min(1.0, math.exp(min(float(log_delta[idx]), 0.0)))
    r_min = int(np.argmin(r))
    tv = math.sqrt(-math.expm1(-float(r[r_min])))  # Bretagnolle-Huber bound, valid at any epsilon
    if tv < delta:
        return DeltaResult(delta=tv, order=float(a[r_min]))
    return DeltaResult(delta=delta, order=float(a[idx]))
