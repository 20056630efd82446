"""RDP of the hardened release: the Poisson-subsampled exact discrete Gaussian on the lattice
(:mod:`dprdm.privacy.discrete`), bounded at every order of the grid.

Accounting (why the continuous sampled-Gaussian RDP still bounds the discrete release):
1. Sensitivity widening: ``round(v)`` moves each coordinate by at most 2^(k-1), so for
   neighbouring inputs ||round(v) - round(v')|| <= ||v - v'|| + 2^k sqrt(d) = 2/k_nn + 2^k sqrt(d)
   (k_nn neighbours). The shift mu = round(v) - round(v') is a LATTICE vector.
2. For a lattice shift, N_L(mu, s^2)(x) / N_L(0, s^2)(x) = exp((2<x,mu> - ||mu||^2)/(2 s^2)) exactly
   (same normalising constant), the same likelihood ratio as the continuous Gaussian.
3. The discrete Gaussian is sub-Gaussian with variance proxy s^2 (CKS20, Cor. 9 — per coordinate,
   and the coordinates are independent): E[exp(t <x, mu>)] <= exp(t^2 s^2 ||mu||^2 / 2).
4. At an integer order a, the sampled mixture's A_a = sum_i C(a,i) (1-q)^(a-i) q^i E[exp(i L)]
   has non-negative coefficients, and by 2.-3. E[exp(i L)] <= exp((i^2 - i)||mu||^2/(2 s^2)), the
   continuous term. So A_a(discrete) <= A_a(continuous at multiplier s / ||mu||_max).
5. Fractional orders a = n + theta (0 < theta < 1), q < 1; two valid bounds, the smaller is used:
   a. Chord: log A_a = log E[exp(a * ell)] is a cumulant generating function, convex in a (Hölder),
      so it lies below the chord of the integer values of 4 between n and n + 1 (log A_1 = 0).
      (A tangent-line bound on (1 + y)^theta, minimised over the tangent point, gives exactly this
      chord, so it is no improvement.)
   b. Exponential-sum majorant (our derivation). Write L = exp(ell) (the likelihood ratio of 2.) and
      psi(ell) = (1 - q + q L)^a - 1 - a q (L - 1) >= 0 (convexity of G -> G^a at G = 1). Because
      E_P[L^0] = E_P[L] = 1 EXACTLY for the discrete pair too (Q is a probability on the lattice),
      A_a = 1 + E_P[psi]. By 3., for every real c, E_P[L^c] <= m(c) = exp((c^2 - c) ||mu||^2 / (2 s^2));
      for c outside (0, 1) m(c) increases with ||mu||, so m at the widened sensitivity bounds every
      lattice shift (c in (0, 1) is never used: there the bound decreases with ||mu||). Hence for ANY
      h(ell) = w0 + w1 e^ell + sum_c w_c e^(c ell) with w_c >= 0 (c outside [0, 1]; w0, w1 of any sign)
      and h >= psi on the whole real line: A_a <= 1 + w0 + w1 + sum_c w_c m(c). A linear program
      (scipy HiGHS) proposes w on a grid of ell and of exponents c (step 1/8) minimising that bound;
      the program's output is only a candidate: :func:`_shortfall` CERTIFIES h >= psi everywhere:
      left of the grid psi <= psi(-inf) (psi decreases on ell < 0) and h >= w0 + min(w1, 0) e^lo +
      sum_{c<0} w_c e^(c lo); right of it e^(-a ell) psi <= (q + (1 - q) e^-ell)^a (non-increasing)
      and e^(-a ell) h is bounded below by its c >= a terms at hi and the negative parts of w0, w1;
      on each cell [l0, l1] psi <= chord + sup(psi'') (l1 - l0)^2 / 8 (each factor of psi'' is
      monotone, so the sup is bounded by endpoint values), the convex positive part of h lies above
      both endpoint tangents and a negative w1 e^ell above its chord, and the minimum of the
      resulting piecewise-linear lower bound of h - psi must exceed a rounding margin. A certified
      shortfall is added to w0 (costing exactly that) and re-certified; anything uncertified falls
      back to the chord. The value is >= the continuous A_a (the Gaussian meets every constraint with
      equality) and, at the SPEC §4 reference profile, within 1 % of it at orders 2.25-2.75.
   q = 1: E[L^a] <= m(a) holds for every real a >= 1, so the curve is a / (2 z^2) at every order.
Hence :func:`hardened_rdp` = the integer-order curve at the widened sensitivity, 5a/5b in between;
tests check it against the continuous value (equal at integer orders, never below it) and the exact
discrete A_a computed by summation in mpmath (d = 1, small lattice).
Not covered here (as before): the reverse divergence D_a(P || (1-q)P + qQ) of the add/remove relation,
which MTZ 2019 (Thm 5) bound by the forward one for the continuous Gaussian only.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from .lattice import DEFAULT_LATTICE_EXPONENT, widened_sensitivity
from .mechanism import Profile
from .orders import validate_orders
from .rdp import log_a_integer, rdp_subsampled_gaussian

__all__ = ["hardened_rdp"]


def _integer_log_a(q: float, z: float, order: int) -> float:
    if order == 1:
        return 0.0
    if q == 1.0:
        return order * (order - 1) / (2.0 * z * z)
    return log_a_integer(q, z, order)


@lru_cache(maxsize=8192)
def _hardened_log_a(q: float, z: float, a: float) -> float:
    """Upper bound on log A_a of the discrete release at widened multiplier z (module docstring, 4-5)."""
    if q == 1.0:  # item 4 with one term: E[L^a] <= exp((a^2 - a) / (2 z^2)) for every real a >= 1
        return a * (a - 1.0) / (2.0 * z * z)
    lo = math.floor(a)
    if lo == a:
        return _integer_log_a(q, z, lo)
    chord = (lo + 1 - a) * _integer_log_a(q, z, lo) + (a - lo) * _integer_log_a(q, z, lo + 1)
    cont = float(rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=[a])[0]) * (a - 1.0)
    if not chord > cont * (1.0 + 1e-3):  # the chord is already within 0.1 % of the continuous value
        return chord
    return min(chord, _majorant_log_a(q, z, a))


def hardened_rdp(
    profile: Profile, dimension: int, orders: npt.ArrayLike, exponent: int = DEFAULT_LATTICE_EXPONENT
) -> npt.NDArray[np.float64]:
    """RDP curve of one hardened (discrete-Gaussian) release; see the module docstring, items 1-5.

    Args:
        profile: the retrieval profile (lambda = 0 costs 0; sigma = 0 is +inf).
        dimension: embedding dimension d.
        orders: Rényi orders > 1 (any grid).
        exponent: lattice exponent k (step 2^k).

    Returns:
        Per-order RDP upper bound for the discrete release: at integer orders the continuous value at
        the widened sensitivity (item 4), at fractional orders the smaller of the chord (item 5a) and
        the certified exponential-sum majorant (item 5b).
    """
    a_arr = validate_orders(orders)
    if not profile.retrieves:
        return np.zeros_like(a_arr)
    if profile.sigma == 0.0:
        return np.full_like(a_arr, math.inf)
    z = profile.sigma / widened_sensitivity(profile.sensitivity, dimension, exponent)
    q = float(profile.q)
    return np.array([_hardened_log_a(q, z, float(a)) / (float(a) - 1.0) for a in a_arr], dtype=np.float64)


# ---------------------------------------------------------------- fractional orders (item 5b)

_LP_POINTS = 400  # LP grid points (cells of the rigorous check)
_LP_STEP_C = 0.125  # spacing of the real exponents c of the majorant
_LP_MAX_CELL = 0.15  # widest cell the check accepts (wider: the chord is used)
_LP_MARGIN = 5e-4  # relative margin the LP keeps above psi at its points
_CHECK_SPLIT = 8  # the certificate's cells: each LP cell split in this many


def _log_g(q: float, lg: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log G = log(1 - q + q e^l)."""
    return np.logaddexp(math.log1p(-q), math.log(q) + lg)


def _psi_up(q: float, a: float, lg: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Upper bound on psi(l) = G^a - 1 - a q (e^l - 1) >= 0 (computed value plus its rounding error)."""
    y = q * np.expm1(lg)
    ga1 = np.expm1(a * np.log1p(y))
    psi = ga1 - a * y
    return np.maximum(psi, 0.0) + 1e-14 * (np.abs(ga1) + np.abs(a * y)) + 1e-300


def _psi2_sup(q: float, a: float, l0: npt.NDArray[np.float64], l1: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Upper bound on sup psi''(l) over each cell [l0, l1] (every factor is monotone in l)."""
    g0, g1 = np.exp(_log_g(q, l0)), np.exp(_log_g(q, l1))
    first = a * (a - 1.0) * np.maximum(g0 ** (a - 2.0), g1 ** (a - 2.0)) * q * q * np.exp(2.0 * l1)
    second = a * q * np.exp(l1) * np.maximum(g1 ** (a - 1.0) - 1.0, 0.0)
    out: npt.NDArray[np.float64] = (first + second) * (1.0 + 1e-12)
    return out


def _majorant_log_a(q: float, z: float, a: float) -> float:
    """Upper bound on log A_a(discrete) from an exponential-sum majorant of psi (module docstring, 5b).

    Returns +inf when no majorant is found or certified (the caller then keeps the chord)."""
    v = 1.0 / (z * z)
    l_star = math.log1p(-q) - math.log(q)
    lo = min(-0.5 * v - 7.0 * math.sqrt(v), -l_star) - 2.0
    hi = max(-0.5 * v + (a + 2.0) * v + 7.0 * math.sqrt(v), l_star) + 2.0
    if (hi - lo) / (_LP_POINTS - 1) > _LP_MAX_CELL or (a + 2.0) * max(hi, -lo) > 600.0:
        return math.inf
    lg = np.linspace(lo, hi, _LP_POINTS)
    pos_c = np.unique(np.concatenate([np.arange(-2.0, 0.0, _LP_STEP_C), np.arange(1.0 + _LP_STEP_C, a + 2.0, _LP_STEP_C), [a]]))
    pos_c = pos_c[(pos_c < 0.0) | (pos_c > 1.0)]
    log_m = (pos_c * pos_c - pos_c) * v / 2.0  # log of the MGF bound at each exponent
    psi = _psi_up(q, a, lg)
    scale = psi * (1.0 + _LP_MARGIN) + 1e-13
    # Columns: u_c = w_c m(c) >= 0, then w0+, w0-, w1+, w1- (E[L^0] = E[L^1] = 1 exactly).
    log_cols = np.concatenate([lg[:, None] * pos_c[None, :] - log_m[None, :], np.zeros((lg.size, 2)), np.repeat(lg[:, None], 2, 1)], axis=1)
    mat = np.exp(np.clip(log_cols - np.log(scale)[:, None], -25.0, 25.0))
    mat[:, -3] *= -1.0
    mat[:, -1] *= -1.0
    psi_left = (1.0 - q) ** a - 1.0 + a * q
    left = np.concatenate([np.exp(np.clip(lo * pos_c - log_m, -25.0, 25.0)) * (pos_c < 0), [1.0, -1.0, 0.0, -math.exp(lo)]])
    right_rhs = (q + (1.0 - q) * math.exp(-hi)) ** a
    right = np.concatenate([np.exp(np.clip((pos_c - a) * hi - log_m, -25.0, 25.0)) * (pos_c >= a), [0.0, -math.exp(-a * hi), 0.0, -math.exp((1.0 - a) * hi)]])
    a_ub = -np.vstack([mat, left[None, :] / (psi_left * 1.001 + 1e-13), right[None, :] / (right_rhs * 1.001)])
    row_max = np.max(np.abs(a_ub), axis=1)
    a_ub /= row_max[:, None]  # rows scaled to max 1; tiny entries dropped (a candidate only: the
    a_ub[np.abs(a_ub) < 1e-10] = 0.0  # certificate below is what counts)
    cost = np.concatenate([np.ones(pos_c.size), [1.0, -1.0, 1.0, -1.0]])
    from scipy.optimize import linprog  # lazy: ~0.26 s at import, and curves usually come from the disk cache

    try:
        res = linprog(cost, A_ub=a_ub, b_ub=-1.0 / row_max, bounds=(0.0, None), method="highs")
    except ValueError:
        return math.inf
    if res.status != 0:
        return math.inf
    x = np.maximum(np.asarray(res.x, dtype=np.float64), 0.0)
    u, w0, w1 = x[: pos_c.size], float(x[-4] - x[-3]), float(x[-2] - x[-1])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_w = np.log(u) - log_m
        fine = np.linspace(lo, hi, (_LP_POINTS - 1) * _CHECK_SPLIT + 1)
        for _ in range(3):  # raise w0 by the certified shortfall (it costs exactly that much)
            need = _shortfall(q, a, fine, pos_c, log_w, w0, w1, psi_left, right_rhs)
            if need == 0.0:
                total = float(np.sum(u)) + w0 + w1
                err = 1e-14 * (float(np.sum(u)) + abs(w0) + abs(w1))
                return math.log1p(max(total + err, 0.0))
            if not need < math.inf:
                return math.inf
            w0 += need * 1.01 + 1e-300
    return math.inf


def _shortfall(
    q: float, a: float, lg: npt.NDArray[np.float64], c: npt.NDArray[np.float64], log_w: npt.NDArray[np.float64],
    w0: float, w1: float, psi_left: float, right_rhs: float,
) -> float:
    """0.0 iff h(l) = w0 + w1 e^l + sum_c w_c e^(c l) >= psi(l) is certified for EVERY real l (module
    docstring, 5b); otherwise an amount that, added to w0, may certify it (+inf: it cannot)."""
    lo, hi = float(lg[0]), float(lg[-1])
    # Left tail l <= lo: psi <= psi(-inf) (psi decreases on l < 0); h >= w0 + min(w1, 0) e^lo + sum_{c<0} w_c e^(c lo).
    h_left = w0 + min(w1, 0.0) * math.exp(lo) + float(np.sum(np.exp(log_w + c * lo) * (c < 0)))
    need_left = psi_left * (1.0 + 1e-9) + 1e-15 - h_left
    # Right tail l >= hi: e^(-a l) psi <= (q + (1 - q) e^(-l))^a, non-increasing; e^(-a l) h is bounded below by
    # its terms with c >= a (non-decreasing) and the negative parts of w0, w1 (their magnitude decreases).
    h_right = float(np.sum(np.exp(log_w + (c - a) * hi) * (c >= a))) + min(w0, 0.0) * math.exp(-a * hi)
    h_right += min(w1, 0.0) * math.exp((1.0 - a) * hi)
    if not h_right >= right_rhs * (1.0 + 1e-9):
        return math.inf
    # Cells [l0, l1]: psi <= its chord + sup(psi'') (l1 - l0)^2 / 8; the positive part of h (convex) is above both
    # endpoint tangents; a negative w1 e^l (concave) is above its chord. Check the minimum of the piecewise-linear bound.
    l0, l1 = lg[:-1], lg[1:]
    dl = l1 - l0
    pos = log_w[None, :]
    t0 = np.exp(pos + c[None, :] * l0[:, None])
    t1 = np.exp(pos + c[None, :] * l1[:, None])
    h0, h1 = t0.sum(1), t1.sum(1)
    d0, d1 = (t0 * c).sum(1), (t1 * c).sum(1)
    w1p, w1n = max(w1, 0.0), min(w1, 0.0)
    h0 = h0 + w1p * np.exp(l0)
    h1 = h1 + w1p * np.exp(l1)
    d0 = d0 + w1p * np.exp(l0)
    d1 = d1 + w1p * np.exp(l1)
    p0, p1 = _psi_up(q, a, l0), _psi_up(q, a, l1)
    err = _psi2_sup(q, a, l0, l1) * dl * dl / 8.0
    lin0 = w0 + w1n * np.exp(l0) - p0 - err  # the linear part at l0 and at l1
    lin1 = w0 + w1n * np.exp(l1) - p1 - err
    f1_0, f1_1 = h0 + lin0, h0 + d0 * dl + lin1  # tangent at l0 plus the linear part
    f2_0, f2_1 = h1 - d1 * dl + lin0, h1 + lin1  # tangent at l1 plus the linear part
    low = np.minimum(np.maximum(f1_0, f2_0), np.maximum(f1_1, f2_1))
    s1, s2 = (f1_1 - f1_0) / dl, (f2_1 - f2_0) / dl
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = (f2_0 - f1_0) / (s1 - s2)
    inside = np.isfinite(tx) & (tx > 0.0) & (tx < dl)
    low = np.where(inside, np.minimum(low, f1_0 + s1 * np.where(inside, tx, 0.0)), low)
    mag = 1e-12 * (h0 + h1 + abs(w0) + abs(w1n) * np.exp(l1) + p0 + p1)
    need = max(float(np.max(mag - low)), need_left)
    if math.isnan(need):
        return math.inf
    return need if need > 0.0 else 0.0
