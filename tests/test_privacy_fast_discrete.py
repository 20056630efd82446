"""The vectorised exact discrete Gaussian (issue 12 item 11): distribution, lattice, range, and every
float shortcut checked against exact rational arithmetic.

All draws use seeded generators (reproducible); goodness-of-fit tests use a p-value threshold of
1e-6, i.e. a false-failure rate of 1e-6 per test over seeds.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from dprdm.privacy import fast_discrete as fd
from dprdm.privacy.discrete import DEFAULT_LATTICE_EXPONENT, ExactSampler, OpenDPSampler, round_to_lattice
from dprdm.privacy.fast_discrete import FastExactSampler, lattice_scale

P_MIN = 1e-6


def _pmf(s: float, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact-enough pmf of N_Z(0, s^2) on [-half, half] (float64 weights, normalised over it; the
    mass beyond is below 1e-30 for half >= 12 s)."""
    x = np.arange(-half, half + 1)
    w = np.exp(-(x.astype(float) ** 2) / (2 * s * s))
    return x, w / w.sum()


def _chi2_pvalue(draws: np.ndarray, s: float, bins: int = 60) -> float:
    """Chi-square of integer draws against N_Z(0, s^2), cells merged to >= 20 expected counts
    (quantile cells of the exact pmf when the support is wide)."""
    half = int(math.ceil(12 * s)) + 12
    x, p = _pmf(s, half)
    assert np.abs(draws).max() <= half
    cdf = np.cumsum(p)
    # cell edges: quantiles of the exact pmf, so each cell has ~1/bins of the mass (or single points)
    cut = np.unique(np.searchsorted(cdf, np.linspace(0, 1, bins + 1)[1:-1]))
    cell_of_x = np.searchsorted(cut, np.arange(x.size), side="left")
    expected = np.bincount(cell_of_x, weights=p) * draws.size
    observed = np.bincount(cell_of_x[draws + half], minlength=expected.size)
    # merge sparse cells into their neighbour
    obs, exp, acc_o, acc_e = [], [], 0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 20:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o, acc_e = 0, 0.0
    obs[-1] += acc_o
    exp[-1] += acc_e
    return float(stats.chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue)


@pytest.mark.parametrize("s", [0.35, 0.7, 3.0, 12.5, 300.25, 52428.8])
def test_matches_the_exact_pmf(s: float) -> None:
    draws = FastExactSampler(np.random.default_rng(int(s * 16))).sample_integers(s, 200_000)
    assert draws.dtype == np.int64
    assert _chi2_pvalue(draws, s) > P_MIN


def test_smallest_scale_is_almost_surely_zero() -> None:
    """s = 2^-4: P(y != 0) = 2 exp(-128) / Z < 1e-55."""
    assert not FastExactSampler(np.random.default_rng(2)).sample_integers(0.0625, 100_000).any()


def test_variance_and_moments_match_the_exact_discrete_gaussian() -> None:
    s = 4.3
    x, p = _pmf(s, 200)
    var = float((x**2 * p).sum())  # slightly below s^2 (CKS20 Cor. 18); exact-enough by summation
    kurt = float((x**4 * p).sum()) / var**2
    draws = FastExactSampler(np.random.default_rng(3)).sample_integers(s, 400_000).astype(float)
    se = var * math.sqrt((kurt - 1) / draws.size)
    assert abs(draws.mean()) < 5.5 * math.sqrt(var / draws.size)
    assert abs(draws.var() - var) < 5.5 * se
    assert abs(stats.skew(draws)) < 5.5 * math.sqrt(6 / draws.size)


def test_agrees_with_the_rational_reference_sampler() -> None:
    """Two-sample tests against ExactSampler (CKS20 in Fractions, an independent implementation)."""
    s = 2.5
    ref = ExactSampler(np.random.default_rng(21))
    slow = np.array([ref.sample_integer(Fraction(s) ** 2) for _ in range(4000)])
    fast = FastExactSampler(np.random.default_rng(22)).sample_integers(s, 40_000)
    values = np.arange(-12, 13)
    table = np.array([[np.sum(slow == v) for v in values], [np.sum(fast == v) for v in values]])
    table = table[:, table.sum(axis=0) >= 10]
    assert stats.chi2_contingency(table).pvalue > P_MIN
    assert abs(slow.var() - fast.var()) < 6 * s * s * math.sqrt(2 / slow.size)


def test_agrees_with_opendp_on_moments() -> None:
    pytest.importorskip("opendp")
    sigma, d, k = 0.01, 512, DEFAULT_LATTICE_EXPONENT
    theirs = np.concatenate([OpenDPSampler().sample(sigma, d, k) for _ in range(20)])
    ours = FastExactSampler(np.random.default_rng(4)).sample_batch(sigma, d, 200, k).ravel()
    for z in (theirs, ours):
        assert abs(z.std() / sigma - 1) < 6 * math.sqrt(0.5 / z.size)
    assert stats.ks_2samp(theirs, ours).pvalue > P_MIN


def test_output_is_on_the_lattice_with_the_right_shape() -> None:
    fs = FastExactSampler(np.random.default_rng(5))
    batch = fs.sample_batch(0.05, 64, 10, DEFAULT_LATTICE_EXPONENT)
    assert batch.shape == (10, 64) and batch.dtype == np.float64
    assert np.array_equal(round_to_lattice(batch), batch)
    assert np.array_equal(np.ldexp(np.round(np.ldexp(batch, 20)), -20), batch)
    one = fs.sample(0.3, 7, -3)
    assert one.shape == (7,) and np.array_equal(round_to_lattice(one, -3), one)
    assert np.std(batch) == pytest.approx(0.05, rel=0.05)


def test_seeded_generator_is_reproducible() -> None:
    a = FastExactSampler(np.random.default_rng(9)).sample_batch(0.05, 32, 3, -20)
    b = FastExactSampler(np.random.default_rng(9)).sample_batch(0.05, 32, 3, -20)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "sigma,exponent,match",
    [
        (2.0e6, -20, r"sigma=2000000\.0, exponent=-20"),
        (1e-9, -20, r"sigma=1e-09"),
        (0.0, -20, r"sigma must be a finite number > 0; found 0\.0"),
        (-1.0, -20, r"found -1\.0"),
        (float("nan"), -20, r"found nan"),
        (float("inf"), -20, r"found inf"),
        (0.05, 2.5, r"exponent must be an integer .* found 2\.5"),
        (0.05, 99, r"found 99"),
    ],
)
def test_parameters_outside_the_supported_range_are_refused(sigma: float, exponent: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FastExactSampler(np.random.default_rng(0)).sample(sigma, 8, exponent)  # type: ignore[arg-type]


def test_range_edges_are_accepted() -> None:
    assert lattice_scale(2.0**20, -20) == 2.0**40
    assert lattice_scale(2.0**-24, -20) == 2.0**-4
    fs = FastExactSampler(np.random.default_rng(1))
    assert np.all(np.isfinite(fs.sample(2.0**20, 16, -20)))
    with pytest.raises(TypeError, match="Generator"):
        FastExactSampler(object())  # type: ignore[arg-type]


def test_float_decisions_agree_with_exact_rational_comparisons() -> None:
    """Item 2 of the proof: whenever the float shortcut decides [U < p], the exact rational
    comparison agrees, and n >= gamma always (adversarial a near s^2/t, near-integer gamma, far tails)."""
    rng = np.random.default_rng(17)
    checked = 0
    for s in (0.0625, 0.7, 1.0, 3.0, 12.5, 52428.8, 123456.789, 2.0**40):
        t = math.floor(s) + 1
        s2 = Fraction(s) ** 2
        c = s2 / t
        base = [int(c) + j for j in range(-3, 4)] + [int(c + Fraction(k) * Fraction(s)) for k in (1, 2, 5, 9, 30)]
        base += list(rng.integers(0, min(2**51, int(40 * s) + 2), size=40))
        a = np.array([x for x in base if 0 <= x < 2**52], dtype=np.int64)
        gamma_f = fd._gamma_float(a, s, t)
        n = np.floor(gamma_f * (1.0 + fd._N_SLACK) + fd._N_SLACK) + 1.0
        for i in range(a.size):
            gamma = fd._exact_gamma(int(a[i]), s2, t)
            assert abs(Fraction(float(gamma_f[i])) - gamma) <= Fraction(7, 2**53) * (gamma + 1)
            assert int(n[i]) >= gamma
            for k in (1, 2, 3, 7):
                p = gamma / (int(n[i]) * k)
                h_f = gamma_f[i : i + 1] / n[i : i + 1]  # as in fd._accept / fd._bernoulli_exp_h
                p_f = h_f / k if k > 1 else h_f
                centre = int(p * 2**32)
                ws = np.array(
                    [max(0, min(2**32 - 1, centre + d)) for d in (-3, -2, -1, 0, 1, 2)]
                    + list(rng.integers(0, 2**32, size=4)),
                    dtype=np.int64,
                )
                for w in ws:
                    yes, no = fd._decide_float(np.array([w]), p_f)
                    assert not (yes[0] and no[0])
                    if yes[0]:
                        assert Fraction(int(w) + 1, 2**32) <= p
                    if no[0]:
                        assert Fraction(int(w), 2**32) >= p
                    checked += 1
    assert checked > 10_000


def test_exact_fallback_paths_keep_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the rarely-taken exact branches (undecided float tests; 'huge' candidates) and
    check the output distribution is still exactly the discrete Gaussian."""
    monkeypatch.setattr(fd, "_MARGIN", 0.25)  # most float tests undecided: exact rational path
    draws = FastExactSampler(np.random.default_rng(31)).sample_integers(3.0, 6000)
    assert _chi2_pvalue(draws, 3.0) > P_MIN
    monkeypatch.setattr(fd, "_MARGIN", 2.0**-40)
    monkeypatch.setattr(fd, "_HUGE_V", 0)  # every candidate takes the unvectorised exact path
    draws = FastExactSampler(np.random.default_rng(32)).sample_integers(1.7, 4000)
    assert _chi2_pvalue(draws, 1.7) > P_MIN


@pytest.mark.parametrize("num,den", [(0, 5), (1, 1), (3, 7), (999, 1000), (1, 52430)])
def test_bernoulli_exp_ratio_frequency(num: int, den: int) -> None:
    rng = np.random.default_rng(num * 1000 + den)
    n = 200_000
    hits = int(fd._bernoulli_exp_ratio(rng, np.full(n, num, dtype=np.int64), den).sum())
    p = math.exp(-num / den)
    assert stats.binomtest(hits, n, p).pvalue > P_MIN if 0 < p < 1 else hits == n


def test_bernoulli_exp1_and_geometric() -> None:
    rng = np.random.default_rng(8)
    n = 400_000
    assert stats.binomtest(int(fd._bernoulli_exp1(rng, n).sum()), n, math.exp(-1)).pvalue > P_MIN
    v = fd._geometric_exp1(rng, n)  # P(V >= j) = e^-j
    for j in (1, 2, 4):
        assert stats.binomtest(int((v >= j).sum()), n, math.exp(-j)).pvalue > P_MIN
