"""A vectorised EXACT discrete Gaussian sampler on the lattice 2^k Z (issue 12 item 11, SPEC §6).

Algorithm: C. Canonne, G. Kamath, T. Steinke, "The Discrete Gaussian for Differential Privacy"
(NeurIPS 2020; arXiv:2004.00010), Section 5, run on whole numpy arrays of candidates at once:

* Algorithm 1 (Bernoulli(exp(-gamma)) for rational gamma in [0, 1]): K <- 1; while
  Bernoulli(gamma / K) succeeds, K <- K + 1; output [K odd]. For gamma > 1 we use the split
  CKS20 give right after Algorithm 1: for any integer n >= gamma, the AND of n independent
  Bernoulli(exp(-gamma/n)) (each by the [0, 1] case) is Bernoulli(exp(-gamma/n)^n) =
  Bernoulli(exp(-gamma)). The AND stops at the first failure (the later draws are not needed).
* Algorithm 2 (discrete Laplace, P(x) proportional to exp(-|x|/t), integer t >= 1): U uniform
  on {0..t-1}; reject unless Bernoulli(exp(-U/t)); V = number of successes of
  Bernoulli(exp(-1)) before the first failure; B uniform bit; reject if B = 1 and U = V = 0;
  output (1 - 2B)(U + tV).
* Algorithm 3 (N_Z(0, s^2)): t = floor(s) + 1; Y from Algorithm 2; accept Y with probability
  exp(-(|Y| - s^2/t)^2 / (2 s^2)). Accepted values have P(y) proportional to
  exp(-|y|/t - (|y| - s^2/t)^2/(2 s^2)) = exp(-y^2/(2 s^2)) * exp(-s^2/(2 t^2)): exactly
  N_Z(0, s^2) (CKS20 Section 5, correctness of Algorithm 3; the computation is repeated here and
  holds for any t > 0, t = floor(s) + 1 only sets the acceptance rate).

Noise on 2^k Z with parameter sigma is 2^k times N_Z(0, s^2) with s = sigma / 2^k (a change of
units: y ~ N_Z(0, s^2) iff 2^k y has pmf proportional to exp(-(2^k y)^2 / (2 sigma^2)) on 2^k Z).

Why the output distribution is EXACTLY N_{2^k Z}(0, sigma^2) (the proof):

1. Every random choice above is a Bernoulli(p) with p RATIONAL in [0, 1], a uniform integer, or a
   uniform bit; a real number is never rounded into a probability. Uniform integers come from
   ``numpy.random.Generator.integers`` (unbiased bounded generation by rejection; exact given
   uniform input bits, i.e. as exact as the bit generator: ChaCha20 keyed from ``os.urandom`` in
   production, see :mod:`dprdm.privacy.rng`).
2. Bernoulli(p) is implemented as [U < p] with U uniform on [0, 1): P(U < p) = p exactly.
   * p = num / den with integers den < 2^62 (Algorithm 2: p = U / (tK) and 1 / K): U is a
     uniform integer on {0..den-1} and the test is the integer comparison U < num. Larger den
     (K >= 2^62 / t, probability below 1/(2^21)!) continue in Python integers.
   * p = gamma / (nK) in Algorithm 3 (gamma has a denominator of ~2^170, too big for machine
     integers): U = (W + R) / 2^32 with W uniform on {0..2^32-1} and R uniform on [0, 1) drawn
     lazily. A float64 value p_f is computed from exact inputs with IEEE-754 correctly-rounded
     +, -, *, / only (no exp, no libm) and satisfies |p_f - p| <= 17 u (u = 2^-53; the error
     analysis is in :func:`_gamma_float`). We answer 1 when (W + 1) 2^-32 <= p_f - 2^-40 (then
     U < p), 0 when W 2^-32 >= p_f + 2^-40 (then U >= p), and otherwise (probability about
     2^-32 per test) decide EXACTLY in rational arithmetic: U < p iff R < r := p 2^32 - W, a
     Bernoulli(min(max(r, 0), 1)) drawn by an exact uniform integer below r's denominator. Both
     branches return [U < p] for the same U, so the test is exactly Bernoulli(p).
   * The split n >= gamma is chosen from the float estimate with a margin 2^-30 (gamma + 1) far
     above the proven error 7u (gamma + 1), so gamma / n <= 1 always holds.
3. Rejection sampling keeps candidate ORDER: each call draws a block of iid candidates, and the
   accepted ones are taken in candidate order (never selected by value), so the outputs are iid
   N_Z(0, s^2) (the standard subsequence-of-successes argument).
4. Candidates with V >= 2^11 (probability exp(-2048) each; |Y| could then leave the exact float
   range) are decided entirely in Python integers/fractions (the same algorithm, unvectorised).
   The float64 OUTPUT 2^k y is exact for |y| < 2^53; a draw beyond (at least 2^13 standard
   deviations at the largest supported s; probability about exp(-2^25)) raises OverflowError
   instead of releasing a rounded value (fail closed: such noise cannot be represented exactly
   in a float64 lattice vector at all).

Supported range (enforced, ValueError naming the value): s = sigma / 2^k in [2^-4, 2^40]
(at the default k = -20: sigma in [6e-8, 1.05e6]); the integer candidates then stay below 2^52
and t K below 2^62 for K < 2^21.

The test-suite checks the output against the exact pmf (chi-square), against the rational
:class:`~dprdm.privacy.discrete.ExactSampler` and OpenDP on moments, and every float decision of
item 2 against the exact rational comparison on adversarial inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt

__all__ = ["FastExactSampler", "MIN_LATTICE_SCALE", "MAX_LATTICE_SCALE", "lattice_scale"]

MIN_LATTICE_SCALE = 2.0**-4
"""Smallest supported s = sigma / 2^k (below it the noise is almost always 0)."""
MAX_LATTICE_SCALE = 2.0**40
"""Largest supported s = sigma / 2^k: candidates |Y| < 2^52, exact in float64."""

_U53 = 2**53
_UW = 2**32  # W's range: 32 random bits per test (the CSPRNG's bits are the main cost)
_INVW = 2.0**-32
_MARGIN = 2.0**-40  # >> the proven |p_f - p| <= 17 * 2^-53 (plus 2^-53 for the subtraction)
_N_SLACK = 2.0**-30  # >> the proven |gamma_f - gamma| <= 7 * 2^-53 * (gamma + 1)
_HUGE_V = 2**11  # V >= this: exact Python path (probability exp(-2048) per candidate)
_INT_LIMIT = 2**62


def lattice_scale(sigma: float, exponent: int) -> float:
    """s = sigma / 2^exponent, checked against the supported range.

    Raises:
        ValueError: sigma not finite and > 0, exponent not an integer in [-60, 60], or s outside
            [2^-4, 2^40] (the message names sigma, the exponent and s).
    """
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0; found {sigma!r}")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, np.integer)) or not -60 <= exponent <= 60:
        raise ValueError(f"exponent must be an integer in [-60, 60]; found {exponent!r}")
    s = math.ldexp(float(sigma), -int(exponent))
    if not MIN_LATTICE_SCALE <= s <= MAX_LATTICE_SCALE:
        raise ValueError(
            f"FastExactSampler supports sigma / 2^exponent in [2^-4, 2^40]; found sigma={sigma!r}, "
            f"exponent={exponent!r} (sigma / 2^exponent = {s!r})"
        )
    return s


# ----------------------------------------------------------------------------- exact scalar path
def _uniform_below(rng: np.random.Generator, n: int) -> int:
    """Uniform integer on {0..n-1} for any n >= 1 (rejection on whole bytes)."""
    nbytes = (n.bit_length() + 7) // 8 + 1
    limit = (256**nbytes // n) * n
    while True:
        x = int.from_bytes(rng.bytes(nbytes), "little")
        if x < limit:
            return x % n


def _bernoulli_fraction(rng: np.random.Generator, p: Fraction) -> bool:
    """Bernoulli(p) for rational p (clipped to [0, 1])."""
    if p <= 0:
        return False
    if p >= 1:
        return True
    return _uniform_below(rng, p.denominator) < p.numerator


def _alg1_from(rng: np.random.Generator, gamma: Fraction, k: int) -> bool:
    """CKS20 Algorithm 1 for gamma in [0, 1], continued from K = k (all earlier tests succeeded)."""
    while _bernoulli_fraction(rng, gamma / k):
        k += 1
    return k % 2 == 1


def _bernoulli_exp_fraction(rng: np.random.Generator, gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS20 Algorithm 1, general case)."""
    while gamma > 1:
        if not _alg1_from(rng, Fraction(1), 1):
            return False
        gamma -= 1
    return _alg1_from(rng, gamma, 1)


# ------------------------------------------------------------------------- vectorised Algorithm 1
def _bernoulli_exp_ratio(rng: np.random.Generator, num: npt.NDArray[np.int64], den: int) -> npt.NDArray[np.bool_]:
    """Elementwise Bernoulli(exp(-num/den)) for integers 0 <= num <= den (CKS20 Algorithm 1).

    Bernoulli(num / (den K)) is [uniform integer below den K < num]: exact integer arithmetic.
    """
    out = np.empty(num.shape, dtype=bool)
    active = np.arange(num.size)
    k = 1
    while active.size:
        if den * k >= _INT_LIMIT:  # never in practice: finish in Python integers
            for i in active:
                out[i] = _alg1_from(rng, Fraction(int(num[i]), den), k)
            break
        success = rng.integers(0, den * k, size=active.size, dtype=np.int64) < num[active]
        out[active[~success]] = k % 2 == 1
        active = active[success]
        k += 1
    return out


_FACT = [math.factorial(j) for j in range(13)]  # 12! < 2^32: one 32-bit draw


def _bernoulli_exp1(rng: np.random.Generator, size: int) -> npt.NDArray[np.bool_]:
    """``size`` iid Bernoulli(exp(-1)): CKS20 Algorithm 1 at gamma = 1, 11 steps from one integer.

    Algorithm 1 at gamma = 1 tests Bernoulli(1/k) for k = 1, 2, ... (k = 1 always succeeds) and
    returns [K odd] for the first failing K. Write X uniform on {0..12!-1} in mixed radix,
    X = sum_{j=2..12} d_j (j-1)!, d_j uniform on {0..j-1} and independent; take "Bernoulli(1/j)
    succeeds" := [d_j = 0]. Then tests 2..k all succeed iff X mod k! = 0, so
    K = 2 + #{k in 2..12 : X mod k! = 0}, exactly Algorithm 1's K when K <= 12; if X = 0 (all of
    2..12 succeeded, probability 1/12!) Algorithm 1 continues from K = 13 in Python integers.
    """
    x = rng.integers(0, _FACT[12], size=size, dtype=np.int64)
    k = np.full(size, 2, dtype=np.int64)
    alive = np.flatnonzero(x % 2 == 0)
    j = 3
    while alive.size and j <= 12:
        k[alive] += 1
        alive = alive[x[alive] % _FACT[j] == 0]
        j += 1
    out: npt.NDArray[np.bool_] = k % 2 == 1
    for i in alive:  # X = 0: probability 1/12!
        out[i] = _alg1_from(rng, Fraction(1), 13)
    return out


def _geometric_exp1(rng: np.random.Generator, size: int) -> npt.NDArray[np.int64]:
    """Number of successes of iid Bernoulli(exp(-1)) before the first failure (CKS20 Alg. 2's V)."""
    v = np.zeros(size, dtype=np.int64)
    active = np.arange(size)
    while active.size:
        active = active[_bernoulli_exp1(rng, active.size)]
        v[active] += 1
    return v


# ------------------------------------------------------------------------- vectorised Algorithm 2
def _discrete_laplace(
    rng: np.random.Generator, t: int, size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Up to ``size`` iid discrete Laplace candidates of scale t (CKS20 Algorithm 2), in order.

    Returns:
        ``(magnitude, negative, huge)``; ``huge`` marks V >= 2^11, whose magnitude is computed
        exactly in Python and must be accepted by the exact path (it may exceed 2^52).
    """
    u = rng.integers(0, t, size=size, dtype=np.int64)
    u = u[_bernoulli_exp_ratio(rng, u, t)]  # D = 0: reject (position-based, order kept)
    v = _geometric_exp1(rng, u.size)
    negative = rng.integers(0, 2, size=u.size, dtype=np.int8).astype(bool)
    keep = ~(negative & (u == 0) & (v == 0))
    u, v, negative = u[keep], v[keep], negative[keep]
    huge = v >= _HUGE_V
    mag = u + t * np.where(huge, 0, v)
    for i in np.flatnonzero(huge):  # exp(-2048) per candidate
        x = int(u[i]) + t * int(v[i])
        if x >= _INT_LIMIT:
            raise OverflowError("discrete Laplace candidate beyond 2^62 (probability < exp(-2^21))")
        mag[i] = x
    return mag, negative, huge


# ------------------------------------------------------------------------- vectorised Algorithm 3
def _gamma_float(a: npt.NDArray[np.int64], s: float, t: int) -> npt.NDArray[np.float64]:
    """gamma_f ~ gamma = (a - s^2/t)^2 / (2 s^2) with |gamma_f - gamma| <= 7u (gamma + 1), u = 2^-53.

    Error analysis (Higham's standard model fl(x op y) = (x op y)(1 + e), |e| <= u, for IEEE
    +, -, *, /; inputs exact: a < 2^52 and t <= 2^40 + 1 are exact floats, s is a float):
    c = s^2/t < s (t > s); c_f = fl(fl(s s)/t) = c (1 + e1)(1 + e2), |c_f - c| <= 2.01 u s;
    D_f = fl(a - c_f): |D_f - D| <= u|D| + 2.02 u s =: E with D = a - c; with x = |D|/s
    (gamma = x^2/2): |D_f^2 - D^2| / (2 s^2) <= (E/s)(2x + E/s)/2 <= u (x^2 + 2.02 x) + u^2 (x+2.02)^2;
    gamma_f = fl(fl(D_f D_f) / fl(2 fl(s s))) = D_f^2/(2 s^2) * rho, |rho - 1| <= 3.01 u. Hence
    |gamma_f - gamma| <= u (5.1 gamma + 2.9 sqrt(gamma)) + (tiny, x < 2^53) <= 7 u (gamma + 1).
    No overflow (D_f^2 < 2^106) and no subnormal (s >= 2^-4) can occur in the supported range.
    """
    s2 = s * s
    c = s2 / t
    d = a.astype(np.float64) - c
    out: npt.NDArray[np.float64] = (d * d) / (2.0 * s2)
    return out


def _exact_gamma(a: int, s2: Fraction, t: int) -> Fraction:
    return (a - s2 / t) ** 2 / (2 * s2)


def _decide_float(
    w: npt.NDArray[np.int64], p_f: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(yes, no) for the test U < p with U in [W 2^-32, (W+1) 2^-32), given |p_f - p| <= 17 u.

    yes: W + 1 <= fl(p_f - 2^-40) 2^32, i.e. (W+1) 2^-32 <= p; no: W >= fl(p_f + 2^-40) 2^32,
    i.e. W 2^-32 >= p. (Scaling by 2^32 and converting W < 2^33 to float64 are exact; the
    subtraction/addition round by at most 2u since |p_f| <= 2; 2^-40 > 19 u.)
    """
    yes = w + 1 <= (p_f - _MARGIN) * float(_UW)
    no = w >= (p_f + _MARGIN) * float(_UW)
    return yes, no


def _bernoulli_exp_h(
    rng: np.random.Generator,
    h_f: npt.NDArray[np.float64],
    idx: npt.NDArray[np.intp],
    exact_h: Callable[[int], Fraction],
) -> npt.NDArray[np.bool_]:
    """Elementwise Bernoulli(exp(-h)) with h = gamma/n in [0, 1] (CKS20 Algorithm 1), where
    Bernoulli(h / K) is the lazy-uniform test of the module docstring, item 2.

    ``h_f = fl(gamma_f / n)`` has |h_f - h| <= 7u(gamma+1)/n + u h <= 15.02 u (gamma <= n), so
    p_f = fl(h_f / K) has |p_f - h/K| <= 17 u. ``exact_h(i)`` is h as a Fraction for ``idx[i]``.
    """
    out = np.empty(h_f.shape, dtype=bool)
    active = np.arange(h_f.size)
    k = 1
    while active.size:
        p_f = h_f[active] / k if k > 1 else h_f
        w = rng.integers(0, _UW, size=active.size, dtype=np.int64)
        yes, no = _decide_float(w, p_f)
        for j in np.flatnonzero(~(yes | no)):  # ~2^-32 per test: decide exactly
            p = exact_h(int(idx[active[j]])) / k
            yes[j] = _bernoulli_fraction(rng, p * _UW - int(w[j]))
        out[active[~yes]] = k % 2 == 1
        active = active[yes]
        k += 1
    return out


def _accept(
    rng: np.random.Generator, mag: npt.NDArray[np.int64], huge: npt.NDArray[np.bool_], s: float, t: int
) -> npt.NDArray[np.bool_]:
    """CKS20 Algorithm 3's test: Bernoulli(exp(-(|y| - s^2/t)^2 / (2 s^2))) per candidate."""
    s2 = Fraction(s) ** 2
    acc = np.ones(mag.shape, dtype=bool)
    for i in np.flatnonzero(huge):
        acc[i] = _bernoulli_exp_fraction(rng, _exact_gamma(int(mag[i]), s2, t))
    idx = np.flatnonzero(~huge)
    a = mag[idx]
    gamma_f = _gamma_float(a, s, t)
    # n >= gamma: gamma <= gamma_f + 7u(gamma + 1) < r_f := fl(gamma_f (1 + 2^-30) + 2^-30) <= n
    n = np.floor(gamma_f * (1.0 + _N_SLACK) + _N_SLACK) + 1.0
    h_f = gamma_f / n

    def exact_h(i: int) -> Fraction:
        return _exact_gamma(int(a[i]), s2, t) / int(n[i])

    j = 0
    active = np.arange(idx.size)
    while active.size:  # AND of n Bernoulli(exp(-gamma/n)), stopping at the first failure
        ok = _bernoulli_exp_h(rng, h_f[active], active, exact_h)
        acc[idx[active[~ok]]] = False
        active = active[ok]
        j += 1
        active = active[n[active] > j]
    return acc


class FastExactSampler:
    """Exact discrete Gaussian noise on 2^k Z^d, vectorised over many coordinates at once.

    Implements :class:`~dprdm.privacy.discrete.LatticeSampler` (plus :meth:`sample_batch`). See
    the module docstring for the algorithm and the exactness proof.

    Args:
        rng: the source of uniform bits (``new_dp_generator()`` in production; seeded in tests).
            Thread-safety: each numpy ``Generator`` call holds the bit generator's lock, and every
            uniform value is used once, so sharing one sampler between threads keeps exactness.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator; found {type(rng).__name__}")
        self._rng = rng

    def sample_integers(self, s: float, size: int) -> npt.NDArray[np.int64]:
        """``size`` iid draws of N_Z(0, s^2), s in [2^-4, 2^40] (CKS20 Algorithm 3).

        Raises:
            ValueError: s or size out of range.
        """
        if not MIN_LATTICE_SCALE <= s <= MAX_LATTICE_SCALE:
            raise ValueError(f"s must lie in [2^-4, 2^40]; found s={s!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0; found {size!r}")
        t = math.floor(s) + 1
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:
            need = size - filled
            mag, negative, huge = _discrete_laplace(self._rng, t, (9 * need) // 4 + 64)  # ~2.1 per output
            acc = _accept(self._rng, mag, huge, s, t)
            y = np.where(negative, -mag, mag)[acc][:need]  # first accepted, in candidate order
            out[filled : filled + y.size] = y
            filled += y.size
        return out

    def sample_batch(self, sigma: float, dimension: int, count: int, exponent: int) -> npt.NDArray[np.float64]:
        """``count`` independent noise vectors, shape (count, dimension), on 2^exponent Z^d.

        Raises:
            ValueError: sigma / 2^exponent outside [2^-4, 2^40] (named), dimension or count < 1.
            OverflowError: a draw beyond 2^53 lattice steps (see the module docstring, item 4).
        """
        s = lattice_scale(sigma, exponent)
        if dimension < 1 or count < 1:
            raise ValueError(f"dimension and count must be >= 1; found {dimension!r}, {count!r}")
        y = self.sample_integers(s, dimension * count)
        if y.size and int(np.abs(y).max()) >= _U53:
            raise OverflowError("a noise coordinate beyond 2^53 lattice steps cannot be represented exactly")
        out: npt.NDArray[np.float64] = np.ldexp(y.astype(np.float64), int(exponent)).reshape(count, dimension)
        return out

    def sample(self, sigma: float, dimension: int, exponent: int) -> npt.NDArray[np.float64]:
        """One noise vector on 2^exponent Z^d with parameter ``sigma`` (see :meth:`sample_batch`)."""
        out: npt.NDArray[np.float64] = self.sample_batch(sigma, dimension, 1, exponent)[0]
        return out
