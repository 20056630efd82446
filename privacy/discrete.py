"""Floating-point-safe noise: the exact discrete Gaussian on the lattice 2^k Z^d (SPEC §6).

Why: a float Gaussian ``v + rng.normal(...)`` leaks through its low-order bits (Mironov 2012,
"On significance of the least significant bits for differential privacy"; Jin et al. 2022, "Are
we there yet? Timing and floating-point attacks on differential privacy systems"). The hardened
release rounds the aggregate v to the lattice 2^k Z^d and adds noise drawn EXACTLY from the
discrete Gaussian N_{2^k Z}(0, sigma^2) per coordinate (C. Canonne, G. Kamath, T. Steinke, "The
Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1-3), so every released
coordinate of the noisy aggregate is an exact multiple of 2^k and its distribution is exactly the
one analysed.

Samplers (both exact, integer arithmetic):
* :class:`OpenDPSampler` (production): OpenDP's ``make_gaussian`` on a vector of f64 with the L2
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
5. Fractional orders: log A_a = log E[exp(a * ell)] is a cumulant generating function, convex in
   a (Hölder), so for floor(a) = n < a < n + 1 it lies below the chord between n and n + 1
   (log A_1 = 0); we bound it by the chord of the continuous integer values of 4.
Hence :func:`hardened_rdp` = the chord-interpolated integer-order curve at the widened sensitivity;
a test checks it numerically against the continuous value (equal at integer orders, above it at
fractional ones, and never below the exact discrete A_a computed by summation).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .mechanism import Profile, clamp_unit
from .orders import validate_orders
from .rdp import log_a_integer

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


def hardened_rdp(
    profile: Profile, dimension: int, orders: npt.ArrayLike, exponent: int = DEFAULT_LATTICE_EXPONENT
) -> npt.NDArray[np.float64]:
    """RDP curve of one hardened (discrete-Gaussian) release; see the module docstring, items 1-5.

    Args:
        profile: the retrieval profile (lambda = 0 costs 0; sigma = 0 is +inf).
        dimension: embedding dimension d.
        orders: Rényi orders > 1.
        exponent: lattice exponent k (step 2^k).

    Returns:
        Per-order RDP upper bound for the discrete release.
    """
    a_arr = validate_orders(orders)
    if not profile.retrieves:
        return np.zeros_like(a_arr)
    if profile.sigma == 0.0:
        return np.full_like(a_arr, math.inf)
    z = profile.sigma / widened_sensitivity(profile.sensitivity, dimension, exponent)
    out = np.empty_like(a_arr)
    for idx, a in enumerate(a_arr):
        lo = math.floor(a)
        if lo == a:
            out[idx] = _integer_log_a(profile.q, z, int(a)) / (a - 1.0)
            continue
        log_lo, log_hi = _integer_log_a(profile.q, z, lo), _integer_log_a(profile.q, z, lo + 1)
        out[idx] = ((lo + 1 - a) * log_lo + (a - lo) * log_hi) / (a - 1.0)
    return out


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
    """Pre-generates lattice noise vectors in a background thread, one bounded queue per key.

    The request path only pops a ready vector, so the sampler's data-independent but
    noise-dependent run time is never observable per request. If the queue is empty the caller
    waits for the next vector (the wait depends only on load, not on private data).

    Args:
        sampler: the exact lattice sampler.
        capacity: vectors kept ready per (sigma, dimension, exponent).
    """

    def __init__(self, sampler: LatticeSampler, capacity: int = 64) -> None:
        self._sampler = sampler
        self._capacity = capacity
        self._queues: dict[tuple[float, int, int], queue.Queue[npt.NDArray[np.float64]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dprdm-noise-pool", daemon=True)
        self._thread.start()

    def _queue(self, key: tuple[float, int, int]) -> queue.Queue[npt.NDArray[np.float64]]:
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = queue.Queue(maxsize=self._capacity)
                self._queues[key] = q
                self._wake.set()
            return q

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                items = list(self._queues.items())
            filled = False
            for (sigma, dim, exp), q in items:
                if not q.full():
                    q.put(self._sampler.sample(sigma, dim, exp))
                    filled = True
            if not filled:
                self._wake.wait(0.05)
                self._wake.clear()

    def prepare(self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> None:
        """Start filling the queue for this key (call at start-up for every served profile)."""
        self._queue((float(sigma), int(dimension), int(exponent)))

    def take(self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> npt.NDArray[np.float64]:
        """Pop one ready noise vector (blocking until one is ready). Each vector is used once."""
        q = self._queue((float(sigma), int(dimension), int(exponent)))
        self._wake.set()
        return q.get()

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


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
