"""Floating-point-safe noise: the exact discrete Gaussian on the lattice 2^k Z^d (SPEC §6).

Why: a float Gaussian ``v + rng.normal(...)`` leaks through its low-order bits (Mironov 2012,
"On significance of the least significant bits for differential privacy"; Jin et al. 2022, "Are
we there yet? Timing and floating-point attacks on differential privacy systems"). The hardened
release rounds the aggregate v to the lattice 2^k Z^d and adds noise drawn EXACTLY from the
discrete Gaussian N_{2^k Z}(0, sigma^2) per coordinate (C. Canonne, G. Kamath, T. Steinke, "The
Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1-3), so every released
coordinate of the noisy aggregate is an exact multiple of 2^k and its distribution is exactly the
one analysed.

Samplers (all exact, integer arithmetic):
* :class:`~dprdm.privacy.fast_discrete.FastExactSampler` (production): CKS20 vectorised over numpy
  arrays, ~30x OpenDP's throughput (issue 12 item 11; ``benchmarks/noise.py``).
* :class:`OpenDPSampler`: OpenDP's ``make_gaussian`` on a vector of f64 with the L2
  distance, which samples on Z * 2^k from OpenDP's CSPRNG; applied to the zero vector it returns
  pure lattice noise.
* :class:`ExactSampler`: our CKS20 implementation driven by the bits of an explicit numpy
  ``Generator`` (tests inject a seeded one; production would pass a ChaCha20 generator).

Noise is data-independent, so it is pre-generated in a background :class:`NoisePool`: the
sampler's run time (which depends on the noise's size) never sits on the request path.

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

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import linprog

from .mechanism import Profile, clamp_unit
from .orders import validate_orders
from .rdp import log_a_integer, rdp_subsampled_gaussian

__all__ = [
    "DEFAULT_LATTICE_EXPONENT",
    "round_to_lattice",
    "widened_sensitivity",
    "hardened_rdp",
    "LatticeSampler",
    "ExactSampler",
    "OpenDPSampler",
    "NoisePool",
    "release_hardened",
]

_log = logging.getLogger("dprdm.privacy")

DEFAULT_LATTICE_EXPONENT = -20
"""Lattice step 2^-20 ~ 9.5e-7: far below the noise (sigma >= 1e-3) and the widening 2^k sqrt(d)
is ~2e-5 at d = 512, i.e. ~1e-4 of the sensitivity 2/k for k = 16."""


def round_to_lattice(v: npt.ArrayLike, exponent: int = DEFAULT_LATTICE_EXPONENT) -> npt.NDArray[np.float64]:
    """Round each coordinate to the nearest multiple of 2^exponent (exact in float64 for |v| < 2^30)."""
    scale = math.ldexp(1.0, -exponent)
    out: npt.NDArray[np.float64] = np.round(np.asarray(v, dtype=np.float64) * scale) / scale
    return out


def widened_sensitivity(sensitivity: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> float:
    """L2 sensitivity after rounding both neighbours to the lattice: Delta + 2^k sqrt(d)."""
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1; found {dimension!r}")
    return sensitivity + math.ldexp(1.0, exponent) * math.sqrt(dimension)


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


class LatticeSampler(Protocol):
    """Draws exact discrete Gaussian noise on 2^exponent Z^d."""

    def sample(self, sigma: float, dimension: int, exponent: int) -> npt.NDArray[np.float64]:
        """One noise vector: each coordinate is an exact multiple of 2^exponent."""
        ...


class ExactSampler:
    """CKS20 Algorithms 1-3 in exact rational arithmetic, driven by an explicit generator's bits.

    Args:
        rng: source of uniform bits (seeded in tests; a CSPRNG generator otherwise).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def _uniform_below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection on whole bytes (exact for any size)."""
        nbytes = (n.bit_length() + 7) // 8 + 1
        limit = (256**nbytes // n) * n
        while True:
            x = int.from_bytes(self._rng.bytes(nbytes), "little")
            if x < limit:
                return x % n

    def _bernoulli(self, p: Fraction) -> bool:
        return self._uniform_below(p.denominator) < p.numerator

    def _bernoulli_exp_le1(self, gamma: Fraction) -> bool:
        """Bernoulli(exp(-gamma)) for gamma in [0, 1] (CKS20, Algorithm 1)."""
        k = 1
        while self._bernoulli(gamma / k):
            k += 1
        return k % 2 == 1

    def _bernoulli_exp(self, gamma: Fraction) -> bool:
        """Bernoulli(exp(-gamma)) for gamma >= 0 (CKS20, Algorithm 1, general case)."""
        while gamma > 1:
            if not self._bernoulli_exp_le1(Fraction(1)):
                return False
            gamma -= 1
        return self._bernoulli_exp_le1(gamma)

    def _discrete_laplace(self, t: int) -> int:
        """Discrete Laplace with scale t, P(x) ∝ exp(-|x|/t) (CKS20, Algorithm 2)."""
        while True:
            u = self._uniform_below(t)
            if not self._bernoulli_exp(Fraction(u, t)):
                continue
            v = 0
            while self._bernoulli_exp(Fraction(1)):
                v += 1
            x = u + t * v
            negative = self._uniform_below(2) == 1
            if negative and x == 0:
                continue
            return -x if negative else x

    def sample_integer(self, sigma2: Fraction) -> int:
        """One draw of N_Z(0, sigma2) (CKS20, Algorithm 3)."""
        t = math.floor(math.sqrt(sigma2)) + 1
        while True:
            y = self._discrete_laplace(t)
            gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
            if self._bernoulli_exp(gamma):
                return y

    def sample(self, sigma: float, dimension: int, exponent: int) -> npt.NDArray[np.float64]:
        """Noise on 2^exponent Z^d with standard-deviation parameter ``sigma``."""
        sigma_lattice = Fraction(sigma) / Fraction(2) ** exponent
        sigma2 = sigma_lattice * sigma_lattice
        ints = [self.sample_integer(sigma2) for _ in range(dimension)]
        return np.ldexp(np.array(ints, dtype=np.float64), exponent)


class OpenDPSampler:
    """OpenDP's exact discrete Gaussian (``make_gaussian`` on f64 vectors, L2 distance, on Z * 2^k).

    Its randomness is OpenDP's own CSPRNG; it cannot be seeded (so it is never used in seeded tests).
    """

    def __init__(self) -> None:
        try:
            import opendp.prelude as dp  # optional dependency (extra 'server'), imported only when used
        except ModuleNotFoundError as exc:  # still an ImportError: the server falls back to ExactSampler
            raise ModuleNotFoundError(
                f"OpenDPSampler needs opendp: pip install 'dprdm[server]' (missing module {exc.name})",
                name=exc.name,
            ) from None

        dp.enable_features("contrib")
        self._dp = dp
        self._cache: dict[tuple[float, int, int], Callable[[list[float]], list[float]]] = {}

    def sample(self, sigma: float, dimension: int, exponent: int) -> npt.NDArray[np.float64]:
        """Noise on 2^exponent Z^d: the measurement applied to the zero vector."""
        key = (float(sigma), int(dimension), int(exponent))
        meas = self._cache.get(key)
        if meas is None:
            dp = self._dp
            space = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=dimension), dp.l2_distance(T=float)
            meas = dp.m.make_gaussian(*space, scale=float(sigma), k=int(exponent))
            self._cache[key] = meas
        return np.asarray(meas([0.0] * dimension), dtype=np.float64)


class NoisePool:
    """Pre-generates lattice noise vectors off the request path: one bounded FIFO per key.

    Request path: :meth:`take_nowait` pops the OLDEST ready vector or returns None when the key's
    queue is empty (the server then refuses with ``UNAVAILABLE`` + RetryInfo BEFORE any charge).
    It never samples, so the time a request takes does not depend on the noise it releases (the
    exact samplers' run time does depend on the noise: number of rejections, size of the draw).

    Refill: ``threads`` daemon threads sample whole batches (``sampler.sample_batch`` when the
    sampler has it, e.g. :class:`~dprdm.privacy.fast_discrete.FastExactSampler`) and publish each
    batch at once, so the moment vectors become available depends on the run time of a whole
    batch rather than of the one vector a waiting client gets. Discarding or reordering vectors
    by position (never by value) keeps them iid.

    Args:
        sampler: the exact lattice sampler (shared by the threads; see its thread-safety note).
        capacity: vectors kept ready per (sigma, dimension, exponent).
        batch: vectors sampled and published together (default ``min(capacity, 64)``).
        threads: refill threads.

    Raises:
        ValueError: capacity, batch or threads < 1.
    """

    def __init__(
        self, sampler: LatticeSampler, capacity: int = 64, *, batch: int | None = None, threads: int = 1
    ) -> None:
        batch = min(capacity, 64) if batch is None else batch
        for name, value in (("capacity", capacity), ("batch", batch), ("threads", threads)):
            if value < 1:
                raise ValueError(f"NoisePool {name} must be >= 1; found {value!r}")
        self._sampler, self._capacity, self._batch = sampler, capacity, min(batch, capacity)
        self._queues: dict[tuple[float, int, int], collections.deque[npt.NDArray[np.float64]]] = {}
        self._inflight: dict[tuple[float, int, int], int] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, name=f"dprdm-noise-pool-{i}", daemon=True) for i in range(threads)
        ]
        for th in self._threads:
            th.start()

    @property
    def capacity(self) -> int:
        """Vectors kept ready per key."""
        return self._capacity

    def _sample(self, key: tuple[float, int, int], count: int) -> npt.NDArray[np.float64]:
        sigma, dim, exp = key
        batch_fn = getattr(self._sampler, "sample_batch", None)
        if batch_fn is not None:
            out: npt.NDArray[np.float64] = np.asarray(batch_fn(sigma, dim, count, exp), dtype=np.float64)
            return out
        return np.stack([self._sampler.sample(sigma, dim, exp) for _ in range(count)])

    def _claim(self) -> tuple[tuple[float, int, int], int] | None:
        """Under the lock: the key with the most room, and how many vectors to sample for it."""
        best: tuple[tuple[float, int, int], int] | None = None
        for key, q in self._queues.items():
            room = self._capacity - len(q) - self._inflight[key]
            if room > 0 and (best is None or room > best[1]):
                best = (key, room)
        if best is None:
            return None
        key, room = best
        count = min(room, self._batch)
        self._inflight[key] += count
        return key, count

    def _run(self) -> None:
        while True:
            with self._cond:
                claim = self._claim()
                while claim is None and not self._stop:
                    self._cond.wait()
                    claim = self._claim()
                if self._stop:
                    return
            assert claim is not None
            key, count = claim
            try:
                vectors = self._sample(key, count)
            except Exception:  # a sampler failure must not kill the pool silently
                _log.exception("noise pool: sampling failed for dimension %d", key[1])
                vectors = np.empty((0, key[1]))
                time.sleep(1.0)
            with self._cond:
                self._inflight[key] -= count
                self._queues[key].extend(vectors)  # the whole batch at once
                self._cond.notify_all()

    def prepare(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT, *, fill: bool = False
    ) -> None:
        """Register a key and start filling its queue (call at start-up for every served profile).

        The first batch is sampled in the caller, so a sampler that refuses the parameters raises
        here rather than in a background thread.

        Args:
            fill: also wait until the queue is full (start-up: serve with a full pool).

        Raises:
            ValueError: from the sampler (e.g. sigma / 2^exponent outside its supported range).
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            known = key in self._queues
        if not known:
            first = self._sample(key, self._batch)
            with self._cond:
                if key not in self._queues:
                    self._queues[key] = collections.deque(first)
                    self._inflight[key] = 0
                self._cond.notify_all()
        if fill:
            self.wait_ready(sigma, dimension, exponent, count=self._capacity)

    def ready(self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> int:
        """Vectors ready for a key (0 if the key is not prepared)."""
        with self._cond:
            q = self._queues.get((float(sigma), int(dimension), int(exponent)))
            return 0 if q is None else len(q)

    def wait_ready(
        self,
        sigma: float,
        dimension: int,
        exponent: int = DEFAULT_LATTICE_EXPONENT,
        *,
        count: int = 1,
        timeout: float | None = None,
    ) -> bool:
        """Block until ``count`` vectors are ready for a prepared key; False on timeout."""
        key = (float(sigma), int(dimension), int(exponent))
        count = min(count, self._capacity)
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queues[key]) >= count or self._stop, timeout)

    def take_nowait(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT
    ) -> npt.NDArray[np.float64] | None:
        """Pop the oldest ready vector, or None if none is ready (never samples). Used once.

        Raises:
            KeyError: the key was never prepared (a configuration error, not a load condition).
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            q = self._queues.get(key)
            if q is None:
                raise KeyError(f"no noise pool for sigma={sigma!r}, dimension={dimension!r}, exponent={exponent!r}")
            vec = q.popleft() if q else None
            self._cond.notify_all()
            return vec

    def put_back(
        self, vec: npt.NDArray[np.float64], sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT
    ) -> None:
        """Return an UNUSED vector (taken, then its query was refused before the charge) to the
        front of its queue; dropped if the queue is full. The caller's decision must not depend
        on the vector's value (it depends on public admission only), so the vectors stay iid.
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            q = self._queues.get(key)
            if q is not None and len(q) < self._capacity:  # may briefly exceed it by a refill batch
                q.appendleft(vec)
                self._cond.notify_all()

    def take(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT, *, timeout: float | None = None
    ) -> npt.NDArray[np.float64]:
        """Pop one vector, waiting for the refill if needed (tests and offline tools; the server
        uses :meth:`take_nowait`). Prepares the key on first use.

        Raises:
            TimeoutError: nothing became ready within ``timeout`` seconds.
        """
        key = (float(sigma), int(dimension), int(exponent))
        self.prepare(*key)
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._queues[key]) or self._stop, timeout) or self._stop:
                raise TimeoutError("no noise vector became ready")
            vec = self._queues[key].popleft()
            self._cond.notify_all()
            return vec

    def close(self) -> None:
        """Stop the refill threads (a batch being sampled finishes first)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for th in self._threads:
            th.join(timeout=5)


def release_hardened(
    profile: Profile,
    *,
    query: npt.ArrayLike,
    selected: npt.ArrayLike,
    noise: npt.ArrayLike,
    exponent: int = DEFAULT_LATTICE_EXPONENT,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The hardened release: lattice-rounded mean + exact lattice noise, then the public mix.

    Args:
        profile: retrieval profile (lambda > 0).
        query: public query embedding u, shape (d,).
        selected: top-k survivors, shape (m, d), m <= k (zero padding: divided by k).
        noise: one vector from a :class:`LatticeSampler` at (profile.sigma, d, exponent), used once.
        exponent: lattice exponent k.

    Returns:
        ``(noisy_aggregate, release)``: the noisy aggregate (every coordinate an exact multiple of
        2^exponent) and the mixed release c = lambda * noisy + (1 - lambda) * u (post-processing).

    Raises:
        ValueError: shape mismatch, too many rows, noise off the lattice, or lambda = 0.
    """
    if not profile.retrieves:
        raise ValueError("lambda = 0 releases the query itself; no hardened release is needed")
    u = np.asarray(query, dtype=np.float64)
    x = np.asarray(selected, dtype=np.float64).reshape(-1, u.size) if np.size(selected) else np.zeros((0, u.size))
    if x.shape[0] > profile.k:
        raise ValueError(f"selected has {x.shape[0]} rows but k = {profile.k}")
    z = np.asarray(noise, dtype=np.float64)
    if z.shape != u.shape:
        raise ValueError(f"noise must have shape {u.shape}; found {z.shape}")
    if not np.array_equal(round_to_lattice(z, exponent), z):
        raise ValueError(f"noise is not on the lattice 2^{exponent} Z^d")
    v = clamp_unit(x).sum(axis=0) / profile.k if x.shape[0] else np.zeros_like(u)
    noisy = round_to_lattice(v, exponent) + z  # exact: both are multiples of 2^k well inside 2^52
    return noisy, profile.lam * noisy + (1.0 - profile.lam) * u
