"""The DP-RDM retrieval mechanism: a validated profile, its RDP curve, and its release step.

Source: M. Lebensold, M. Sanjabi, P. Astolfi, A. Romero-Soriano, K. Chaudhuri, C. Guo,
"DP-RDM: Adapting Diffusion Models to Private Domains Without Fine-Tuning", 2024, Section 3
(Algorithm 1), with the corrections of SPEC §4.

Release of one query with query embedding u (unit norm, computed from the request alone) over
private unit vectors x_1..x_N:

1. keep each (padded) slot independently with probability q (fresh coins per query);
2. take the top k survivors by <u, x_i> (strict order: score desc, record id asc);
3. v = (1/k) * sum of the selected x_i (zero padding: ALWAYS divide by k);
4. v~ = v + N(0, sigma^2 I_d);
5. c = lambda * v~ + (1 - lambda) * u  (post-processing of v~ and the public u).

Neighbouring relation: add or remove ONE record (one image, or one owner's re-normalized mean).

Sensitivity of v (derivation). Fix the subsample of the other records. Adding record x* either
(a) leaves the top-k unchanged (x* not selected): v unchanged; or (b) selects x*: if fewer than
k were selected before, v changes by x*/k (norm <= 1/k); otherwise x* displaces the k-th
neighbour x_k and v changes by (x* - x_k)/k, of norm <= (||x*|| + ||x_k||)/k <= 2/k. Removal is
symmetric. So Delta_2 = 2/k and the Gaussian noise multiplier is z = sigma / Delta_2 = sigma k / 2.

Subsampling amplification: the Poisson-subsampled Gaussian bound (Mironov, Talwar & Zhang 2019)
applies even though the displaced record depends on the subsample: condition on the subsample S
of the other records; given S the two output distributions are a Gaussian centred at v(S) and
the mixture (1-q) N(v(S)) + q N(v(S + x*)) with ||v(S + x*) - v(S)|| <= 2/k, whose Rényi
divergence is bounded by the sampled-Gaussian expression at multiplier z; joint convexity of
exp((a-1) D_a) over the mixture across S gives the same bound unconditionally.

Composition: queries compose additively in RDP (Mironov 2017, Prop. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .orders import DEFAULT_ORDERS
from .rdp import rdp_subsampled_gaussian

__all__ = ["Profile", "profile_rdp", "release", "clamp_unit"]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Profile:
    """Retrieval profile (k, q, sigma, lambda), defined by the operator.

    Attributes:
        k: number of neighbours averaged (>= 1).
        q: Poisson sampling probability per slot, in (0, 1].
        sigma: standard deviation of the Gaussian noise added to the mean, >= 0.
        lam: mixing weight lambda in [0, 1]; 0 means no retrieval (charged 0).

    Raises:
        ValueError: naming the bad field, on construction.
    """

    k: int
    q: float
    sigma: float
    lam: float

    def __post_init__(self) -> None:
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1; found {self.k!r}")
        q = _as_float("q", self.q)
        if not (0.0 < q <= 1.0):
            raise ValueError(f"q must be in (0, 1]; found {self.q!r}")
        sigma = _as_float("sigma", self.sigma)
        if sigma < 0.0 or math.isinf(sigma):
            raise ValueError(f"sigma must be finite and >= 0; found {self.sigma!r}")
        lam = _as_float("lambda", self.lam)
        if not (0.0 <= lam <= 1.0):
            raise ValueError(f"lambda must be in [0, 1]; found {self.lam!r}")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "lam", lam)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the mean under add/remove-one: 2/k."""
        return 2.0 / self.k

    @property
    def noise_multiplier(self) -> float:
        """z = sigma / sensitivity = sigma * k / 2."""
        return self.sigma * self.k / 2.0

    @property
    def retrieves(self) -> bool:
        """False when lambda = 0: the release is the public query embedding, no private data."""
        return self.lam > 0.0

    def require_private_ok(self) -> None:
        """Refuse sigma = 0 on a private index (its epsilon is +inf).

        Raises:
            ValueError: if the profile retrieves without noise.
        """
        if self.retrieves and self.sigma == 0.0:
            raise ValueError("sigma = 0 is refused on a private index: its epsilon is +inf")

    def to_dict(self) -> dict[str, float | int]:
        """Plain-JSON form (``lambda`` spelled out)."""
        return {"k": self.k, "q": self.q, "sigma": self.sigma, "lambda": self.lam}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Profile:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a missing field."""
        missing = [f for f in ("k", "q", "sigma", "lambda") if f not in data]
        if missing:
            raise ValueError(f"profile is missing field {missing[0]!r}")
        return cls(k=data["k"], q=data["q"], sigma=data["sigma"], lam=data["lambda"])  # type: ignore[arg-type]


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; found {value!r}")
    f = float(value)
    if math.isnan(f):
        raise ValueError(f"{name} must not be NaN; found {value!r}")
    return f


def profile_rdp(profile: Profile, orders: npt.ArrayLike = DEFAULT_ORDERS) -> npt.NDArray[np.float64]:
    """RDP curve of ONE release under ``profile`` (add/remove-one neighbours).

    Returns zeros when lambda = 0 (no retrieval), ``+inf`` when sigma = 0 (never NaN), and
    otherwise the Poisson-subsampled Gaussian RDP at multiplier ``sigma * k / 2``.
    """
    orders_arr = np.asarray(orders, dtype=np.float64)
    if not profile.retrieves:
        return np.zeros(orders_arr.shape, dtype=np.float64)
    return rdp_subsampled_gaussian(q=profile.q, noise_multiplier=profile.noise_multiplier, orders=orders_arr)


def clamp_unit(vectors: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """x <- x / max(1, ||x||) row-wise in float64 (SPEC §4: float16 storage can exceed 1 by 6e-5)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (m, d); found shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = x / np.maximum(norms, 1.0)
    return out


def release(
    profile: Profile,
    *,
    query: npt.ArrayLike,
    selected: npt.ArrayLike,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    """The release step: mean of the selected vectors (divided by k), Gaussian noise, mixing.

    Args:
        profile: the retrieval profile.
        query: the public query embedding u, shape (d,).
        selected: the top-k survivors of the subsample, shape (m, d) with 0 <= m <= k; fewer
            than k rows mean zero padding (the sum is still divided by k, nothing else changes).
        rng: the DP random generator (``dprdm.privacy.rng.new_dp_generator()`` in production;
            tests pass a seeded generator explicitly).

    Returns:
        c = lambda * (v + N(0, sigma^2 I)) + (1 - lambda) * u, float64 of shape (d,). With
        lambda = 0 it is u itself and no noise is drawn.

    Raises:
        ValueError: on shape mismatch, more than k selected rows, or non-finite input.
    """
    u = np.asarray(query, dtype=np.float64)
    if u.ndim != 1 or u.size == 0:
        raise ValueError(f"query must be a non-empty 1-D vector; found shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("query contains non-finite values")
    if not profile.retrieves:
        return u.copy()
    x = np.asarray(selected, dtype=np.float64)
    if x.size == 0:
        x = np.zeros((0, u.size), dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != u.size:
        raise ValueError(f"selected must have shape (m, {u.size}); found {x.shape}")
    if x.shape[0] > profile.k:
        raise ValueError(f"selected has {x.shape[0]} rows but k = {profile.k}")
    if not np.isfinite(x).all():
        raise ValueError("selected vectors contain non-finite values")
    v = clamp_unit(x).sum(axis=0) / profile.k
    noisy = v + rng.normal(0.0, profile.sigma, size=u.size) if profile.sigma > 0 else v
    mixed: npt.NDArray[np.float64] = profile.lam * noisy + (1.0 - profile.lam) * u
    return mixed
