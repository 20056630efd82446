"""Accounting for the baselines, on the project's privacy core (the same accountant everywhere).

* DP-SGD (DP-LDM, DP-LoRA): ``steps`` logical steps, each a Poisson-subsampled Gaussian release of
  the sum of per-example gradients clipped to ``C`` with noise N(0, (z C)^2) per coordinate. Under
  add/remove of one record the sum moves by at most ``C``, so each step is
  ``SubsampledGaussianEvent(q, z)`` and the run is that event composed ``steps`` times.
* DPAgg-TI: one release of a clipped-embedding sum, ``SubsampledGaussianEvent(q, z)`` once.

:func:`calibrate_noise_multiplier` is a bisection on z over the shared order grid that keeps the
feasible end (the returned z always meets the target), like ``privacy.calibration``: the
subsampled-Gaussian RDP is non-increasing in z (Mironov, Talwar & Zhang 2019, Section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from dprdm.privacy import (
    DEFAULT_ORDERS,
    RdpAccountant,
    SubsampledGaussianEvent,
    check_delta_for_size,
    epsilon_from_rdp,
    rdp_subsampled_gaussian,
)

__all__ = [
    "NEIGHBOURING",
    "PrivacyReport",
    "calibrate_noise_multiplier",
    "dpsgd_accountant",
    "check_target",
]

NEIGHBOURING = "add/remove one record (one private image together with its caption)"
_MAX_Z = 1e6


def check_target(*, epsilon: float, delta: float, public_size: int) -> None:
    """Validate a target budget (SPEC §3: delta < 1/N̄).

    Args:
        epsilon: target epsilon, finite and > 0.
        delta: target delta in (0, 1/public_size).
        public_size: declared public dataset size N̄ >= 1.

    Raises:
        ValueError: naming the bad value.
    """
    if not (float(epsilon) > 0.0) or math.isinf(float(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0; found {epsilon!r}")
    check_delta_for_size(float(delta), public_size)


def _check_rate_steps(q: float, steps: int) -> None:
    if not (0.0 < float(q) <= 1.0):
        raise ValueError(f"sample rate q must be in (0, 1]; found {q!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; found {steps!r}")


_INTEGER_ORDERS = tuple(a for a in DEFAULT_ORDERS if float(a).is_integer())


def _epsilon(q: float, z: float, steps: int, delta: float, orders: tuple[float, ...] = DEFAULT_ORDERS) -> float:
    curve = rdp_subsampled_gaussian(q=q, noise_multiplier=z, orders=orders) * steps
    return epsilon_from_rdp(curve, orders, delta).epsilon


def _bisect(ok: Callable[[float], bool], lo: float, hi: float, rel_tol: float) -> float:
    """Shrink [lo, hi] (lo infeasible, hi feasible) to relative width ``rel_tol``; returns hi."""
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, q: float, steps: int, epsilon: float, delta: float, rel_tol: float = 1e-3
) -> float:
    """Smallest noise multiplier z (to relative ``rel_tol``, rounded up) such that ``steps``
    compositions of the Poisson-subsampled Gaussian with rate ``q`` cost <= ``epsilon`` at ``delta``
    over the shared order grid.

    Two phases, both keeping the feasible end: a bisection over the integer orders of the grid
    (cheap closed form; feasible there implies feasible on the full grid, whose minimum is over a
    superset), then a bisection on the full grid (fractional orders use the slower series) below
    that point. Results are memoized.

    Args:
        q: Poisson sampling rate in (0, 1].
        steps: number of releases (DP-SGD logical steps; 1 for DPAgg-TI).
        epsilon: target epsilon > 0.
        delta: target delta in (0, 1).
        rel_tol: relative width of the final bracket.

    Returns:
        z with ``epsilon(q, z, steps, delta) <= epsilon`` on the shared grid.

    Raises:
        ValueError: naming a bad argument, or if no z <= 1e6 reaches the target.
    """
    _check_rate_steps(q, steps)
    if not (float(epsilon) > 0.0) or math.isinf(float(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0; found {epsilon!r}")
    if not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1); found {delta!r}")

    def ok_int(z: float) -> bool:
        return _epsilon(q, z, steps, delta, _INTEGER_ORDERS) <= epsilon

    def ok(z: float) -> bool:
        return _epsilon(q, z, steps, delta) <= epsilon

    hi = 1.0
    while not ok_int(hi):
        hi *= 2.0
        if hi > _MAX_Z:
            raise ValueError(f"no noise multiplier <= {_MAX_Z:g} reaches epsilon={epsilon!r} "
                             f"(q={q!r}, steps={steps!r}, delta={delta!r})")
    lo = hi / 2.0
    while ok_int(lo) and lo > 1e-6:
        hi, lo = lo, lo / 2.0
    hi = _bisect(ok_int, lo, hi, rel_tol)
    lo = hi * 0.9
    while ok(lo) and lo > 1e-6:
        hi, lo = lo, lo * 0.9
    return _bisect(ok, lo, hi, rel_tol)


def dpsgd_accountant(*, q: float, noise_multiplier: float, steps: int) -> RdpAccountant:
    """The project's accountant holding ``steps`` subsampled-Gaussian events (rate q, multiplier z).

    Raises:
        ValueError: naming a bad argument.
    """
    _check_rate_steps(q, steps)
    return RdpAccountant().compose(SubsampledGaussianEvent(q=q, noise_multiplier=noise_multiplier), steps)


@dataclass(frozen=True)
class PrivacyReport:
    """What a baseline run cost, written as ``privacy_report.json`` next to its weights.

    ``epsilon`` is the achieved value from :class:`dprdm.privacy.RdpAccountant` on the shared
    grid at ``delta``; ``accountant`` is its JSON state (events and RDP curve), which a ledger of
    the privacy domain can compose. ``noise_source`` says where DP coins and noise came from.
    """

    method: str
    epsilon_target: float
    delta: float
    epsilon: float
    order: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    public_size: int
    noise_source: str
    production: bool
    accountant: dict[str, Any]
    neighbouring: str = NEIGHBOURING
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, *, method: str, epsilon_target: float, delta: float, q: float, noise_multiplier: float,
              steps: int, clip_norm: float, public_size: int, noise_source: str, production: bool,
              extra: dict[str, Any] | None = None) -> PrivacyReport:
        """Account the run with the project's accountant and fill the report.

        Raises:
            ValueError: naming a bad argument.
        """
        acc = dpsgd_accountant(q=q, noise_multiplier=noise_multiplier, steps=steps)
        res = acc.get_epsilon_and_order(delta)
        return cls(method=method, epsilon_target=float(epsilon_target), delta=float(delta), epsilon=res.epsilon,
                   order=res.order, noise_multiplier=float(noise_multiplier), sample_rate=float(q), steps=steps,
                   clip_norm=float(clip_norm), public_size=int(public_size), noise_source=noise_source,
                   production=production, accountant=acc.to_dict(), extra=dict(extra or {}))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out = asdict(self)
        out["epsilon"] = "inf" if math.isinf(self.epsilon) else self.epsilon
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        """Inverse of :meth:`to_dict`; re-derives epsilon from the stored accountant and checks it.

        Raises:
            ValueError: on a malformed report or an epsilon that does not match its accountant.
        """
        try:
            fields = dict(data)
            fields["epsilon"] = math.inf if fields["epsilon"] == "inf" else float(fields["epsilon"])
            report = cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed privacy report: {exc}") from None
        eps = RdpAccountant.from_dict(report.accountant).get_epsilon(report.delta)
        if not np.isclose(eps, report.epsilon, rtol=1e-9, atol=1e-12):
            raise ValueError(f"privacy report epsilon {report.epsilon!r} does not match its accountant ({eps!r})")
        return report
