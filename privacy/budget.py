"""Budgets and the admission rule (SPEC §4, §6).

A privacy domain's budget (epsilon, delta) is the guarantee. Two admission rules:

* **Single profile** (every query charged to the budget uses the same profile): the sequence of
  mechanisms is fixed, only its length grows, and the length at which admission stops depends on
  public inputs only. Admit a query iff ``min_a eps_a(R_spent + R_query) <= epsilon``
  (Balle et al. 2020, Thm 21, minimised over the shared grid).
* **Several profiles** (adaptively chosen mechanisms): a Rényi filter at an order ``a*`` fixed
  when the budget is created (V. Feldman, T. Zrnic, "Individual Privacy Accounting via a Rényi
  Filter", NeurIPS 2021, Thm 3.1): admit iff ``sum_i R_i(a*) <= B(a*)`` with
  ``B(a*) = epsilon - log((a*-1)/a*) + (log delta + log a*)/(a* - 1)``, the RDP level that Thm 21
  converts to exactly (epsilon, delta).

Admission depends only on public inputs (profile, past admitted profiles), so it leaks nothing.
Receipts' "spent" figures (min over the grid) are informational; the budget is the guarantee.

Public size rule (SPEC §3): delta >= 1/N̄ is refused; the default is delta = 1/(10 N̄).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .accountant import retrieval_rdp
from .conversion import EpsilonConverter
from .mechanism import Profile, profile_rdp
from .orders import DEFAULT_ORDERS

__all__ = ["Budget", "filter_capacity", "choose_filter_order", "default_delta", "check_delta_for_size"]


def default_delta(public_size: int) -> float:
    """delta = 1 / (10 N̄) for a declared public size N̄ (SPEC §3)."""
    check_public_size(public_size)
    return 1.0 / (10.0 * public_size)


def check_public_size(public_size: int) -> None:
    """Raise ``ValueError`` unless N̄ is an integer >= 1."""
    if not isinstance(public_size, (int, np.integer)) or isinstance(public_size, bool) or public_size < 1:
        raise ValueError(f"public size must be an integer >= 1; found {public_size!r}")


def check_delta_for_size(delta: float, public_size: int) -> None:
    """Refuse delta >= 1/N̄ (SPEC §3): such a delta allows releasing a whole record.

    Raises:
        ValueError: naming delta and N̄.
    """
    check_public_size(public_size)
    if not (0.0 < delta < 1.0 / public_size):
        raise ValueError(f"delta must be in (0, 1/N̄) = (0, {1.0 / public_size:.3g}) for public size {public_size}; found {delta!r}")


def filter_capacity(epsilon: float, delta: float, order: float) -> float:
    """RDP level B(a) at order ``a`` that converts to (epsilon, delta) by Balle et al. 2020 Thm 21."""
    return epsilon - math.log1p(-1.0 / order) + (math.log(delta) + math.log(order)) / (order - 1.0)


def choose_filter_order(
    epsilon: float, delta: float, profiles: Sequence[Profile], orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Pick the filter order a* maximising the guaranteed number of queries of the worst profile.

    For each order a with B(a) > 0, the number of queries of profile p the filter admits is
    B(a) / R_p(a); we maximise the minimum over the retrieving profiles. Depends only on public
    configuration, never on the private data or the traffic.

    Raises:
        ValueError: if no profile retrieves, or no order gives a positive capacity.
    """
    retrieving = [p for p in profiles if p.retrieves]
    if not retrieving:
        raise ValueError("a Rényi filter needs at least one profile with lambda > 0")
    best_order, best_count = None, -1.0
    for a in orders:
        cap = filter_capacity(epsilon, delta, a)
        if cap <= 0:
            continue
        counts = [cap / float(profile_rdp(p, [a])[0]) if profile_rdp(p, [a])[0] > 0 else math.inf for p in retrieving]
        if min(counts) > best_count:
            best_order, best_count = float(a), min(counts)
    if best_order is None:
        raise ValueError(f"no order gives positive filter capacity for epsilon={epsilon!r}, delta={delta!r}")
    return best_order


@dataclass(frozen=True)
class Budget:
    """A privacy domain's budget and its admission rule.

    Attributes:
        epsilon: total epsilon, > 0.
        delta: total delta, in (0, 1).
        profile: the single profile served (single-profile rule), or None for a filter.
        filter_order: the Rényi filter order a* (several profiles), or None.

    Exactly one of ``profile`` and ``filter_order`` is set. Build with :meth:`single` or
    :meth:`renyi_filter`.
    """

    epsilon: float
    delta: float
    profile: Profile | None = None
    filter_order: float | None = None

    def __post_init__(self) -> None:
        eps = float(self.epsilon)
        if not (eps > 0.0) or math.isinf(eps):
            raise ValueError(f"budget epsilon must be finite and > 0; found {self.epsilon!r}")
        if not (0.0 < float(self.delta) < 1.0):
            raise ValueError(f"budget delta must be in (0, 1); found {self.delta!r}")
        if (self.profile is None) == (self.filter_order is None):
            raise ValueError("a budget needs exactly one of profile (single-profile rule) or filter_order")
        if self.filter_order is not None:
            a = float(self.filter_order)
            if a not in DEFAULT_ORDERS:
                raise ValueError(f"filter_order must be on the shared order grid; found {self.filter_order!r}")
            if filter_capacity(eps, float(self.delta), a) <= 0:
                raise ValueError(f"filter_order {a} gives no capacity at epsilon={eps}, delta={self.delta}")

    @classmethod
    def single(cls, epsilon: float, delta: float, profile: Profile) -> Budget:
        """A budget that serves only ``profile`` (min-over-orders admission)."""
        return cls(epsilon=epsilon, delta=delta, profile=profile)

    @classmethod
    def renyi_filter(
        cls, epsilon: float, delta: float, profiles: Sequence[Profile], order: float | None = None
    ) -> Budget:
        """A Rényi-filter budget for several profiles; ``order`` defaults to :func:`choose_filter_order`."""
        a = choose_filter_order(epsilon, delta, profiles) if order is None else float(order)
        return cls(epsilon=epsilon, delta=delta, filter_order=a)

    def charge(self, profile: Profile, hardened_dimension: int | None = None) -> npt.NDArray[np.float64]:
        """RDP curve (over ``DEFAULT_ORDERS``) one query of ``profile`` adds to the spend.

        Args:
            profile: the query's profile.
            hardened_dimension: the embedding dimension when the release uses the
                floating-point-safe discrete Gaussian (``dprdm.privacy.discrete``), else None.

        Raises:
            ValueError: if a single-profile budget is asked to charge another retrieving profile.
        """
        if self.profile is not None and profile.retrieves and profile != self.profile:
            raise ValueError(f"this budget serves only profile {self.profile.to_dict()}; found {profile.to_dict()}")
        return retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension)

    @functools.cached_property
    def _converter(self) -> EpsilonConverter:
        return EpsilonConverter(DEFAULT_ORDERS, self.delta)

    @functools.cached_property
    def _filter(self) -> tuple[int, float] | None:
        if self.filter_order is None:
            return None
        a = float(self.filter_order)
        return DEFAULT_ORDERS.index(a), filter_capacity(self.epsilon, self.delta, a)

    def admits(self, spent: npt.ArrayLike, charge: npt.ArrayLike) -> bool:
        """Whether adding ``charge`` to ``spent`` (curves over ``DEFAULT_ORDERS``) stays within budget.

        O(#orders) with precomputed grid constants: the ledger calls it inside its transaction.
        """
        total = np.asarray(spent, dtype=np.float64) + np.asarray(charge, dtype=np.float64)
        if self._filter is not None:
            idx, cap = self._filter
            return bool(total[idx] <= cap)
        return self._converter.epsilon(total) <= self.epsilon

    def spent_epsilon(self, spent: npt.ArrayLike) -> float:
        """Informational epsilon spent at the budget's delta (min over the grid)."""
        return self._converter.epsilon(np.asarray(spent, dtype=np.float64))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "profile": None if self.profile is None else self.profile.to_dict(),
            "filter_order": self.filter_order,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """Inverse of :meth:`to_dict`."""
        prof = data.get("profile")
        return cls(
            epsilon=data["epsilon"],
            delta=data["delta"],
            profile=None if prof is None else Profile.from_dict(prof),
            filter_order=data.get("filter_order"),
        )
