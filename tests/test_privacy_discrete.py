"""Floating-point-safe release: exact discrete Gaussian on a lattice, its accounting, the pool."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, RdpAccountant, RetrievalEvent, profile_rdp
from dprdm.privacy.discrete import (
    DEFAULT_LATTICE_EXPONENT,
    ExactSampler,
    NoisePool,
    OpenDPSampler,
    hardened_rdp,
    release_hardened,
    round_to_lattice,
    widened_sensitivity,
)
from dprdm.privacy.rdp import rdp_subsampled_gaussian


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    w = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    return w / w.sum()


@pytest.mark.parametrize("sigma", [0.7, 3.0, 12.5])
def test_exact_sampler_matches_the_discrete_gaussian(sigma: float) -> None:
    """Chi-square goodness of fit of 6000 seeded draws against the exact pmf on Z."""
    sampler = ExactSampler(np.random.default_rng(11))
    draws = np.array([sampler.sample_integer(Fraction(sigma) ** 2) for _ in range(6000)])
    half = int(math.ceil(4 * sigma))
    support = np.arange(-half, half + 1)
    pmf = _discrete_gaussian_pmf(sigma, np.arange(-60 * half, 60 * half + 1))
    pmf_in = pmf[60 * half - half : 60 * half + half + 1]
    expected = np.append(pmf_in, 1 - pmf_in.sum()) * draws.size
    observed = np.append([(draws == s).sum() for s in support], (np.abs(draws) > half).sum())
    keep = expected >= 5  # merge sparse tails into the last cell
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_samples_lie_on_the_lattice_with_the_right_scale() -> None:
    sampler = ExactSampler(np.random.default_rng(5))
    noise = np.concatenate([sampler.sample(0.05, 64, DEFAULT_LATTICE_EXPONENT) for _ in range(20)])
    assert np.array_equal(round_to_lattice(noise), noise)
    assert np.std(noise) == pytest.approx(0.05, rel=0.06)


def test_opendp_sampler_is_exact_lattice_gaussian() -> None:
    pytest.importorskip("opendp")
    noise = np.concatenate([OpenDPSampler().sample(0.1, 256, -10) for _ in range(20)])
    assert np.array_equal(round_to_lattice(noise, -10), noise)
    # Kolmogorov-Smirnov against the continuous normal is adequate at 0.1 / 2^-10 ~ 100 lattice steps.
    assert stats.kstest(noise / 0.1, "norm").pvalue > 1e-4


def test_hardened_release_is_on_the_lattice_and_never_uses_float_noise() -> None:
    p = Profile(k=4, q=0.5, sigma=0.05, lam=0.7)
    rng = np.random.default_rng(3)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    x = rng.normal(size=(3, 16))
    noise = ExactSampler(np.random.default_rng(9)).sample(0.05, 16, DEFAULT_LATTICE_EXPONENT)
    noisy, out = release_hardened(p, query=u, selected=x, noise=noise)
    assert np.array_equal(round_to_lattice(noisy), noisy)
    np.testing.assert_array_equal(noisy - round_to_lattice((x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1)).sum(0) / 4), noise)
    np.testing.assert_allclose(out, 0.7 * noisy + 0.3 * u)
    with pytest.raises(ValueError, match="lattice"):
        release_hardened(p, query=u, selected=x, noise=noise + 1e-9)
    with pytest.raises(ValueError, match="k = 4"):
        release_hardened(p, query=u, selected=np.ones((5, 16)), noise=noise)


def _exact_discrete_rdp(q: float, s: float, m: int, order: float) -> float:
    """A_a for one coordinate: P = N_Z(0, s^2), Q = N_Z(m, s^2), mixture (1-q)P + qQ, by summation."""
    half = int(40 * s) + 40 * m + 40
    x = np.arange(-half, half + 1, dtype=float)
    log_p = -(x**2) / (2 * s * s)
    log_p -= np.logaddexp.reduce(log_p)
    log_ratio = (2 * x * m - m * m) / (2 * s * s)
    log_mix = np.logaddexp(math.log1p(-q), math.log(q) + log_ratio) if q < 1 else log_ratio
    return float(np.logaddexp.reduce(log_p + order * log_mix)) / (order - 1)


@pytest.mark.parametrize("q,s,m", [(0.1, 1.5, 2), (0.5, 3.0, 2), (1.0, 2.0, 3), (0.02, 0.8, 2), (0.3, 1.0, 3)])
def test_hardened_curve_bounds_the_exact_discrete_divergence(q: float, s: float, m: int) -> None:
    """Numerical check of the docstring's argument on a 1-D lattice with an integer shift m."""
    # A profile whose widened sensitivity is m lattice units and sigma s units: use exponent 0, d = 1.
    orders = [1.05, 1.5, 2.0, 2.5, 3.0, 4.75, 8.0, 16.0]
    prof = Profile(k=2 // (m - 1), q=q, sigma=s, lam=1.0)  # sensitivity 2/k = m - 1, widened by 2^0 to m
    assert widened_sensitivity(prof.sensitivity, 1, 0) == m
    for a in orders:
        exact = _exact_discrete_rdp(q, s, m, a)
        bound = float(hardened_rdp(prof, 1, [a], exponent=0)[0])
        assert bound >= exact - 1e-12
        cont = float(rdp_subsampled_gaussian(q=q, noise_multiplier=s / m, orders=[a])[0])
        if float(a).is_integer():
            assert exact <= cont + 1e-12  # item 4: integer orders bounded by the continuous value


def test_hardened_curve_vs_continuous() -> None:
    p = Profile(k=16, q=0.01, sigma=0.2, lam=1.0)
    hard = hardened_rdp(p, 512, DEFAULT_ORDERS)
    cont = profile_rdp(p)
    widen = widened_sensitivity(p.sensitivity, 512) / p.sensitivity
    assert 1.0 < widen < 1.001
    ints = np.array([float(a).is_integer() for a in DEFAULT_ORDERS])
    # Integer orders: the continuous curve at the widened sensitivity (slightly above the float one).
    np.testing.assert_allclose(hard[ints], rdp_subsampled_gaussian(q=0.01, noise_multiplier=0.2 / widened_sensitivity(2 / 16, 512), orders=np.array(DEFAULT_ORDERS)[ints]), rtol=1e-12)
    assert np.all(hard >= cont * (1 - 1e-12))
    # The epsilon cost of hardening stays small for this profile.
    e_hard = RdpAccountant().compose(RetrievalEvent(p, hardened_dimension=512), 1000).get_epsilon(1e-7)
    e_cont = RdpAccountant().compose(RetrievalEvent(p), 1000).get_epsilon(1e-7)
    assert e_cont <= e_hard <= e_cont * 1.2
    assert np.array_equal(Budget.single(1.0, 1e-7, p, hardened_dimension=512).charge(p, hardened_dimension=512), hard)


def test_noise_pool_serves_fresh_lattice_vectors() -> None:
    pool = NoisePool(ExactSampler(np.random.default_rng(1)), capacity=4)
    try:
        pool.prepare(0.05, 8)
        a, b = pool.take(0.05, 8), pool.take(0.05, 8)
        assert a.shape == (8,) and not np.array_equal(a, b)
        assert np.array_equal(round_to_lattice(a), a)
    finally:
        pool.close()
