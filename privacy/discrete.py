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

Accounting: :mod:`dprdm.privacy.discrete_rdp` (why the continuous sampled-Gaussian bound, at a
widened sensitivity, still bounds the discrete release at every order). The lattice itself:
:mod:`dprdm.privacy.lattice`; the pool: :mod:`dprdm.privacy.noise_pool`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from .discrete_rdp import hardened_rdp
from .lattice import DEFAULT_LATTICE_EXPONENT, round_to_lattice, widened_sensitivity
from .mechanism import Profile, clamp_unit
from .noise_pool import LatticeSampler, NoisePool

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
