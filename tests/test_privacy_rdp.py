"""RDP of the Poisson-subsampled Gaussian against independent oracles and golden values.

Oracles (test-only dependencies): dp-accounting's RdpAccountant with a PoissonSampledDpEvent of a
GaussianDpEvent, Opacus' ``compute_rdp``, and a direct high-precision numerical integration of
A_a = E_{x~N(0,z^2)}[(1 - q + q exp((2x-1)/(2z^2)))^a] with mpmath.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from opacus.accountants.analysis import rdp as opacus_rdp

from dprdm.privacy import (
    DEFAULT_ORDERS,
    OPACUS_ORDERS,
    Profile,
    RdpAccountant,
    RetrievalEvent,
    SubsampledGaussianEvent,
    epsilon_from_rdp,
    rdp_subsampled_gaussian,
)

INTEGER_ORDERS = [a for a in DEFAULT_ORDERS if float(a).is_integer()]
FRACTIONAL_ORDERS = [a for a in DEFAULT_ORDERS if not float(a).is_integer()]


def _random_grid(n: int, seed: int) -> list[tuple[float, float, int, float]]:
    """(q, noise multiplier, T, delta) points: q log-uniform in [1e-4, 1], z log-uniform in [0.05, 100]."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        q = float(min(1.0, 10 ** rng.uniform(-4, 0)))
        z = float(10 ** rng.uniform(math.log10(0.05), 2))
        t = int(10 ** rng.uniform(0, 5))
        delta = float(10 ** rng.uniform(-10, -3))
        points.append((q, z, t, delta))
    return points


def _dp_accounting_rdp(q: float, z: float, t: int, orders: list[float]) -> np.ndarray:
    acc = dp_rdp.RdpAccountant(orders=orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
    return np.asarray(acc._rdp, dtype=np.float64)  # the composed curve (no public getter)


@pytest.mark.parametrize("point", _random_grid(200, seed=20261123))
def test_integer_orders_match_dp_accounting_and_opacus(point: tuple[float, float, int, float]) -> None:
    q, z, t, delta = point
    orders = [a for a in INTEGER_ORDERS if a <= 256]
    ours = t * rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=orders)
    dpa = _dp_accounting_rdp(q, z, t, orders)
    opa = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=t, orders=orders), dtype=np.float64)
    assert np.all(np.isfinite(ours))
    # Both oracles evaluate log(A_a) with A_a = 1 + tiny in double precision, so their per-query
    # value carries an absolute error of a few 1e-16 (cancellation); ours sums A_a - 1 directly
    # (exact to ~1e-16 relative, checked against mpmath below). Tolerance: 1e-6 relative, plus
    # the oracles' own absolute floor of 1e-15 per composed query.
    np.testing.assert_allclose(ours, dpa, rtol=1e-6, atol=1e-15 * t)
    np.testing.assert_allclose(ours, opa, rtol=1e-6, atol=1e-15 * t)
    # The conversion is Balle et al. 2020 Thm 21 plus the Bretagnolle-Huber TV shortcut
    # (epsilon = 0 when delta^2 > 1 - exp(-R)), exactly dp-accounting's compute_epsilon.
    # Opacus' get_privacy_spent has Thm 21 only: equal to ours unless the shortcut applies.
    ours_eps = epsilon_from_rdp(ours, orders, delta).epsilon
    acc = dp_rdp.RdpAccountant(orders=orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
    assert ours_eps == pytest.approx(acc.get_epsilon(delta), rel=1e-6, abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the optimum is at the grid's edge
        opacus_eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=opa, delta=delta)
    if ours_eps > 0:
        assert ours_eps == pytest.approx(opacus_eps, rel=1e-6, abs=1e-9)
    else:
        assert delta**2 + math.expm1(-float(ours.min())) >= 0


def _exact_integer_rdp(q: float, z: float, order: int) -> float:
    """The integer-order binomial sum evaluated at 60 digits (no cancellation problem)."""
    mpmath.mp.dps = 60
    qm, zm = mpmath.mpf(q), mpmath.mpf(z)
    total = mpmath.fsum(
        mpmath.binomial(order, i) * (1 - qm) ** (order - i) * qm**i * mpmath.exp(mpmath.mpf(i * i - i) / (2 * zm * zm))
        for i in range(order + 1)
    )
    return float(mpmath.log(total) / (order - 1))


@pytest.mark.parametrize("point", _random_grid(30, seed=99))
def test_integer_orders_match_high_precision_sum(point: tuple[float, float, int, float]) -> None:
    q, z, _t, _delta = point
    for order in (2, 3, 7, 32, 256):
        ours = float(rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=[order])[0])
        assert ours == pytest.approx(_exact_integer_rdp(q, z, order), rel=1e-10, abs=1e-300)


def _integrated_rdp(q: float, z: float, order: float) -> float:
    """Direct numerical integration of A_a at 50 digits (independent of any series)."""
    mpmath.mp.dps = 50
    qm, zm, am = mpmath.mpf(q), mpmath.mpf(z), mpmath.mpf(order)

    def integrand(x: mpmath.mpf) -> mpmath.mpf:
        return mpmath.npdf(x, 0, zm) * ((1 - qm) + qm * mpmath.exp((2 * x - 1) / (2 * zm * zm))) ** am

    z0 = zm * zm * mpmath.log(1 / qm - 1) + mpmath.mpf("0.5") if q < 1 else mpmath.mpf(0)
    points = sorted({-mpmath.inf, -12 * zm, 0, mpmath.mpf("0.5"), z0, am, 12 * zm + am, mpmath.inf})
    a_val = mpmath.quad(integrand, points)
    return float(mpmath.log(a_val) / (am - 1))


def _fractional_grid() -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(7)
    pts = [(0.01, 0.575, 2.5), (0.04, 1.5, 3.3), (0.5, 0.3, 1.05), (0.01, 0.05, 2.5), (0.3, 5.0, 10.75)]
    for _ in range(20):
        q = float(10 ** rng.uniform(-3, math.log10(0.9)))
        z = float(10 ** rng.uniform(math.log10(0.3), 1.3))
        pts.append((q, z, float(rng.choice(FRACTIONAL_ORDERS))))
    return pts


@pytest.mark.parametrize("q,z,order", _fractional_grid())
def test_fractional_orders_match_numerical_integration(q: float, z: float, order: float) -> None:
    ours = float(rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=[order])[0])
    ref = _integrated_rdp(q, z, order)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-12)
    # The series plus its remainder bound is an upper bound: never below the true value.
    assert ours >= ref - 1e-15 - 1e-12 * ref


def test_fractional_known_disagreement_between_libraries() -> None:
    """Issue 2: q 0.01, multiplier 0.575, order 2.5: Opacus 0.0033514 (exact), dp-accounting 0.0033713."""
    ours = float(rdp_subsampled_gaussian(q=0.01, noise_multiplier=0.575, orders=[2.5])[0])
    assert ours == pytest.approx(0.0033514, abs=5e-8)
    assert _dp_accounting_rdp(0.01, 0.575, 1, [2.5])[0] == pytest.approx(0.0033713, abs=5e-8)


@pytest.mark.parametrize(
    "sigma,q,k,t,delta,eps,order",
    [
        (0.2, 0.01, 18, 1000, 1e-7, 1.00, 25.0),
        (0.05, 0.01, 23, 1000, 2e-5, 9.44, 2.5),
        (0.05, 1.0, 20, 1, 1 / 82800, 10.64, None),
    ],
)
def test_spec_golden_values(sigma: float, q: float, k: int, t: int, delta: float, eps: float, order: float | None) -> None:
    acc = RdpAccountant().compose(RetrievalEvent(Profile(k=k, q=q, sigma=sigma, lam=1.0)), t)
    res = acc.get_epsilon_and_order(delta)
    assert round(res.epsilon, 2) == eps
    if order is not None:
        assert res.order == order


def test_spec_golden_integer_orders_only_is_looser() -> None:
    acc = RdpAccountant(INTEGER_ORDERS).compose(RetrievalEvent(Profile(k=23, q=0.01, sigma=0.05, lam=1.0)), 1000)
    assert round(acc.get_epsilon(2e-5), 2) == 11.39


def test_opacus_golden_value() -> None:
    """Opacus' own test: multiplier 1.5, q 0.04, 2250 steps, delta 1e-5."""
    on_opacus_grid = RdpAccountant(OPACUS_ORDERS).compose(SubsampledGaussianEvent(0.04, 1.5), 2250)
    assert round(on_opacus_grid.get_epsilon(1e-5), 4) == 7.3291
    on_integers = RdpAccountant([float(a) for a in range(2, 257)]).compose(SubsampledGaussianEvent(0.04, 1.5), 2250)
    assert round(on_integers.get_epsilon(1e-5), 4) == 7.3299


@pytest.mark.parametrize("q", [1e-9, 1e-4, 0.01, 0.3, 0.5, 0.7, 0.999999, 1.0])
@pytest.mark.parametrize("z", [0.05, 0.1, 1.0, 10.0, 100.0])
def test_stable_over_the_whole_range(q: float, z: float) -> None:
    curve = rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=[a for a in DEFAULT_ORDERS if a <= 256])
    assert not np.isnan(curve).any()
    assert np.all(np.isfinite(curve))
    assert np.all(curve >= 0)
    # RDP is non-decreasing in the order (Mironov 2017, Prop. 9); allow float noise and the
    # fractional series' floating-point safety margin (~1e-13 absolute near order 1).
    assert np.all(np.diff(curve) >= -1e-9 * curve[1:] - 1e-12)


def test_infinite_and_zero_edges() -> None:
    assert np.all(np.isinf(rdp_subsampled_gaussian(q=0.1, noise_multiplier=0.0, orders=DEFAULT_ORDERS)))
    assert np.all(rdp_subsampled_gaussian(q=0.0, noise_multiplier=0.0, orders=DEFAULT_ORDERS) == 0.0)
    q1 = rdp_subsampled_gaussian(q=1.0, noise_multiplier=2.0, orders=DEFAULT_ORDERS)
    np.testing.assert_allclose(q1, np.asarray(DEFAULT_ORDERS) / 8.0)
    acc = RdpAccountant().compose(RetrievalEvent(Profile(k=4, q=0.1, sigma=0.0, lam=1.0)))
    eps = acc.get_epsilon(1e-6)
    assert math.isinf(eps) and not math.isnan(eps)


@pytest.mark.parametrize(
    "q,z,limit",
    [
        (0.5, 1e160, "tiny"),  # z^2 overflows; z0 = inf * log(1) = NaN in the series
        (0.01, 1e300, "tiny"),
        (1.0, 1e160, "tiny"),
        (0.2, 5e-324, "inf"),  # z^2 underflows to 0
        (0.5, 1e-160, "inf"),
        (1.0, 5e-324, "inf"),
    ],
)
def test_extreme_noise_is_never_nan(q: float, z: float, limit: str) -> None:
    """Issue 12 item 7: inf where the true value is beyond every float, else the correct limit
    (a positive value at most a / (2 z^2), never 0 for a released mechanism)."""
    orders = np.asarray(DEFAULT_ORDERS)
    with np.errstate(all="raise"):
        curve = rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=orders)
    assert not np.isnan(curve).any()
    if limit == "inf":
        assert np.all(np.isinf(curve))
    else:
        bound = np.exp(np.log(orders) - math.log(2.0) - 2.0 * math.log(z))  # a / (2 z^2), no overflow
        assert np.all(curve > 0) and np.all(curve <= np.maximum(bound * (1 + 1e-9), 5e-324))


def test_series_never_above_the_gaussian_bound() -> None:
    """a / (2 z^2) bounds the subsampled curve at every q (quasi-convexity); the curve used is the min."""
    orders = np.asarray([a for a in DEFAULT_ORDERS if a <= 64])
    for q, z in [(0.9, 0.5), (0.5, 2.0), (0.99, 5.0), (0.01, 0.575)]:
        curve = rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=orders)
        assert np.all(curve <= orders / (2 * z * z))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"q": 1.5, "noise_multiplier": 1.0, "orders": [2.0]}, "q must be"),
        ({"q": float("nan"), "noise_multiplier": 1.0, "orders": [2.0]}, "q must be"),
        ({"q": 0.1, "noise_multiplier": -1.0, "orders": [2.0]}, "noise_multiplier"),
        ({"q": 0.1, "noise_multiplier": float("inf"), "orders": [2.0]}, "noise_multiplier"),
        ({"q": 0.1, "noise_multiplier": 1.0, "orders": [1.0]}, "orders"),
        ({"q": 0.1, "noise_multiplier": 1.0, "orders": []}, "orders"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rdp_subsampled_gaussian(**kwargs)


def test_own_logsumexp_is_scipys_bit_for_bit() -> None:
    """``rdp._logsumexp`` replaces SciPy's (its array-API dispatch was 70 % of a curve's time): on random
    arrays (ties at the maximum, -inf entries, signed and zero weights, 1 to 3,000 terms, scales 1e-3
    to 800) the value and sign are SciPy's exactly, and whole RDP curves are identical either way."""
    import scipy
    from scipy import special

    from dprdm.privacy import rdp as rdp_mod

    exact = tuple(int(p) for p in scipy.__version__.split(".")[:2]) >= (1, 15)  # older SciPy: another algorithm

    def same(x: float, y: float) -> bool:
        if math.isnan(x) or math.isnan(y):
            return math.isnan(x) and math.isnan(y)
        return x == y if exact else math.isclose(x, y, rel_tol=1e-14, abs_tol=1e-300)

    rng = np.random.default_rng(2026)
    for n in [*range(1, 40), 100, 513, 3000]:
        for _ in range(20):
            a = rng.normal(0.0, float(rng.choice([1e-3, 1.0, 30.0, 800.0])), n)
            if rng.random() < 0.3:
                a[rng.integers(n)] = a.max()  # a tie at the maximum
            if rng.random() < 0.1:
                a[rng.integers(n)] = -np.inf
            b = rng.choice([-1.0, 1.0, 0.0], n, p=[0.3, 0.6, 0.1])
            assert same(rdp_mod._logsumexp(a)[0], float(special.logsumexp(a))), (n, a)
            log_s, sign_s = special.logsumexp(a, b=b, return_sign=True)
            log_o, sign_o = rdp_mod._logsumexp(a, b)
            assert same(log_o, float(log_s)) and same(sign_o, float(sign_s)), (n, a, b)
    for a in ([-np.inf, -np.inf], [np.inf, 1.0], [1000.0, 1000.0], [-1e308, -1e308]):
        arr = np.array(a)
        assert same(rdp_mod._logsumexp(arr)[0], float(special.logsumexp(arr))), a

    def scipy_lse(a: np.ndarray, b: np.ndarray | None = None) -> tuple[float, float]:
        if b is None:
            return float(special.logsumexp(a)), 1.0
        log_s, sign_s = special.logsumexp(a, b=b, return_sign=True)
        return float(log_s), float(sign_s)

    cases = [(0.01, 0.5), (0.2, 1.7), (0.5, 8.0), (0.9, 0.3), (0.003, 25.0)]
    ours = [rdp_mod.log_a_fractional(q, z, a) for q, z in cases for a in (1.5, 7.25, 33.3)]
    ours_int = [rdp_mod.log_a_integer(q, z, a) for q, z in cases for a in (2, 9, 64)]
    real = rdp_mod._logsumexp
    try:
        rdp_mod._logsumexp = scipy_lse  # type: ignore[assignment]
        theirs = [rdp_mod.log_a_fractional(q, z, a) for q, z in cases for a in (1.5, 7.25, 33.3)]
        theirs_int = [rdp_mod.log_a_integer(q, z, a) for q, z in cases for a in (2, 9, 64)]
    finally:
        rdp_mod._logsumexp = real  # type: ignore[assignment]
    assert all(same(x, y) for x, y in zip(ours + ours_int, theirs + theirs_int, strict=True))
