"""The discrete Gaussian on the lattice is dominated by a continuous Gaussian pair (issue 17).

This module proves, and computes the constants of, the statement the PLD accountant
(:mod:`dprdm.privacy.pld`, item 4) needs for the hardened release of :mod:`dprdm.privacy.discrete`:
noise N_Z(0, s^2) per coordinate in lattice units (s = sigma / 2^k, the lattice step 2^k), the
rounded mean shifted by a lattice vector m with ||m|| <= Delta_w / 2^k (Delta_w = 2/k_nn + 2^k sqrt(d),
:func:`dprdm.privacy.lattice.widened_sensitivity`).

**Theorem.** Fix s >= 1, an integer dimension d and a cut A >= 4 with kappa (A + 2) <= 0.1 (kappa
below). Let X' be the "cut" discrete Gaussian of item (i). Then for every lattice shift m the pair
(X'^d, X'^d + m) is mu-GDP (J. Dong, A. Roth, W. Su, "Gaussian Differential Privacy", JRSS-B 2022,
Def. 2.6) with mu = (1 + eta) ||m|| / s, where 1 + eta = :func:`lattice_gdp` ``.inflation``, and the
total variation between one coordinate of the real noise X ~ N_Z(0, s^2) and X' is at most
``tail_tv`` = 4 phi(A) / A.

Notation: phi, Phi the standard normal density and cdf, Q = 1 - Phi, M(t) = Q(t) / phi(t) (Mills'
ratio), Y = ceil(A s), x_Y = (2Y + 1) / (2 s^2), rho = exp(-x_Y), A_Y = Y / s in [A, A + 1/s).

(i) **The cut distribution.** w(y) = exp(-y^2 / (2 s^2)) for |y| <= Y and w(y) = w(Y) rho^(|y| - Y)
    for |y| > Y; X' has pmf w / Z' (Z' = sum of w). log w is concave (its increments
    -(2y + 1)/(2 s^2) decrease up to y = Y, then stay at log rho = -x_Y; symmetric), so X' is a
    discrete log-concave law and for every m >= 1 the likelihood ratio w(y - m) / w(y) is
    non-decreasing in y (monotone likelihood ratio). Also w(y) >= exp(-y^2/(2s^2)) everywhere
    (for |y| = Y + j: j (2Y + 1) <= 2Yj + j^2), so Z' >= Z = sum_y exp(-y^2/(2s^2)).
(ii) **Normalising constants.** By Poisson summation Z = s sqrt(2 pi) sum_n exp(-2 pi^2 s^2 n^2)
    (C. Canonne, G. Kamath, T. Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS
    2020, Sec. 2 (the normalising constant via Poisson summation)), so
    s sqrt(2 pi) <= Z <= s sqrt(2 pi) (1 + theta_s), theta_s = 2 e^(-2 pi^2 s^2) / (1 - e^(-2 pi^2 s^2)).
    The tails of X' add W = 2 w(Y) rho / (1 - rho) <= 2 e^(-A^2/2) / x_Y <= 2 e^(-A^2/2) s / A,
    so Z' / (s sqrt(2 pi)) <= 1 + kappa with kappa = theta_s + 2 phi(A) / A.
(iii) **From quantiles to GDP (one coordinate).** Let F' be the cdf of X' and g(y) = Phi^-1(F'(y)).
    With monotone likelihood ratio the optimal tests of X' against X' + m reject for large y
    (Neyman-Pearson, randomised at the boundary), so the tradeoff function T(X', X' + m) is the
    piecewise-linear curve through the points (1 - F'(y), F'(y - m)) (DRS22, Sec. 2.1). The GDP
    curve G_mu(alpha) = Phi(Phi^-1(1 - alpha) - mu) passes at alpha = 1 - F'(y) through
    Phi(g(y) - mu), so the points lie on or above G_mu iff g(y) - g(y - m) <= mu for all y, and then
    the whole curve does (G_mu is convex: a chord between points above a convex curve lies above it).
    Telescoping, g(y) - g(y - m) <= m * max_y inc(y), inc(y) = g(y) - g(y - 1). X' is symmetric, so
    g(-y - 1) = -g(y) and inc(-y) = inc(y): it suffices to bound inc(y) for y >= 0.
(iv) **Centre, 0 <= y <= Y.** inc(y) = int_{F'(y-1)}^{F'(y)} du / phi(Phi^-1(u)); the integrand is
    symmetric about 1/2 and grows away from it, and F'(0) >= 1/2, so for y >= 1 (and for y = 0, whose
    interval is symmetric about 1/2) inc(y) <= p'(y) / phi(g(y)). Now p'(y) = e^(-y^2/(2s^2)) / Z'
    <= phi(y/s) / s by (ii). With b = (y + 1)/s: 1 - F'(y) >= sum_{x > y} e^(-x^2/(2s^2)) / Z'
    >= (int_{y+1}^inf e^(-t^2/(2s^2)) dt) / Z' (the Gaussian is decreasing on [0, inf), y + 1 >= 1)
    >= Q(b) / (1 + kappa) >= Q(b) - kappa Q(b) >= Q(b) - eps phi(b + eps) >= Q(b + eps) with
    eps = 2 kappa, because Q(b) <= sqrt(pi/2) phi(b) (b >= 0: M is decreasing, M(0) = sqrt(pi/2)) and
    phi(b + eps) >= phi(b) e^(-(A + 2) eps - eps^2/2) >= 0.8 phi(b) (b <= A + 2, kappa (A + 2) <= 0.1).
    Hence 0 <= g(y) <= b + eps, phi(g(y)) >= phi(b + eps) and
    s inc(y) <= exp((2y + 1)/(2 s^2) + eps (y + 1)/s + eps^2/2)
             <= exp(A/s + 3/(2 s^2) + eps (A + 2) + eps^2/2)     (Y < A s + 1, s >= 1).
(iv') **Centre, sharper (used when it applies and is smaller).** Midpoint instead of right-end
    bounds. (a) Per cell, f(x) = int_{x-1/2}^{x+1/2} f - f''(xi)/24 for some xi in the cell (midpoint
    rule), f(t) = e^(-t^2/(2s^2)), f'' = (t^2/s^4 - 1/s^2) f <= (t^2/s^4) f; for 1 <= x <= Y the cell
    lies in t > 0 where f decreases, so f''(xi) <= (x + 1/2)^2 f(x - 1/2) / s^4 and f(x - 1/2) =
    f(x) e^((x - 1/4)/(2s^2)): f(x) >= int_cell f / (1 + c), c = (A + 3/(2s))^2 e^((A+1)/(2s)) / (24 s^2).
    (b) The geometric tail: sum_{x > Y} w(x) = f(Y) / (e^x_Y - 1) = f(Y) e^(-x_Y/2) / (2 sinh(x_Y/2))
    >= f(Y) e^(-x_Y/2) e^(-x_Y^2/24) / x_Y (sinh(u)/u <= e^(u^2/6), termwise: (2k+1)! >= 6^k k!),
    while int_{Y+1/2}^inf f <= (s^2/(Y + 1/2)) f(Y + 1/2) = f(Y) e^(-x_Y/2) e^(1/(8s^2)) / x_Y (Mills),
    so the tail is >= e^(-x_Y^2/24 - 1/(8s^2)) int_{Y+1/2}^inf f. Hence for 0 <= y <= Y,
    1 - F'(y) >= (1 - kappa2) int_{y+1/2}^inf f / Z' >= (1 - kappa2) Q(b') / (1 + kappa) with
    b' = (y + 1/2)/s and kappa2 = max(c, x_Y^2/24 + 1/(8s^2)); as in (iv), with eps' = 2 (kappa + kappa2)
    and (kappa + kappa2)(A + 2) <= 0.2, g(y) <= (y + 1/2)/s + eps'. (c) The integrand
    h(u) = 1/phi(Phi^-1(u)) of (iv) is convex (h'' = (1 + 2t^2)/phi(t)^3 at t = Phi^-1(u)), so for
    y >= 1 the trapezoid rule bounds it: inc(y) <= p'(y) (h(F'(y-1)) + h(F'(y))) / 2, and with the
    two quantile bounds s inc(y) <= e^(1/(8s^2) + eps'^2/2 + eps'(A + 2)) cosh((A + 1)/(2s));
    y = 0: s inc(0) <= exp((1/(2s) + eps')^2 / 2), smaller. This is ~1 + 795/s^2 at A = 20 instead of
    ~1 + A/s (at s = 52,428.8 and A = 20: 2.9e-7 instead of 3.8e-4), so (v) decides eta there.
(v) **Tails, y >= Y + 1.** There S'(y - 1) = S'(y) / rho (S' = 1 - F'), i.e. -log S' grows by x_Y
    per step. Q is log-concave, so t -> -log Q(t) is convex increasing and its inverse
    l -> Q^-1(e^-l) is concave: inc(y) <= x_Y / (phi/Q)(g(y - 1)) = x_Y M(g(y - 1)) <= x_Y / g(Y)
    (M is decreasing and M(t) <= 1/t for t > 0). And S'(Y) = w(Y) rho / ((1 - rho) Z')
    <= phi(A_Y) / (s x_Y) < phi(A_Y) / A_Y <= Q(t_lo) with t_lo = A_Y - 1/(A_Y (A_Y^2 + 1)), because
    Q(A_Y - z) >= Q(A_Y) + z phi(A_Y) and Q(A_Y) >= phi(A_Y) A_Y / (A_Y^2 + 1) (Mills' ratio lower
    bound). So g(Y) >= t_lo >= A - 1/(A (A^2 + 1)) (t_lo increases with A_Y) and
    s inc(y) <= (A + 3/(2s)) / (A - 1/(A (A^2 + 1))).
    1 + eta is the larger of the centre bound (the smaller of (iv) and (iv') where (iv') applies)
    and (v), rounded up. All decrease as s grows (and (iv') only starts to apply as s grows), so the
    pair's multiplier sigma / ((1 + eta) Delta_w) increases with sigma (calibration stays monotone).
(vi) **Dimension d.** The coordinates are independent; per coordinate the pair is
    ((1 + eta) |m_i| / s)-GDP by (iii), so the product is (1 + eta) ||m|| / s-GDP (DRS22, Thm 3.2
    and Cor. 3.3: G_a (x) G_b = G_sqrt(a^2 + b^2); the tensor product is monotone).
(vii) **Cut versus real noise.** TV(X, X') = sum_y (p(y) - p'(y))_+ <= (Z' - Z)/Z' + P(|X| > Y)
    <= W / Z + 2 Q(A_Y) <= 2 phi(A)/A + 2 phi(A)/A = ``tail_tv`` (Q(t) <= phi(t)/t). One query draws d
    coordinates, T queries T d of them, so coupling draw by draw, every transcript of the real
    server and of the server drawing X' agree except with probability <= T d ``tail_tv``, for every
    corpus. For neighbours D, D' and every event E: P_real(D)(E) - e^eps P_real(D')(E) <=
    P_cut(D)(E) - e^eps P_cut(D')(E) + (1 + e^eps) T d tail_tv, i.e. the real server is
    (eps, delta_cut(eps) + (1 + e^eps) T d tail_tv)-DP. :mod:`dprdm.privacy.pld` reserves that term.

Numbers: at sigma 0.05 (s = 52,428.8) and the cut :func:`choose_cut` picks for d = 512 (A ~ 20),
eta ~ 7.7e-6 (decided by (v); (iv) alone gave 3.8e-4); at sigma 1e-3 (s = 1,048.6) eta ~ 7e-4. (The real
discrete Gaussian's centre increment is (1 + 1/(24 s^2) + ...)/s > 1/s: eta > 0 is necessary.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MIN_SCALE", "LatticeGdp", "lattice_gdp", "choose_cut", "cut_tail_log"]

MIN_SCALE = 1.0
"""Smallest noise scale s (lattice units) the theorem is stated for (sigma >= 2^k)."""
MIN_CUT = 4.0
"""Smallest cut A."""
_SAFETY = 1e-12
"""Relative margin added to every computed bound (float rounding of exp, erfc, divisions)."""


def _phi(t: float) -> float:
    return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _log_phi(t: float) -> float:
    return -0.5 * t * t - 0.5 * math.log(2.0 * math.pi)


def _theta(s: float) -> float:
    """Poisson-summation excess of Z over s sqrt(2 pi) (module docstring, (ii))."""
    e = math.exp(-2.0 * math.pi * math.pi * s * s)
    return 2.0 * e / (1.0 - e)


@dataclass(frozen=True)
class LatticeGdp:
    """The constants of the theorem for one (s, A).

    Attributes:
        scale: s, the noise's standard-deviation parameter in lattice units.
        cut: A (the cut is at Y = ceil(A s)).
        inflation: 1 + eta: one coordinate with integer shift m is ((1 + eta) |m| / s)-GDP (rounded up).
        tail_tv: bound on the total variation between one coordinate of N_Z(0, s^2) and the cut law.
    """

    scale: float
    cut: float
    inflation: float
    tail_tv: float


def lattice_gdp(scale: float, cut: float) -> LatticeGdp:
    """The theorem's constants (module docstring, (iv), (v), (vii)).

    Raises:
        ValueError: s < :data:`MIN_SCALE`, A < :data:`MIN_CUT`, or a cut too far for the theorem.
    """
    s, a = float(scale), float(cut)
    if not (s >= MIN_SCALE) or math.isinf(s):
        raise ValueError(f"the lattice GDP bound needs a noise scale s >= {MIN_SCALE} lattice steps; found {scale!r}")
    if not (a >= MIN_CUT) or math.isinf(a):
        raise ValueError(f"the cut A must be finite and >= {MIN_CUT}; found {cut!r}")
    kappa = _theta(s) + 2.0 * _phi(a) / a
    if kappa * (a + 2.0) > 0.1:
        raise ValueError(f"cut A = {a} is outside the theorem (kappa (A + 2) = {kappa * (a + 2.0):.3g} > 0.1)")
    eps = 2.0 * kappa
    centre = math.exp(a / s + 1.5 / (s * s) + eps * (a + 2.0) + 0.5 * eps * eps)
    sharper = _midpoint_centre(s, a, kappa)
    if sharper is not None:
        centre = min(centre, sharper)
    tail = (a + 1.5 / s) / (a - 1.0 / (a * (a * a + 1.0)))
    inflation = max(centre, tail) * (1.0 + _SAFETY)
    return LatticeGdp(scale=s, cut=a, inflation=inflation, tail_tv=4.0 * _phi(a) / a * (1.0 + _SAFETY))


def _midpoint_centre(s: float, a: float, kappa: float) -> float | None:
    """Item (iv'): the sharper bound on s * inc(y) for 0 <= y <= Y, or None where it does not apply."""
    c = (a + 1.5 / s) ** 2 * math.exp((a + 1.0) / (2.0 * s)) / (24.0 * s * s)
    x_max = a / s + 1.5 / (s * s)  # x_Y < A/s + 3/(2 s^2)
    kappa2 = max(c, x_max * x_max / 24.0 + 1.0 / (8.0 * s * s))
    if (kappa + kappa2) * (a + 2.0) > 0.2:
        return None
    eps = 2.0 * (kappa + kappa2)
    inner = math.exp(1.0 / (8.0 * s * s) + 0.5 * eps * eps + eps * (a + 2.0)) * math.cosh((a + 1.0) / (2.0 * s))
    zero = math.exp(0.5 * (0.5 / s + eps) ** 2)
    return max(inner, zero)


def cut_tail_log(cut: float) -> float:
    """log of the per-coordinate ``tail_tv`` = log(4 phi(A) / A) (no underflow for large A)."""
    a = float(cut)
    return math.log(4.0) + _log_phi(a) - math.log(a)


def choose_cut(log_allowance: float) -> float:
    """The smallest cut A (on a grid of 1/16, >= :data:`MIN_CUT`) with log(tail_tv) <= ``log_allowance``.

    The caller states how much total variation one coordinate may have: e.g. the log of
    (reserved delta) / ((1 + e^eps_max) * T_max * d)."""
    a = MIN_CUT
    while cut_tail_log(a) > log_allowance:
        a += 1.0 / 16.0
    return a
