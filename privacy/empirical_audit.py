"""Empirical privacy audit of the DP-RDM retrieval release (``dprdm privacy audit``).

Method (hypothesis-testing view of DP: P. Kairouz, S. Oh, P. Viswanath, "The Composition Theorem
for Differential Privacy", ICML 2015, Thm 2.1; used for auditing by M. Jagielski, J. Ullman,
A. Oprea, "Auditing Differentially Private Machine Learning", NeurIPS 2020, and M. Nasr et al.,
"Adversary Instantiation", IEEE S&P 2021): if a mechanism is (eps, delta)-DP, every test that
distinguishes D from D' with false-positive rate a and false-negative rate b satisfies
``a + e^eps b >= 1 - delta`` and ``b + e^eps a >= 1 - delta``. So

    eps >= max( log((1 - delta - a) / b), log((1 - delta - b) / a) ).

We run the REAL release code many times on D and on D' = D + one canary, compute a scalar test
statistic per run (the release projected on the canary direction), pick the threshold on the
first half of the runs and bound (a, b) from above on the second half with one-sided
Clopper-Pearson intervals (each at 1 - (1 - confidence)/2, a union bound), which makes the
reported epsilon a ``confidence``-level LOWER bound on the true epsilon.

Worst-case neighbours for retrieval: the query u is public; the canary is u itself (score 1) and
every other record is -u (score -1), so whenever the canary is sampled it is selected and it
displaces an antipodal record: the mean moves by exactly 2u/k, the sensitivity bound.

Noise (``noise=``): ``"float"`` audits :func:`dprdm.privacy.mechanism.release` (float Gaussian
noise from the audit's generator) against the float RDP curve; ``"discrete"`` audits the release
private indexes serve, :func:`dprdm.privacy.discrete.release_hardened` (the mean rounded to the
lattice 2^-20 Z^d plus EXACT discrete Gaussian noise, CKS20, drawn by
:class:`~dprdm.privacy.fast_discrete.FastExactSampler` from the same injected generator, each
vector used once, in order), against the server's discrete curve
(:func:`dprdm.privacy.accountant.retrieval_rdp` at ``hardened_dimension`` = the audit's dimension,
i.e. :func:`dprdm.privacy.discrete_rdp.hardened_rdp`). The statistic is the release projected on
the canary direction, so the dimension only changes the lattice widening 2^-20 sqrt(d) of the claim
and the cost of the noise.

Deliberately broken variants (must audit ABOVE their claim, showing the audit has power):
``sigma_halved`` (noise sigma/2, claim for sigma), ``sensitivity_1_over_k`` (claim computed with
multiplier sigma*k, i.e. as if the sensitivity were 1/k: the curve of the profile with noise
2 sigma), ``shared_coins`` (a batch of B queries
shares one subsample, claim = B independent queries; statistic summed over the batch),
``divide_by_found`` (sum divided by the number of survivors found instead of k, noise still
calibrated to the sensitivity 2/k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from .accountant import retrieval_rdp
from .conversion import epsilon_from_rdp
from .discrete import release_hardened
from .fast_discrete import FastExactSampler
from .lattice import DEFAULT_LATTICE_EXPONENT
from .mechanism import Profile, release
from .orders import DEFAULT_ORDERS

__all__ = [
    "VARIANTS",
    "NOISES",
    "AuditResult",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "claimed_epsilon",
    "worst_case_corpus",
    "audit_retrieval",
]

VARIANTS = ("correct", "sigma_halved", "sensitivity_1_over_k", "shared_coins", "divide_by_found")
NOISES = ("float", "discrete")
"""``float``: Gaussian noise in float64; ``discrete``: the hardened lattice release (module docstring)."""

# search(vectors, ids, query, k, q, rng) -> selected rows (m, d); the real subsampled k-NN.
SearchFn = Callable[[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64], int, float, np.random.Generator], npt.NDArray[np.float64]]


def clopper_pearson_upper(successes: int, trials: int, level: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial proportion at ``level`` (e.g. 0.975)."""
    if trials <= 0:
        raise ValueError(f"trials must be > 0; found {trials!r}")
    if successes >= trials:
        return 1.0
    return float(stats.beta.ppf(level, successes + 1, trials - successes))


def _eps_from_rates(a: float, b: float, delta: float) -> float:
    best = 0.0
    for num, den in ((1.0 - delta - a, b), (1.0 - delta - b, a)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
        elif num > 0 and den == 0:
            return math.inf
    return best


def epsilon_lower_bound(
    stat_without: npt.ArrayLike, stat_with: npt.ArrayLike, delta: float, confidence: float = 0.95
) -> tuple[float, float]:
    """Audited epsilon lower bound from test statistics on D (``without``) and D' (``with``).

    The threshold (predict D' when the statistic exceeds it) is chosen on the first half of each
    sample by the point estimate; the bound uses the second half with Clopper-Pearson upper
    bounds on both error rates.

    Returns:
        ``(lower_bound, threshold)``.
    """
    s0 = np.asarray(stat_without, dtype=np.float64)
    s1 = np.asarray(stat_with, dtype=np.float64)
    h0, h1 = s0.size // 2, s1.size // 2
    if h0 < 10 or h1 < 10:
        raise ValueError("need at least 20 trials per dataset")
    fit0, test0 = np.sort(s0[:h0]), s0[h0:]
    fit1, test1 = np.sort(s1[:h1]), s1[h1:]
    candidates = np.unique(np.quantile(np.concatenate([fit0, fit1]), np.linspace(0.001, 0.999, 999)))
    level = 1.0 - (1.0 - confidence) / 2.0
    # Select the threshold by the same conservative (Clopper-Pearson) bound on the fit half, so
    # thresholds in the far tail, whose point estimates rest on a handful of runs, do not win.
    false_pos = fit0.size - np.searchsorted(fit0, candidates, side="right")
    false_neg = np.searchsorted(fit1, candidates, side="right")
    a_fit = stats.beta.ppf(level, false_pos + 1, np.maximum(fit0.size - false_pos, 1))
    b_fit = stats.beta.ppf(level, false_neg + 1, np.maximum(fit1.size - false_neg, 1))
    fit_eps = [_eps_from_rates(float(a), float(b), delta) for a, b in zip(a_fit, b_fit)]
    best_t = float(candidates[int(np.argmax(fit_eps))])
    a_hi = clopper_pearson_upper(int((test0 > best_t).sum()), test0.size, level)
    b_hi = clopper_pearson_upper(int((test1 <= best_t).sum()), test1.size, level)
    return _eps_from_rates(a_hi, b_hi, delta), best_t


def claimed_epsilon(
    profile: Profile, variant: str, delta: float, batch: int = 1, hardened_dimension: int | None = None
) -> float:
    """The epsilon the (possibly broken) implementation claims for one release (or one batch).

    Args:
        profile: retrieval profile.
        variant: one of :data:`VARIANTS`.
        delta: the delta of the claim.
        batch: queries per batch (``shared_coins`` claims ``batch`` independent releases).
        hardened_dimension: None for float noise; d for the discrete release at dimension d (the
            server's curve, :func:`dprdm.privacy.accountant.retrieval_rdp`).
    """
    # sensitivity_1_over_k: multiplier sigma * k = (2 sigma) * k / 2, i.e. the profile with noise 2 sigma.
    claim = Profile(k=profile.k, q=profile.q, sigma=2.0 * profile.sigma, lam=profile.lam) if variant == "sensitivity_1_over_k" else profile
    curve = retrieval_rdp(claim, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension)
    repeats = batch if variant == "shared_coins" else 1
    return epsilon_from_rdp(curve * repeats, DEFAULT_ORDERS, delta).epsilon


def worst_case_corpus(n_others: int, dimension: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(query u, corpus D of ``n_others`` copies of -u); the canary for D' is u itself."""
    if n_others < 1 or dimension < 1:
        raise ValueError(f"n_others and dimension must be >= 1; found {n_others!r}, {dimension!r}")
    u = np.zeros(dimension)
    u[0] = 1.0
    return u, np.tile(-u, (n_others, 1))


@dataclass(frozen=True)
class AuditResult:
    """One audited (profile, variant)."""

    variant: str
    profile: dict[str, float | int]
    delta: float
    trials: int
    claimed_epsilon: float
    audited_lower_bound: float
    ratio: float
    noise: str
    dimension: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


# release(profile, query, selected) -> the mixed release c (noise drawn inside, from the audit's rng).
_Release = Callable[[Profile, npt.NDArray[np.float64], npt.NDArray[np.float64]], npt.NDArray[np.float64]]


class _LatticeNoise:
    """Exact discrete Gaussian vectors on 2^-20 Z^d, sampled in blocks (the vectorised sampler is
    fast per block, slow per vector) and handed out once each, in sampling order (noise is
    data-independent, so drawing it ahead changes nothing; the server's NoisePool does the same)."""

    def __init__(self, rng: np.random.Generator, dimension: int, block: int) -> None:
        self._sampler = FastExactSampler(rng)
        self._dimension, self._block = dimension, block
        self._ready: dict[float, list[npt.NDArray[np.float64]]] = {}

    def draw(self, sigma: float) -> npt.NDArray[np.float64]:
        """The next unused noise vector at ``sigma`` (zeros when sigma = 0: no noise, as in ``release``)."""
        if sigma == 0.0:
            return np.zeros(self._dimension)
        ready = self._ready.setdefault(sigma, [])
        if not ready:
            rows = self._sampler.sample_batch(sigma, self._dimension, self._block, DEFAULT_LATTICE_EXPONENT)
            ready.extend(rows[::-1])  # popped from the end: sampling order
        return ready.pop()


def _releaser(noise: str, dimension: int, rng: np.random.Generator, block: int) -> _Release:
    """The release step the audit runs: float (``mechanism.release``) or hardened (``release_hardened``)."""
    if noise == "float":
        return lambda p, u, selected: release(p, query=u, selected=selected, rng=rng)
    pool = _LatticeNoise(rng, dimension, block)
    return lambda p, u, selected: release_hardened(p, query=u, selected=selected, noise=pool.draw(p.sigma))[1]


def _one_run(
    search: SearchFn,
    profile: Profile,
    variant: str,
    corpus: npt.NDArray[np.float64],
    ids: npt.NDArray[np.int64],
    u: npt.NDArray[np.float64],
    rng: np.random.Generator,
    batch: int,
    noisy: _Release,
) -> float:
    """Statistic of one release (or one batch for ``shared_coins``): <release, u>."""
    noise_profile = Profile(k=profile.k, q=profile.q, sigma=profile.sigma / 2, lam=profile.lam) if variant == "sigma_halved" else profile
    if variant == "shared_coins":
        # Every query of the batch reuses the SAME coins: with the same (public) query the search
        # then selects the same rows, so it runs once and each query draws only its own noise.
        selected = search(corpus, ids, u, profile.k, profile.q, rng)
        return float(sum(noisy(noise_profile, u, selected) @ u for _ in range(batch)))
    selected = search(corpus, ids, u, profile.k, profile.q, rng)
    if variant == "divide_by_found" and selected.shape[0] > 0:
        # The bug: the sum is divided by the number found (sensitivity up to 2), while the noise
        # is still calibrated to 2/k. A release of no rows gives the noise and the mixing alone.
        empty = np.zeros((0, u.size))
        mean = np.asarray(selected, np.float64).sum(axis=0) / selected.shape[0]
        return float((noisy(profile, u, empty) + profile.lam * mean) @ u)
    return float(noisy(noise_profile, u, selected) @ u)


def audit_retrieval(
    search: SearchFn,
    profile: Profile,
    *,
    variant: str = "correct",
    trials: int = 20000,
    delta: float = 1e-5,
    n_others: int | None = None,
    dimension: int = 8,
    batch: int = 4,
    rng: np.random.Generator,
    confidence: float = 0.95,
    noise: str = "float",
) -> AuditResult:
    """Audit one profile/variant with the real search and release code.

    Args:
        search: the subsampled k-NN (``dprdm.index`` in production; see :data:`SearchFn`).
        profile: retrieval profile (lambda > 0).
        variant: one of :data:`VARIANTS`.
        trials: runs per dataset.
        delta: the delta at which epsilon is claimed and audited.
        n_others: size of D (default k, so the canary always displaces someone when sampled).
        dimension: embedding dimension of the synthetic corpus.
        batch: batch size for ``shared_coins``.
        rng: randomness for the runs (an audit is not a production release): the subsampling
            coins and the noise (for ``discrete``, the bits of the exact sampler).
        confidence: confidence level of the lower bound.
        noise: one of :data:`NOISES`: ``float`` or ``discrete`` (the hardened lattice release,
            claimed with the server's discrete curve at ``dimension``).

    Raises:
        ValueError: unknown variant or noise, lambda = 0, or (discrete) sigma below the exact
            sampler's range (the sampler's message names sigma).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown audit variant {variant!r}; choose from {VARIANTS}")
    if noise not in NOISES:
        raise ValueError(f"unknown audit noise {noise!r}; choose from {NOISES}")
    if not profile.retrieves:
        raise ValueError("lambda = 0 releases no private data; nothing to audit")
    u, others = worst_case_corpus(n_others or profile.k, dimension)
    with_canary = np.vstack([u, others])  # rows sorted by record id; the canary has id 0
    ids_without = np.arange(1, others.shape[0] + 1, dtype=np.int64)
    ids_with = np.arange(0, others.shape[0] + 1, dtype=np.int64)
    noisy = _releaser(noise, dimension, rng, block=min(4096, max(1, trials * (batch if variant == "shared_coins" else 1))))
    s0 = [_one_run(search, profile, variant, others, ids_without, u, rng, batch, noisy) for _ in range(trials)]
    s1 = [_one_run(search, profile, variant, with_canary, ids_with, u, rng, batch, noisy) for _ in range(trials)]
    audited, _ = epsilon_lower_bound(s0, s1, delta, confidence)
    claimed = claimed_epsilon(profile, variant, delta, batch, hardened_dimension=dimension if noise == "discrete" else None)
    return AuditResult(
        variant=variant,
        profile=profile.to_dict(),
        delta=delta,
        trials=trials,
        claimed_epsilon=claimed,
        audited_lower_bound=audited,
        ratio=audited / claimed if claimed > 0 else math.inf,
        noise=noise,
        dimension=dimension,
    )
