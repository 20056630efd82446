"""Rényi DP of the Poisson-subsampled Gaussian mechanism, in log space.

Mechanism: each record is kept independently with probability ``q``; the sum of the kept
records' contributions (L2 sensitivity 1 after scaling) gets Gaussian noise with standard
deviation ``z`` (the *noise multiplier*). Neighbouring relation: add or remove one record.

Source: I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530 (2019), Section 3.3. With mu0 = N(0, z^2), mu1 = N(1, z^2) and
mu = (1 - q) mu0 + q mu1, the RDP at order a is ``R(a) = log A_a / (a - 1)`` where

    A_a = E_{x ~ mu0} [ (mu(x) / mu0(x))^a ] = E_{x ~ mu0} [ (1 - q + q exp((2x - 1) / (2 z^2)))^a ].

* Integer a (their Section 3.3, eq. for A_alpha with integer alpha)::

      A_a = sum_{i=0..a} C(a, i) (1 - q)^(a - i) q^i exp((i^2 - i) / (2 z^2)).

  Because sum_i C(a, i) (1 - q)^(a - i) q^i = 1 and the i = 0, 1 terms have exponent 0, we
  evaluate ``A_a - 1 = sum_{i>=2} C(a,i) (1-q)^(a-i) q^i expm1((i^2 - i) / (2 z^2))`` (all terms
  positive) and return ``log1p(A_a - 1)``: accurate to full relative precision even when
  ``R(a)`` is 1e-12.

* Fractional a (their Section 3.3, the two-sided series): split the integral at
  ``z0 = z^2 log(1/q - 1) + 1/2``, where ``q mu1/mu0 = (1 - q)``, and expand the binomial on each
  side where it converges::

      A_a = sum_{i>=0} (s0_i + s1_i),
      s0_i = C(a,i) q^i (1-q)^(a-i) exp((i^2 - i)/(2 z^2)) Phi((z0 - i) / z),
      s1_i = C(a,i) q^(a-i) (1-q)^i exp(((a-i)^2 - (a-i))/(2 z^2)) Phi((a - i - z0) / z).

  ``C(a, i)`` changes sign for i > a, so the series is *signed*. We truncate after index n and
  ADD a rigorous bound on the remainder, so the returned value is an upper bound on the true
  RDP (never an underestimate). Remainder bound (our derivation, for n > a)::

      |s0_i| = |C(a,i)| (1-q)^a h0(i),  h0(i) = int_{-inf}^{z0} mu0(x) r(x)^i dx,
      r(x) = q exp((2x - 1)/(2 z^2)) / (1 - q) <= 1 on x <= z0, so h0 is non-increasing in i;
      |C(a,i+1)| / |C(a,i)| = (i - a)/(i + 1) <= (i/(i + 1))^(a+1)  (Bernoulli, i > a),
      so |s0_m| <= |s0_n| (n/m)^(a+1) for m >= n and
      sum_{m>n} |s0_m| <= |s0_n| n^(a+1) int_n^inf t^-(a+1) dt = |s0_n| n / a.

  The same holds for s1 (with 1/r on x >= z0), giving ``|A_a - S_n| <= (n/a)(|s0_n| + |s1_n|)``.
  Opacus sums the same signed series (stopping when terms fall below e^-30, no remainder);
  dp-accounting 0.6.0 sums absolute values, a looser upper bound. Tests check our values against
  direct numerical integration of ``A_a``.

* q = 1: the plain Gaussian mechanism, ``R(a) = a / (2 z^2)`` (Mironov 2017, Prop. 7).
* z = 0 with q > 0: ``+inf`` (no noise). q = 0: 0 (nothing is ever released).
* Extreme z (never NaN): ``a / (2 z^2)`` is also an upper bound for every q, because the Rényi
  divergence is quasi-convex in its first argument (T. van Erven, P. Harremoës, "Rényi Divergence
  and Kullback-Leibler Divergence", IEEE Trans. Inf. Theory 2014, Thm 13), so
  ``D_a((1-q) mu0 + q mu1 || mu0) <= max(0, D_a(mu1 || mu0)) = a / (2 z^2)``, and MTZ 2019 (Thm 5)
  show the other direction is no larger. Where the series loses its meaning in floating point
  (``z^2`` overflows or underflows, ``z0`` is ``inf * 0``) or underflows to 0, the result is that
  bound, computed in log space: ``+inf`` when it exceeds the largest float (the true value is then
  beyond it too, up to a factor a), the smallest positive float when it underflows (so a
  released mechanism is never charged exactly 0). Otherwise the result is ``min(series, bound)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import special

from .orders import validate_orders

__all__ = ["rdp_subsampled_gaussian", "log_a_integer", "log_a_fractional"]

_FRAC_BLOCK = 512
_FRAC_MAX_TERMS = 1 << 15
_FRAC_REL_TOL = 1e-13


def _logsumexp(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64] | None = None) -> tuple[float, float]:
    """``log |sum_i b_i exp(a_i)|`` and the sign of the sum (``b`` = 1 when None), 1-D float64.

    Step for step the real 1-D case of ``scipy.special.logsumexp(a, b=b, return_sign=True)``
    (SciPy >= 1.15): terms with ``b_i = 0`` dropped; the largest terms taken out of the sum shifted by
    the maximum, which goes through ``log1p`` (P. Blanchard, D. J. Higham, N. J. Higham, "Accurately
    computing the log-sum-exp and softmax functions", IMA J. Numer. Anal. 41(4), 2021, Sec. 2); a
    non-finite result replaced by the unshifted ``log |sum b exp(a)|``. Same operations in the same
    order, numpy's pairwise sums, so the same bits (tested against SciPy); without SciPy's array-API
    dispatch, ~0.25 ms a call, which was 70 % of an RDP curve's time (~6,000 calls per calibration).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.exp(a) if b is None else b * np.exp(a)
        total = np.sum(terms)
        sign_inf, out_inf = float(np.sign(total)), float(np.log(np.abs(total)))
    with np.errstate(divide="ignore", invalid="ignore"):
        if b is not None:
            a = np.where(b == 0, -np.inf, a)
        a_max = np.max(a)
        top = a == a_max
        rest = np.where(top, -np.inf, a)
        m = np.sum(top.astype(np.float64) if b is None else b * top)
        shifted = np.exp(rest - a_max) if b is None else b * np.exp(rest - a_max)
        s = np.sum(shifted)
        s = s if s == 0 else s / m
        sign = float(np.sign(s + 1) * np.sign(m))
        if s < -1:
            s = -s - 2
        out = float(np.log1p(s) + np.log(np.abs(m)) + a_max)
    if not math.isfinite(out):
        return out_inf, sign_inf
    return out, sign


def _log_expm1(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log(exp(x) - 1) for x > 0, stable for tiny and huge x."""
    out = np.empty_like(x)
    big = x > 1.0
    out[big] = x[big] + np.log1p(-np.exp(-x[big]))
    out[~big] = np.log(np.expm1(x[~big]))
    return out


def log_a_integer(q: float, z: float, order: int) -> float:
    """``log A_a`` for an integer order ``a >= 2`` (see module docstring).

    Args:
        q: sampling probability in (0, 1).
        z: noise multiplier > 0.
        order: integer Rényi order >= 2.

    Returns:
        ``log A_a`` (>= 0, possibly very large, never NaN).
    """
    i = np.arange(2, order + 1, dtype=np.float64)
    log_binom = special.gammaln(order + 1.0) - special.gammaln(i + 1.0) - special.gammaln(order - i + 1.0)
    log_terms = (
        log_binom
        + i * math.log(q)
        + (order - i) * math.log1p(-q)
        + _log_expm1((i * i - i) / (2.0 * z * z))
    )
    log_a_minus_1 = _logsumexp(log_terms)[0]
    return float(np.logaddexp(0.0, log_a_minus_1))


def _frac_terms(
    q: float, z: float, order: float, start: int, stop: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Log-magnitudes of s0_i, s1_i and the sign of C(a, i) for i in [start, stop)."""
    i = np.arange(start, stop, dtype=np.float64)
    j = order - i
    log_binom = special.gammaln(order + 1.0) - special.gammaln(i + 1.0) - special.gammaln(j + 1.0)
    sign = special.gammasgn(j + 1.0)
    z0 = z * z * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    two_z2 = 2.0 * z * z
    log_s0 = log_binom + i * log_q + j * log_1mq + (i * i - i) / two_z2 + special.log_ndtr((z0 - i) / z)
    log_s1 = log_binom + j * log_q + i * log_1mq + (j * j - j) / two_z2 + special.log_ndtr((j - z0) / z)
    return log_s0, log_s1, sign


def log_a_fractional(q: float, z: float, order: float) -> float:
    """Upper bound on ``log A_a`` for a fractional order (signed series + remainder bound).

    Args:
        q: sampling probability in (0, 1).
        z: noise multiplier > 0.
        order: non-integer Rényi order > 1.

    Returns:
        ``log(S_n + R_n)`` where ``S_n`` is the signed series truncated after n terms and
        ``R_n`` the remainder bound of the module docstring; it stops once ``R_n / S_n`` is
        below 1e-13 (or after 2^21 terms, still a valid upper bound).
    """
    logs: list[npt.NDArray[np.float64]] = []
    signs: list[npt.NDArray[np.float64]] = []
    start = 0
    block = max(_FRAC_BLOCK, int(math.ceil(order)) + 2)
    while True:
        stop = start + block
        log_s0, log_s1, sign = _frac_terms(q, z, order, start, stop)
        logs.extend([log_s0, log_s1])
        signs.extend([sign, sign])
        all_logs = np.concatenate(logs)
        log_sum, sum_sign = _logsumexp(all_logs, np.concatenate(signs))
        n = stop - 1  # last index included; n > order by construction of `block`
        log_rem = math.log(n / order) + float(np.logaddexp(log_s0[-1], log_s1[-1]))
        # Floating-point summation error of the signed sum (pairwise summation plus per-term
        # rounding): at most (log2(#terms) + 16) ulp of sum |terms|; added so the result stays
        # an upper bound even when A_a - 1 is near machine precision.
        log_abs = _logsumexp(all_logs)[0]
        log_fp = log_abs + math.log((math.log2(all_logs.size) + 16.0) * 2.0**-52)
        log_bound = float(np.logaddexp(log_rem, log_fp))
        if sum_sign <= 0:  # cannot happen for a valid (q, z, a): A_a >= 1
            raise ArithmeticError(f"series for A_a lost its sign at q={q!r}, z={z!r}, order={order!r}")
        if log_rem - log_sum < math.log(_FRAC_REL_TOL) or stop >= _FRAC_MAX_TERMS:
            return float(np.logaddexp(log_sum, log_bound))
        start = stop
        block *= 2


_LOG_MAX = math.log(np.finfo(np.float64).max)
_TINY = math.ulp(0.0)  # the smallest positive float64


def _gaussian_rdp(z: float, order: float) -> float:
    """``a / (2 z^2)`` (z > 0) in log space: ``inf`` above the largest float, never 0 below it."""
    log_value = math.log(order) - math.log(2.0) - 2.0 * math.log(z)
    if log_value > _LOG_MAX:
        return math.inf
    value = order / (2.0 * z * z) if 0.0 < z * z < math.inf else math.exp(log_value)
    return max(value, _TINY) if math.isfinite(value) else math.inf


@lru_cache(maxsize=4096)
def _rdp_one(q: float, z: float, order: float) -> float:
    if q == 0.0:
        return 0.0
    if z == 0.0:
        return math.inf
    gauss = _gaussian_rdp(z, order)
    if q == 1.0 or gauss == math.inf:
        return gauss
    with np.errstate(all="ignore"):
        try:
            series = _rdp_series(q, z, order)
        except ArithmeticError:  # a series that lost its meaning in floating point
            series = math.nan
    if not series > 0.0:  # NaN, or underflowed to 0 although q > 0 and z < inf
        return gauss
    return min(series, gauss)


def _rdp_series(q: float, z: float, order: float) -> float:
    """R(a) for 0 < q < 1, z > 0 by the integer sum or the fractional series (module docstring)."""
    if float(order).is_integer():
        log_a = log_a_integer(q, z, int(order))
    else:
        # Two valid upper bounds; keep the smaller. (1) the truncated series plus its remainder
        # bound; (2) the chord: log A_a = log E_mu0[exp(a * ell)] is a cumulant generating
        # function, convex in a (Hölder), so it lies below the chord between floor(a) and
        # floor(a) + 1 (log A_1 = 0). (2) matters only near a = 1, where (1) converges slowly.
        lo = math.floor(order)
        log_lo = 0.0 if lo == 1 else log_a_integer(q, z, lo)
        chord = (lo + 1 - order) * log_lo + (order - lo) * log_a_integer(q, z, lo + 1)
        log_a = min(log_a_fractional(q, z, order), chord)
    return max(log_a, 0.0) / (order - 1.0)


def rdp_subsampled_gaussian(
    *, q: float, noise_multiplier: float, orders: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """RDP curve of ONE application of the Poisson-subsampled Gaussian mechanism.

    Args:
        q: Poisson sampling probability, in [0, 1].
        noise_multiplier: noise standard deviation divided by the L2 sensitivity, >= 0.
        orders: Rényi orders, each > 1.

    Returns:
        ``R(a)`` per order: finite and >= 0, or ``+inf`` when ``noise_multiplier == 0``
        and ``q > 0``. Never NaN.

    Raises:
        ValueError: naming the bad argument.
    """
    q_f = float(q)
    z_f = float(noise_multiplier)
    if not (0.0 <= q_f <= 1.0) or math.isnan(q_f):
        raise ValueError(f"q must be in [0, 1]; found {q!r}")
    if not (z_f >= 0.0) or math.isinf(z_f):
        raise ValueError(f"noise_multiplier must be finite and >= 0; found {noise_multiplier!r}")
    arr = validate_orders(orders)
    return np.array([_rdp_one(q_f, z_f, float(a)) for a in arr], dtype=np.float64)
