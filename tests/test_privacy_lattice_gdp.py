"""Issue 17: the lattice GDP theorem (``dprdm.privacy.lattice_gdp``) checked exactly, and the lattice
PLD bound (``dprdm.privacy.pld`` item 4) checked against an independent discrete-Gaussian oracle.

Exact side (mpmath): the "cut" law X' of the theorem (item (i): w(y) = exp(-y^2 / (2 s^2)) for
|y| <= Y = ceil(A s), geometric tails of ratio rho = exp(-(2Y + 1) / (2 s^2)) beyond) is built in
closed form, its quantile transform g(y) = Phi^-1(F'(y)) computed at a precision sized so that even
the deepest tail probability keeps ~30 significant digits, and the increments g(y) - g(y - 1) compared
with ``lattice_gdp(s, A).inflation / s`` (items (iii)-(v)). The real discrete Gaussian N_Z(0, s^2)
is the same sums without the cut.

Oracle side: dp-accounting's ``from_discrete_gaussian_mechanism`` (the exact PLD of the Poisson-
subsampled discrete Gaussian, C. Canonne, G. Kamath, T. Steinke, NeurIPS 2020, as implemented by
``DiscreteGaussianPrivacyLoss``) self-composed T times: an upper estimate of the true epsilon of a
1-dimensional lattice mechanism with integer shift m, which our bound must never undercut.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest

from dprdm.privacy import Profile
from dprdm.privacy import lattice_gdp as lattice_gdp_mod
from dprdm.privacy import pld as pld_mod
from dprdm.privacy.lattice import DEFAULT_LATTICE_EXPONENT
from dprdm.privacy.lattice_gdp import MIN_CUT, choose_cut, cut_tail_log, lattice_gdp
from dprdm.privacy.pld import DISCRETISATION, max_queries_pld, pld_dominating_pair, pld_refusal

SPREAD = ((1, 4), (2, 4), (4, 4), (10, 4), (10, 6), (30, 4), (30, 5), (100, 4), (300, 4.5))
"""(s, A): noise scale in lattice steps and cut, from the theorem's edge (s = 1, A = 4) upwards."""
EXTRA = 60
"""How far past the cut Y the tail increments are computed."""
_DIGITS = 30
"""Significant digits kept in the smallest tail probability."""


# ------------------------------------------------------------------------------- the cut law, exactly


class CutLaw:
    """The theorem's cut law X' (module docstring of ``lattice_gdp``, item (i)) in mpmath, at a working
    precision fixed at construction: weights w, Z' and the upper tail S'(y) = P(X' > y)."""

    def __init__(self, s: float, a: float, extra: int = EXTRA) -> None:
        self.s_float, self.a, self.extra = float(s), float(a), extra
        self.cut = math.ceil(a * s)
        x_y = (2 * self.cut + 1) / (2.0 * s * s)
        # -log10 of S'(Y + extra) (up to the log of Z' / (s sqrt(2 pi)) in [0, 1e-3]): size the precision
        depth = self.cut**2 / (2.0 * s * s) + (extra + 1) * x_y + math.log(s * math.sqrt(2 * math.pi))
        self.dps = _DIGITS + 10 + math.ceil((depth - math.log(-math.expm1(-x_y))) / math.log(10))
        with mp.workdps(self.dps):
            self.s = mp.mpf(s)
            self.rho = mp.exp(-mp.mpf(2 * self.cut + 1) / (2 * self.s**2))
            self.centre = [mp.exp(-(mp.mpf(y) ** 2) / (2 * self.s**2)) for y in range(self.cut + 1)]
            self.tail = self.centre[-1] * self.rho / (1 - self.rho)  # W / 2: sum of w over y > Y
            self.central_sum = self.centre[0] + 2 * mp.fsum(self.centre[1:])
            self.norm = self.central_sum + 2 * self.tail  # Z'

    def log_w(self, y: int) -> mp.mpf:
        """log w(y) for any integer y (closed form; symmetric)."""
        with mp.workdps(self.dps):
            t = abs(y)
            if t <= self.cut:
                return -(mp.mpf(t) ** 2) / (2 * self.s**2)
            return -(mp.mpf(self.cut) ** 2) / (2 * self.s**2) + (t - self.cut) * mp.log(self.rho)

    def upper(self, top: int) -> list[mp.mpf]:
        """S'(y) = P(X' > y) for y = 0 .. top (top >= Y)."""
        with mp.workdps(self.dps):
            out = [mp.mpf(0)] * (top + 1)
            acc = self.tail
            for y in range(self.cut, -1, -1):  # acc = sum of w over x > y
                out[y] = acc / self.norm
                acc += self.centre[y]
            for y in range(self.cut, top + 1):
                out[y] = self.centre[-1] * self.rho ** (y - self.cut + 1) / ((1 - self.rho) * self.norm)
            return out

    def lower(self, y: int) -> mp.mpf:
        """F'(-y - 1) = P(X' <= -y - 1), summed over the NEGATIVE support from log_w (no symmetry used)."""
        with mp.workdps(self.dps):
            depth = self.cut + self.extra + 5
            finite = mp.fsum(mp.exp(self.log_w(x)) for x in range(-depth, -y))
            beyond = mp.exp(self.log_w(-depth)) * self.rho / (1 - self.rho)
            return (finite + beyond) / self.norm

    def quantiles(self) -> list[mp.mpf]:
        """g(y) = Phi^-1(F'(y)) = Q^-1(S'(y)) for y = 0 .. Y + extra."""
        with mp.workdps(self.dps):
            return [mp.sqrt(2) * mp.erfinv(1 - 2 * p) for p in self.upper(self.cut + self.extra)]

    def scaled_increments(self) -> list[mp.mpf]:
        """s inc(y) for y = 0 .. Y + extra, inc(0) = g(0) - g(-1) = 2 g(0) (symmetry, item (iii))."""
        g = self.quantiles()
        with mp.workdps(self.dps):
            return [self.s * 2 * g[0]] + [self.s * (g[y] - g[y - 1]) for y in range(1, len(g))]


def _tail_bound(s: float, a: float) -> float:
    """Item (v) of the theorem: s inc(y) <= (A + 3/(2s)) / (A - 1/(A (A^2 + 1))) for y >= Y + 1."""
    return (a + 1.5 / s) / (a - 1.0 / (a * (a * a + 1.0)))


@pytest.mark.parametrize(("s", "a"), SPREAD)
def test_the_cut_law_meets_the_increment_bound_exactly(s: float, a: float) -> None:
    """Items (i), (iii)-(v): X' is log-concave (so MLR, so the optimal tests are thresholds), g is
    antisymmetric, every increment of g is at most inflation / s (centre and tail separately), and
    hence the shift-m pair is ((1 + eta) m / s)-GDP, checked for m = 1, 2, 3 directly."""
    law = CutLaw(s, a)
    bound = lattice_gdp(s, a).inflation
    cut = law.cut
    with mp.workdps(law.dps):
        tiny = mp.mpf(10) ** (-law.dps + 15)
        # (i) log-concave, hence monotone likelihood ratio for every shift
        logs = {y: law.log_w(y) for y in range(-cut - EXTRA, cut + EXTRA + 1)}
        for y in range(-cut - EXTRA + 1, cut + EXTRA):
            assert logs[y - 1] + logs[y + 1] - 2 * logs[y] <= tiny, y
        for m in (1, 2, 3):
            ratios = [logs[y - m] - logs[y] for y in range(-cut - EXTRA + m, cut + EXTRA + 1)]
            assert all(b >= r - tiny for r, b in zip(ratios, ratios[1:])), m
        # (i) w >= the Gaussian weight everywhere, so Z' >= Z
        assert all(logs[y] >= -(mp.mpf(y) ** 2) / (2 * law.s**2) - tiny for y in logs)

        g = law.quantiles()
        for y in sorted({0, 1, cut // 2, cut - 1, cut, cut + 1, cut + EXTRA // 2}):  # g(-y-1) = -g(y)
            g_neg = mp.sqrt(2) * mp.erfinv(2 * law.lower(y) - 1)
            assert abs(g_neg + g[y]) <= mp.mpf(10) ** -_DIGITS * max(1, abs(g[y])), y

        inc = law.scaled_increments()
        centre, tail = max(inc[: cut + 1]), max(inc[cut + 1 :])
        assert 1 < centre <= bound, (centre, bound)
        assert tail <= _tail_bound(s, a) <= bound, (tail, _tail_bound(s, a), bound)
        # (v): the tail increments decrease, so the ones computed bound every y > Y + EXTRA too
        assert all(b <= c + tiny for c, b in zip(inc[cut + 1 :], inc[cut + 2 :]))

        # (iii) directly: s (g(y) - g(y - m)) <= m (1 + eta), with g(-y - 1) = -g(y)
        def g_at(y: int) -> mp.mpf:
            return g[y] if y >= 0 else -g[-y - 1]

        for m in (1, 2, 3):
            worst = max(law.s * (g_at(y) - g_at(y - m)) for y in range(-cut - EXTRA + m, cut + EXTRA + 1))
            assert worst <= m * bound, (m, worst)


@pytest.mark.parametrize(("s", "a"), ((30, 4), (100, 4), (300, 4.5), (1000, 4)))
def test_the_sharper_centre_bound_holds_exactly(s: float, a: float) -> None:
    """Item (iv'), checked on its own (the inflation is often decided by (v), which would hide an
    error in it): the exact centre increments of the cut law are at most the midpoint/trapezoid bound,
    which applies here and is far below (iv)'s ~exp(A/s)."""
    law = CutLaw(s, a, extra=2)
    kappa = 2.0 * math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi) / a  # theta_s is ~0 for s >= 30
    sharper = lattice_gdp_mod._midpoint_centre(float(s), float(a), kappa)
    assert sharper is not None and sharper < math.exp(a / s)
    with mp.workdps(law.dps):
        centre = max(law.scaled_increments()[: law.cut + 1])
    assert 0.99 < centre <= sharper, (centre, sharper)


# --------------------------------------------------------------------------------- total variation


@pytest.mark.parametrize(("s", "a"), ((1, 4), (4, 4), (10, 6), (30, 5), (100, 4), (300, 4.5)))
def test_exact_total_variation_to_the_real_noise_is_within_tail_tv(s: float, a: float) -> None:
    """Item (vii): TV(N_Z(0, s^2), X') <= tail_tv = 4 phi(A) / A, by exact sums; and item (ii):
    Z (direct sum) equals the Poisson-summation form and Z' / (s sqrt(2 pi)) <= 1 + kappa."""
    law = CutLaw(s, a, extra=0)
    gdp = lattice_gdp(s, a)
    with mp.workdps(law.dps):
        reach = law.cut + math.ceil(40 * s)  # N_Z mass beyond: < exp(-800) relative
        gauss = [mp.exp(-(mp.mpf(y) ** 2) / (2 * law.s**2)) for y in range(reach + 1)]
        z_real = gauss[0] + 2 * mp.fsum(gauss[1:])
        poisson = (
            law.s
            * mp.sqrt(2 * mp.pi)
            * mp.fsum(mp.exp(-2 * mp.pi**2 * law.s**2 * n**2) for n in range(-3, 4))
        )
        assert abs(z_real / poisson - 1) < mp.mpf(10) ** -_DIGITS
        kappa = 2 * mp.exp(-2 * mp.pi**2 * law.s**2) / (1 - mp.exp(-2 * mp.pi**2 * law.s**2)) + 2 * mp.npdf(
            a
        ) / mp.mpf(a)
        assert z_real <= law.norm <= law.s * mp.sqrt(2 * mp.pi) * (1 + kappa)
        # L1 distance point by point over |y| <= reach, plus X''s geometric mass beyond reach (N_Z's
        # mass there is < exp(-800)); with both laws normalised, TV = L1 / 2 = sum of (p - p')_+
        diffs = [gauss[y] / z_real - mp.exp(law.log_w(y)) / law.norm for y in range(reach + 1)]
        beyond = mp.exp(law.log_w(reach + 1)) / ((1 - law.rho) * law.norm)
        l1 = abs(diffs[0]) + 2 * mp.fsum(abs(d) for d in diffs[1:]) + 2 * beyond
        tv = max(diffs[0], 0) + 2 * mp.fsum(max(d, 0) for d in diffs[1:])
        assert abs(tv / (l1 / 2) - 1) < mp.mpf(10) ** -20
        assert all(d > 0 for d in diffs[: law.cut + 1])  # Z' >= Z: the cut law is lighter up to Y
        assert 0 < tv <= gdp.tail_tv, (tv, gdp.tail_tv)


# ------------------------------------------------------------------------------ necessity / mutation


@pytest.mark.parametrize("s", (2, 5, 10))
def test_the_real_discrete_gaussian_needs_an_inflation(s: float) -> None:
    """eta = 0 would be wrong: N_Z(0, s^2) has s (g(0) - g(-1)) = 2 s g(0) = 1 + 1/(24 s^2) + O(s^-4)
    > 1 (F(0) = 1/2 + p(0)/2; Phi^-1(1/2 + u) = sqrt(2 pi) (u + (pi/3) u^3 + ...)), and the cut law
    (which agrees with it near 0) makes a claimed inflation of 1.0 fail the check above."""
    with mp.workdps(40):
        big_s = mp.mpf(s)
        z_real = (
            big_s
            * mp.sqrt(2 * mp.pi)
            * mp.fsum(mp.exp(-2 * mp.pi**2 * big_s**2 * n**2) for n in range(-3, 4))
        )
        centre = 2 * big_s * mp.sqrt(2) * mp.erfinv(1 / z_real)  # 2 s Phi^-1(1/2 + p(0)/2)
        excess = centre - 1
        assert excess > 0
        assert abs(24 * big_s**2 * excess - 1) < 0.5 / s**2, excess
    law = CutLaw(s, 4)
    worst = max(law.scaled_increments())
    assert worst > 1.0  # a claimed inflation of 1.0 FAILS the increment check
    assert worst <= lattice_gdp(s, 4).inflation


def test_dp_accounting_sees_the_discrete_gaussian_above_the_float_one() -> None:
    """The oracle agrees: at s = 3, shift m = 3, the discrete Gaussian's epsilon exceeds the float
    Gaussian's at z = s / m by far more than the discretisation, so a bound at multiplier s / m (eta = 0)
    would undercut it; ours (multiplier s / ((1 + eta) m), below s / (2m) here) does not."""
    s, m, q, t, delta = 3.0, 3, 1.0, 1, 1e-5
    disc = _discrete_oracle(s, m, q, t, delta)
    flt = pld_mod._epsilon(q, s / m, t, delta, DISCRETISATION)
    assert disc > flt + 0.01, (disc, flt)
    pair = _lattice_1d(s, m, q)
    # ours is evaluated at z0 / 2 > its own z (a lower bound of it: see the random-profile test)
    assert pair.noise_multiplier < s / (2 * m)
    assert pld_mod._epsilon(q, s / (2 * m), t, delta, DISCRETISATION, pair.tail_tv) >= disc


# ---------------------------------------------------------------------------- the dp-accounting oracle


def _discrete_oracle(s: float, m: int, q: float, queries: int, delta: float) -> float:
    """dp-accounting's pessimistic (connect-the-dots) PLD of the Poisson-subsampled discrete Gaussian,
    self-composed: an upper estimate of the true epsilon of the 1-dim lattice mechanism."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    one = pld_lib.from_discrete_gaussian_mechanism(
        sigma=s,
        sensitivity=m,
        sampling_prob=q,
        pessimistic_estimate=True,
        value_discretization_interval=DISCRETISATION,
        use_connect_dots=True,
    )
    return float(one.self_compose(queries).get_epsilon_for_delta(delta))


_pld_cut = pld_mod.lattice_cut
"""The cut pld's ``_lattice_pair`` chooses at dimension d (pld module docstring, item 4)."""


def _lattice_1d(s: float, m: int, q: float) -> pld_mod.GaussianPair:
    """pld's own lattice pair for ONE coordinate with integer shift m: sigma = s 2^k and a profile
    sensitivity (m - 1) 2^k, so the widened sensitivity is m 2^k (both exact in binary)."""
    k = DEFAULT_LATTICE_EXPONENT
    pair = pld_mod._lattice_pair(q, math.ldexp(s, k), math.ldexp(m - 1, k), 1)
    gdp = lattice_gdp(s, _pld_cut(1))
    assert pair.noise_multiplier == pytest.approx(s / (gdp.inflation * m), rel=1e-14)
    assert pair.noise_multiplier < s / (gdp.inflation * m)  # rounded down
    assert pair.tail_tv == gdp.tail_tv
    return pair


def test_never_below_the_exact_discrete_gaussian_pld_on_24_random_profiles() -> None:
    """Ours (pld's lattice pair at d = 1: the subsampled Gaussian at z = s / ((1 + eta) m), asked for
    delta (1 - TAIL_SHARE), cut A from ``choose_cut`` as in pld) >= dp-accounting's discrete PLD.

    Neighbouring relation: ``from_discrete_gaussian_mechanism`` with q < 1 builds both the REMOVE
    pair (q mu(x + m) + (1 - q) mu(x) vs mu) and the ADD pair (mu vs q mu(x - m) + (1 - q) mu(x)) and
    reports the worse: Poisson subsampling under add/remove-one, exactly the relation of our
    ``GaussianPair`` (``ADD_OR_REMOVE_ONE``); at q = 1 the two coincide. Its noise is truncated where the
    outside mass is <= 1e-30 (a delta change <= ~1e-27 at these T, far below delta >= 1e-8).

    Where 1 + eta > 2 (s below ~29 at d = 1, where A ~ 19.8 and 1 + eta ~ exp(A / s)), ours is
    evaluated at z0 / 2 = s / (2m) instead of at its own, smaller z: the subsampled Gaussian pair at a
    larger multiplier is a post-processing of the one at a smaller (add independent noise), so that
    value is a LOWER bound of ours (and the PLD at z ~ 0.002 would need tens of GiB)."""
    rng = np.random.default_rng(1717)
    clamped = 0
    for _ in range(24):
        s, m = float(rng.uniform(3, 60)), int(rng.integers(1, 4))
        q, t, delta = (
            float(rng.uniform(0.01, 1.0)),
            int(rng.integers(1, 301)),
            float(10 ** rng.uniform(-8, -4)),
        )
        pair = _lattice_1d(s, m, q)
        z0 = s / m
        z = max(pair.noise_multiplier, z0 / 2)
        clamped += z > pair.noise_multiplier
        ours = pld_mod._epsilon(q, z, t, delta, DISCRETISATION, pair.tail_tv)
        disc = _discrete_oracle(s, m, q, t, delta)
        flt = pld_mod._epsilon(q, z0, t, delta, DISCRETISATION)
        assert ours >= disc, (s, m, q, t, delta, ours, disc)
        assert ours >= flt, (s, m, q, t, delta, ours, flt)
    assert 6 <= clamped <= 18  # both kinds are exercised


@pytest.mark.parametrize("s", (1e3, 1e4, 52428.8))
def test_the_lattice_costs_little_at_large_scale(s: float) -> None:
    """At large s the lattice bound is close to the float PLD at z0 = s / m: measured
    (eps_ours / eps_float - 1) / eta in [1.18, 1.37] for these (q, T) (eta = 7.7e-4, 1.4e-5, 8.0e-6);
    checked <= 1.5 eta, and >= 0. At s = 1000 the exact discrete oracle sits below ours too."""
    m = round(s / 2)
    for q, t in ((0.1, 100), (1.0, 10), (0.01, 1000)):
        pair = _lattice_1d(s, m, q)
        eta = s / (m * pair.noise_multiplier) - 1
        ours = pld_mod._epsilon(q, pair.noise_multiplier, t, 1e-6, DISCRETISATION, pair.tail_tv)
        flt = pld_mod._epsilon(q, s / m, t, 1e-6, DISCRETISATION)
        assert 0 < eta < 25 / s
        assert flt <= ours <= flt * (1 + 1.5 * eta), (q, t, ours, flt, eta)
        if s == 1e3:
            assert _discrete_oracle(s, m, q, t, 1e-6) <= ours


# -------------------------------------------------------------------------------------- validation


def test_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"s >= 1.0 lattice steps; found 0.5"):
        lattice_gdp(0.5, 5)
    with pytest.raises(ValueError, match=r"cut A must be finite and >= 4.0; found 3"):
        lattice_gdp(10, 3)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="found"):
            lattice_gdp(bad, 5)
        with pytest.raises(ValueError, match="found"):
            lattice_gdp(10, bad)
    assert lattice_gdp(1, 4).inflation > lattice_gdp(2, 4).inflation > lattice_gdp(100, 4).inflation > 1


def test_the_inflation_decreases_and_the_multiplier_increases_with_sigma() -> None:
    """Item (v)'s closing claim, on which PLD calibration's bisection relies: at a fixed cut the
    inflation 1 + eta is non-increasing in s (including where the sharper centre bound (iv') starts
    to apply), and the lattice pair's multiplier sigma / ((1 + eta) Delta_w) strictly increases with
    sigma, from one lattice step to sigma = 1, at d = 512 and d = 1280."""
    for a in (4.0, _pld_cut(1), _pld_cut(512)):
        scales = np.geomspace(1.0, 1e6, 400)
        inflations = [lattice_gdp(float(s), a).inflation for s in scales]
        assert all(b <= x for x, b in zip(inflations, inflations[1:])), a
    k = DEFAULT_LATTICE_EXPONENT
    for dimension in (512, 1280):
        multipliers = []
        for sigma in np.geomspace(math.ldexp(1.0, k), 1.0, 300):
            pair = pld_dominating_pair(Profile(k=23, q=0.01, sigma=float(sigma), lam=1.0), dimension)
            assert pair is not None
            multipliers.append(pair.noise_multiplier)
        assert all(b > x for x, b in zip(multipliers, multipliers[1:])), dimension


def test_choose_cut_is_the_smallest_grid_cut_and_monotone() -> None:
    cuts = []
    for allowance in np.linspace(0.0, -400.0, 81):
        cut = choose_cut(float(allowance))
        assert cut_tail_log(cut) <= allowance
        assert cut == MIN_CUT or cut_tail_log(cut - 1 / 16) > allowance  # smallest on the grid
        assert (cut - MIN_CUT) * 16 == int((cut - MIN_CUT) * 16)
        cuts.append(cut)
    assert cuts[0] == MIN_CUT and all(b >= a for a, b in zip(cuts, cuts[1:])) and cuts[-1] > cuts[0]
    assert 19 < _pld_cut(1) < _pld_cut(512) < 21


def test_a_profile_below_one_lattice_step_has_no_pair() -> None:
    below = Profile(k=23, q=0.01, sigma=2.0**-21, lam=1.0)
    assert pld_dominating_pair(below, 512) is None
    reason = pld_refusal(hardened_dimension=512, profile=below)
    assert reason is not None and "4.76837158203125e-07" in reason
    assert pld_dominating_pair(Profile(k=23, q=0.01, sigma=2.0**-20, lam=1.0), 512) is not None  # s = 1


# ------------------------------------------------------------------------------------- end to end


def test_reference_profile_end_to_end() -> None:
    """SPEC §4 reference profile at d = 512: the lattice admits 1453 queries (golden), the float PLD
    1455: the exact lattice noise costs 0.14 % of the queries."""
    reference = Profile(k=23, q=0.01, sigma=0.05, lam=1.0)
    lattice = max_queries_pld(epsilon=9.44, delta=2e-5, profile=reference, hardened_dimension=512)
    flt = max_queries_pld(epsilon=9.44, delta=2e-5, profile=reference)
    assert lattice == 1453 and flt == 1455
    assert lattice is not None and flt is not None and 1400 <= lattice <= flt
