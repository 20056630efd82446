"""Calibration: solve a profile parameter for a target (epsilon, delta) over T queries.

epsilon(T queries) = min_a [ T R(a; q, z) + log((a-1)/a) - (log delta + log a)/(a-1) ]
(Balle et al. 2020, Thm 21 over the shared grid) is non-decreasing in T and q and non-increasing
in the noise multiplier z = sigma k / 2 (the sampled-Gaussian RDP is monotone in both: Mironov,
Talwar & Zhang 2019, Section 3), so each solve is a bisection that keeps the feasible end of the
bracket: the returned value always meets the target (it errs on the private side).

Every solver takes ``hardened_dimension``: the embedding dimension d when the releases use the exact
discrete Gaussian (``discrete.hardened_rdp``, as private indexes are served), None for float noise.
The hardened curve is the continuous one at a widened sensitivity plus fractional-order bounds that
are monotone in z and q in the same way, so the same bisections apply.

Speed with discrete noise: one hardened curve over the whole grid costs ~1 s (its fractional
orders solve small linear programs), and a bisection needs ~40 of them. The feasibility test of a
bisection step therefore evaluates the hardened curve only at the :data:`_CANDIDATES` orders where
the (cheap, float) curve converts to the smallest epsilons. This is sound: epsilon is a minimum
over orders, so ``min over a subset <= target`` implies ``min over the grid <= target``, and the
returned value still meets the target under the full curve the server charges. It can only be
conservative (a step judged infeasible whose best discrete order lies outside the subset); the
hardened curve is the float one at a slightly widened sensitivity, whose best order is the same
to within a grid step or two, so in practice it is not.

``accountant = "pld"`` (float or discrete noise, :mod:`dprdm.privacy.pld`): each feasibility test is the
PLD epsilon on the coarse grid (:data:`~dprdm.privacy.pld.TABLE_DISCRETISATION`, an upper bound of
the fine one, so the returned value meets the target under every PLD number the project reports).
The PLD epsilon is non-decreasing in T and q and non-increasing in z as well (larger z or smaller
q is a post-processing of the pair: the Gaussian kernel of ``pld``'s item 1, and dropping each
kept record again with a coin), so the same bisections apply. For discrete noise the pair's
multiplier sigma / ((1 + eta(sigma)) Delta_w(k)) increases with sigma (eta decreases:
:mod:`dprdm.privacy.lattice_gdp` (v)) and with k; a sigma below one lattice step has no pair and
is judged infeasible.
"""

from __future__ import annotations

import math

import numpy as np

from .accountant import retrieval_rdp
from .conversion import epsilon_from_rdp, epsilon_per_order
from .mechanism import Profile
from .orders import DEFAULT_ORDERS
from .pld import TABLE_DISCRETISATION, epsilon_pld, pld_dominating_pair

__all__ = ["epsilon_for", "calibrate_sigma", "calibrate_k", "calibrate_q", "max_queries", "meets_target"]

_MAX_K = 1_000_000
_MAX_QUERIES = 10**15


def _check_accountant(accountant: str, hardened_dimension: int | None) -> None:
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"accountant must be rdp or pld; found {accountant!r}")


def _check_target(epsilon: float, delta: float, queries: int) -> None:
    if not (float(epsilon) > 0.0) or math.isinf(float(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0; found {epsilon!r}")
    if not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1); found {delta!r}")
    if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
        raise ValueError(f"queries must be an integer >= 1; found {queries!r}")


def epsilon_for(profile: Profile, *, queries: int, delta: float, hardened_dimension: int | None = None) -> float:
    """Epsilon of ``queries`` releases under ``profile`` at ``delta`` (min over the shared grid).

    ``hardened_dimension``: the embedding dimension when releases use the exact discrete
    Gaussian (``dprdm.privacy.discrete``), whose curve is slightly larger; None for float noise.
    """
    if not isinstance(queries, int) or isinstance(queries, bool) or queries < 0:
        raise ValueError(f"queries must be an integer >= 0; found {queries!r}")
    curve = retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension)
    if queries == 0 or not profile.retrieves:
        return 0.0
    return epsilon_from_rdp(curve * queries, DEFAULT_ORDERS, delta).epsilon


_CANDIDATES = 6
"""Orders at which a discrete-noise feasibility test evaluates the hardened curve."""


def meets_target(
    profile: Profile, *, queries: int, delta: float, epsilon: float, hardened_dimension: int | None,
    accountant: str = "rdp",
) -> bool:
    """Whether ``queries`` releases of ``profile`` cost at most ``epsilon`` (sound; see the module
    docstring for the discrete-noise shortcut and the PLD grid).

    Callers that round a calibrated value must re-check the rounded one: the discrete-noise bound
    (:mod:`dprdm.privacy.discrete_rdp`, item 5b) is not monotone in sigma or q (its certified linear
    program can jump by a few per cent between nearby multipliers), so "a larger sigma still meets
    the target" does not hold for it."""
    if accountant == "pld":
        if profile.retrieves and pld_dominating_pair(profile, hardened_dimension) is None:
            return False  # sigma below one lattice step: no pair (privacy.pld, item 4)
        return epsilon_pld(profile=profile, queries=queries, delta=delta, hardened_dimension=hardened_dimension,
                           discretisation=TABLE_DISCRETISATION) <= epsilon
    if hardened_dimension is None or not profile.retrieves:
        return epsilon_for(profile, queries=queries, delta=delta, hardened_dimension=hardened_dimension) <= epsilon
    orders = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    float_curve = retrieval_rdp(profile, orders=orders) * queries
    # epsilon_from_rdp order by order: Thm 21, clamped at 0, and 0 where the TV bound applies
    tv = delta**2 + np.expm1(-float_curve) >= 0.0
    per_order = np.where(tv, 0.0, np.maximum(epsilon_per_order(float_curve, orders, delta), 0.0))
    subset = np.sort(orders[np.argsort(per_order, kind="stable")[:_CANDIDATES]])
    curve = retrieval_rdp(profile, orders=subset, hardened_dimension=hardened_dimension) * queries
    return epsilon_from_rdp(curve, subset, delta).epsilon <= epsilon


def calibrate_sigma(
    *, epsilon: float, delta: float, queries: int, k: int, q: float, tol: float = 1e-6, hardened_dimension: int | None = None,
    accountant: str = "rdp",
) -> float:
    """Smallest sigma (to relative ``tol``) such that ``queries`` releases cost <= epsilon under
    ``accountant`` (``"rdp"`` or ``"pld"``).

    Raises:
        ValueError: naming a bad argument.
    """
    _check_target(epsilon, delta, queries)
    _check_accountant(accountant, hardened_dimension)

    def ok(s: float) -> bool:
        prof = Profile(k=k, q=q, sigma=s, lam=1.0)
        return meets_target(prof, queries=queries, delta=delta, epsilon=epsilon, hardened_dimension=hardened_dimension,
                      accountant=accountant)

    hi = 1.0
    while not ok(hi):
        hi *= 2.0
        if hi > 1e8:
            raise ValueError(f"no sigma <= 1e8 reaches epsilon={epsilon!r}")
    lo = hi / 2.0
    while ok(lo) and lo > 1e-12:
        hi, lo = lo, lo / 2.0
    while (hi - lo) > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def calibrate_k(
    *, epsilon: float, delta: float, queries: int, sigma: float, q: float, hardened_dimension: int | None = None,
    accountant: str = "rdp",
) -> int:
    """Smallest integer k such that ``queries`` releases cost <= epsilon (z = sigma k / 2) under
    ``accountant``.

    Raises:
        ValueError: naming a bad argument, or if no k <= 1e6 suffices (e.g. sigma = 0).
    """
    _check_target(epsilon, delta, queries)
    _check_accountant(accountant, hardened_dimension)
    Profile(k=1, q=q, sigma=sigma, lam=1.0)  # validates q and sigma

    def ok(k: int) -> bool:
        prof = Profile(k=k, q=q, sigma=sigma, lam=1.0)
        return meets_target(prof, queries=queries, delta=delta, epsilon=epsilon, hardened_dimension=hardened_dimension,
                      accountant=accountant)

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > _MAX_K:
            raise ValueError(f"no k <= {_MAX_K} reaches epsilon={epsilon!r} with sigma={sigma!r}")
    lo = hi // 2  # infeasible (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def calibrate_q(
    *, epsilon: float, delta: float, queries: int, sigma: float, k: int, tol: float = 1e-9, hardened_dimension: int | None = None,
    accountant: str = "rdp",
) -> float:
    """Largest q in (0, 1] (to absolute ``tol``, rounded down) such that the cost is <= epsilon
    under ``accountant``.

    Raises:
        ValueError: naming a bad argument, or if even q = tol exceeds the target.
    """
    _check_target(epsilon, delta, queries)
    _check_accountant(accountant, hardened_dimension)

    def ok(q: float) -> bool:
        prof = Profile(k=k, q=q, sigma=sigma, lam=1.0)
        return meets_target(prof, queries=queries, delta=delta, epsilon=epsilon, hardened_dimension=hardened_dimension,
                      accountant=accountant)

    if ok(1.0):
        return 1.0
    lo = 1.0
    while not ok(lo):
        lo /= 2.0
        if lo < tol:
            raise ValueError(f"no q >= {tol} reaches epsilon={epsilon!r} with sigma={sigma!r}, k={k!r}")
    hi = min(1.0, lo * 2.0)
    while hi - lo > tol * max(lo, 1e-300) and hi - lo > 1e-15:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def max_queries(
    *, epsilon: float, delta: float, profile: Profile, hardened_dimension: int | None = None
) -> int | None:
    """Largest T with epsilon(T) <= epsilon under the single-profile rule; None means unlimited
    (lambda = 0 costs nothing). ``hardened_dimension`` as in :func:`epsilon_for`.

    Raises:
        ValueError: naming a bad argument.
    """
    _check_target(epsilon, delta, 1)
    if not profile.retrieves:
        return None
    if epsilon_for(profile, queries=1, delta=delta, hardened_dimension=hardened_dimension) > epsilon:
        return 0
    lo, hi = 1, 2
    while epsilon_for(profile, queries=hi, delta=delta, hardened_dimension=hardened_dimension) <= epsilon:
        lo, hi = hi, hi * 2
        if hi > _MAX_QUERIES:
            return _MAX_QUERIES
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_for(profile, queries=mid, delta=delta, hardened_dimension=hardened_dimension) <= epsilon else (lo, mid)
    return lo
