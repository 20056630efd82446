"""Budgets and the admission rule (SPEC §4, §6).

A privacy domain's budget (epsilon, delta) is the guarantee. Two admission rules:

* **Single profile** (every query charged to the budget is the same MECHANISM): the sequence of
  mechanisms is fixed, only its length grows, and the length at which admission stops depends on
  public inputs only. A mechanism is everything its RDP curve depends on (SPEC §4): the profile
  (k, q, sigma, lambda) AND the noise (float Gaussian, or the exact discrete Gaussian on the
  lattice at embedding dimension d, whose curve differs). The same numbers served with two noise
  kinds are two mechanisms, and the minimum over orders of a sum of two different curves is not a
  valid single-profile bound for an adaptive interleaving of them: such a domain needs the filter. Admit a query iff ``min_a eps_a(R_spent + R_query) <= epsilon``
  (Balle et al. 2020, Thm 21, minimised over the shared grid).
  That is the ``"rdp"`` accountant. With ``accountant = "pld"`` (issue 17) the same budget admits
  "at most T_max queries", T_max from the mechanism's privacy loss distribution
  (:mod:`dprdm.privacy.pld`: an upper bound, tighter than RDP; float or discrete lattice noise,
  group size 1, decided by :func:`~dprdm.privacy.pld.pld_dominating_pair`). T_max and a per-T epsilon table
  (rounded up) are computed once, when the budget is built, and stored with it
  (:meth:`Budget.to_dict`), so a ledger never recomputes them. The number of queries so far is
  read off the running RDP curve (the sum of T identical charge curves, :meth:`Budget.pld_queries`),
  so the admission stays O(#orders) and the ledger keeps one running curve for both accountants.
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .accountant import retrieval_rdp
from .conversion import EpsilonConverter
from .group import group2_rdp
from .mechanism import Profile
from .orders import DEFAULT_ORDERS
from .pld import PldPlan, pld_plan, pld_refusal, require_pair

__all__ = [
    "ACCOUNTANTS",
    "Budget",
    "filter_capacity",
    "choose_filter_order",
    "default_delta",
    "check_delta_for_size",
    "mechanism_rdp",
    "mechanism_text",
]


ACCOUNTANTS = ("rdp", "pld")
"""How a single-profile budget converts its queries to (epsilon, delta): Rényi DP over the shared
grid, or the privacy loss distribution (:mod:`dprdm.privacy.pld`)."""


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
    epsilon: float,
    delta: float,
    profiles: Sequence[Profile],
    orders: Sequence[float] = DEFAULT_ORDERS,
    hardened_dimensions: Sequence[int | None] | None = None,
    group_sizes: Sequence[int] | None = None,
) -> float:
    """Pick the filter order a* maximising the guaranteed number of queries of the worst profile.

    For each order a with B(a) > 0, the number of queries of profile p the filter admits is
    B(a) / R_p(a); we maximise the minimum over the retrieving profiles. Depends only on public
    configuration, never on the private data or the traffic. ``hardened_dimensions`` and
    ``group_sizes`` (parallel to ``profiles``; None: float noise, group size 1) select each
    mechanism's curve.

    Raises:
        ValueError: if no profile retrieves, or no order gives a positive capacity.
    """
    dims = list(hardened_dimensions) if hardened_dimensions is not None else [None] * len(profiles)
    groups = list(group_sizes) if group_sizes is not None else [1] * len(profiles)
    if len(dims) != len(profiles) or len(groups) != len(profiles):
        raise ValueError(f"hardened_dimensions and group_sizes must match the {len(profiles)} profiles")
    retrieving = [(p, d, g) for p, d, g in zip(profiles, dims, groups) if p.retrieves]
    if not retrieving:
        raise ValueError("a Rényi filter needs at least one profile with lambda > 0")
    curves = [mechanism_rdp(p, orders=list(orders), hardened_dimension=d, group_size=g) for p, d, g in retrieving]
    best_order, best_count = None, -1.0
    for j, a in enumerate(orders):
        cap = filter_capacity(epsilon, delta, a)
        if cap <= 0:
            continue
        counts = [cap / float(c[j]) if c[j] > 0 else math.inf for c in curves]
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
        hardened_dimension: single rule: the embedding dimension when the one mechanism releases
            through the exact discrete Gaussian (``dprdm.privacy.discrete``), None for float noise.
        group_size: single rule: 2 when the one mechanism runs on an index where one record can
            change two stored records (capacity-limited IVF lists; ``dprdm.privacy.group``), else 1.
        noise_recorded: False for a single-profile budget whose noise kind was not recorded (written
            before noise kinds were part of a mechanism's identity, or created before any index of
            the domain was served): it then serves ONE mechanism of its profile, whichever the
            deployment serves, and a server must refuse to serve two (see :meth:`serves`).
        accountant: ``"rdp"`` (min over orders; also every Rényi filter) or ``"pld"`` (single
            rule only, a mechanism with a PLD pair: float noise, group size 1; see the module
            docstring). Budgets stored before issue 17 have no accountant: they load as ``"rdp"``.
        pld_record: the :class:`~dprdm.privacy.pld.PldPlan` stored with a PLD budget (None:
            computed on first use by :attr:`pld`; not part of equality).

    Exactly one of ``profile`` and ``filter_order`` is set. Build with :meth:`single` or
    :meth:`renyi_filter`.
    """

    epsilon: float
    delta: float
    profile: Profile | None = None
    filter_order: float | None = None
    hardened_dimension: int | None = None
    noise_recorded: bool = True
    group_size: int = 1
    accountant: str = "rdp"
    pld_record: PldPlan | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        eps = float(self.epsilon)
        if not (eps > 0.0) or math.isinf(eps):
            raise ValueError(f"budget epsilon must be finite and > 0; found {self.epsilon!r}")
        if not (0.0 < float(self.delta) < 1.0):
            raise ValueError(f"budget delta must be in (0, 1); found {self.delta!r}")
        if (self.profile is None) == (self.filter_order is None):
            raise ValueError("a budget needs exactly one of profile (single-profile rule) or filter_order")
        if self.hardened_dimension is not None:
            d = self.hardened_dimension
            if self.profile is None or not self.noise_recorded:
                raise ValueError("hardened_dimension belongs to a single-profile budget with its noise recorded")
            if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
                raise ValueError(f"hardened_dimension must be an integer >= 1; found {d!r}")
        if self.group_size not in (1, 2) or (self.group_size == 2 and self.profile is None):
            raise ValueError(f"group_size must be 1 or 2 (single-profile budgets only); found {self.group_size!r}")
        if self.filter_order is not None:
            a = float(self.filter_order)
            if a not in DEFAULT_ORDERS:
                raise ValueError(f"filter_order must be on the shared order grid; found {self.filter_order!r}")
            if filter_capacity(eps, float(self.delta), a) <= 0:
                raise ValueError(f"filter_order {a} gives no capacity at epsilon={eps}, delta={self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; found {self.accountant!r}")
        if self.accountant == "pld":
            self._check_pld()

    def _check_pld(self) -> None:
        """A PLD budget: single rule, recorded noise with a PLD pair, a stored plan that matches."""
        if self.profile is None:
            raise ValueError("accountant 'pld' needs a single-profile budget; a Rényi filter is accounted by RDP")
        if not self.noise_recorded:
            raise ValueError("accountant 'pld' needs the budget's noise kind recorded")
        reason = pld_refusal(hardened_dimension=self.hardened_dimension, group_size=self.group_size,
                             profile=self.profile)
        if reason is not None:
            raise ValueError(f"accountant 'pld' is refused for {self.describe_mechanism()}: {reason}")
        pair = require_pair(self.profile, self.hardened_dimension, group_size=self.group_size)
        rec = self.pld_record
        if rec is not None and (
            rec.pair != pair or rec.epsilon != float(self.epsilon) or rec.delta != float(self.delta)
        ):
            raise ValueError(
                f"the stored PLD plan ({rec.pair.to_dict()}, epsilon {rec.epsilon}, delta {rec.delta}) does "
                f"not match the budget ({pair.to_dict()}, epsilon {self.epsilon}, delta {self.delta})"
            )

    @classmethod
    def single(
        cls,
        epsilon: float,
        delta: float,
        profile: Profile,
        *,
        hardened_dimension: int | None = None,
        noise_recorded: bool = True,
        group_size: int = 1,
        accountant: str = "rdp",
    ) -> Budget:
        """A budget that serves only the mechanism (``profile``, noise, group size): min-over-orders
        admission (``accountant = "rdp"``) or at most T_max queries (``"pld"``; T_max is computed on
        first use of :attr:`pld`, e.g. by :meth:`to_dict`).

        Args:
            hardened_dimension: d for the exact discrete Gaussian at dimension d; None: float noise.
            noise_recorded: False when the noise kind is not known yet (see the class docstring).
            group_size: 2 on an index where one record can change two stored records.
            accountant: ``"rdp"`` or ``"pld"``.

        Raises:
            ValueError: naming a bad value, or why the mechanism cannot be accounted by PLD.
        """
        return cls(
            epsilon=epsilon,
            delta=delta,
            profile=profile,
            hardened_dimension=hardened_dimension,
            noise_recorded=noise_recorded,
            group_size=group_size,
            accountant=accountant,
        )

    @classmethod
    def renyi_filter(
        cls,
        epsilon: float,
        delta: float,
        profiles: Sequence[Profile],
        order: float | None = None,
        hardened_dimensions: Sequence[int | None] | None = None,
        group_sizes: Sequence[int] | None = None,
    ) -> Budget:
        """A Rényi-filter budget for several mechanisms; ``order`` defaults to
        :func:`choose_filter_order` over their curves."""
        if order is None:
            a = choose_filter_order(
                epsilon, delta, profiles, hardened_dimensions=hardened_dimensions, group_sizes=group_sizes
            )
        else:
            a = float(order)
        return cls(epsilon=epsilon, delta=delta, filter_order=a)

    def serves(self, profile: Profile, hardened_dimension: int | None, group_size: int = 1) -> bool:
        """Whether one query of this mechanism may be charged to this budget: any mechanism for a
        Rényi filter; for the single rule the budget's own mechanism only (its profile alone when
        the noise was not recorded: the caller must then serve ONE noise kind for it)."""
        if self.profile is None or not profile.retrieves:
            return True
        if profile != self.profile or group_size != self.group_size:
            return False
        return not self.noise_recorded or hardened_dimension == self.hardened_dimension

    def charge(
        self, profile: Profile, hardened_dimension: int | None = None, group_size: int = 1
    ) -> npt.NDArray[np.float64]:
        """RDP curve (over ``DEFAULT_ORDERS``) one query of ``profile`` adds to the spend.

        Args:
            profile: the query's profile.
            hardened_dimension: the embedding dimension when the release uses the
                floating-point-safe discrete Gaussian (``dprdm.privacy.discrete``), else None.

        Raises:
            ValueError: if a single-profile budget is asked to charge another retrieving profile.
        """
        if not self.serves(profile, hardened_dimension, group_size):
            raise ValueError(
                f"this budget serves only {self.describe_mechanism()}; found profile "
                f"{mechanism_text(profile, hardened_dimension, group_size)}"
            )
        return mechanism_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension, group_size=group_size)

    @functools.cached_property
    def _converter(self) -> EpsilonConverter:
        return EpsilonConverter(DEFAULT_ORDERS, self.delta)

    @functools.cached_property
    def _filter(self) -> tuple[int, float] | None:
        if self.filter_order is None:
            return None
        a = float(self.filter_order)
        return DEFAULT_ORDERS.index(a), filter_capacity(self.epsilon, self.delta, a)

    @functools.cached_property
    def pld(self) -> PldPlan:
        """A PLD budget's plan: T_max and the per-T epsilon table (the stored one, else computed
        once per process: seconds; :func:`dprdm.privacy.pld.pld_plan`).

        Raises:
            ValueError: the budget's accountant is not ``"pld"``.
        """
        if self.accountant != "pld" or self.profile is None:
            raise ValueError(f"this budget is accounted by {self.accountant}, not pld")
        if self.pld_record is not None:
            return self.pld_record
        return pld_plan(epsilon=self.epsilon, delta=self.delta, profile=self.profile,
                        hardened_dimension=self.hardened_dimension, group_size=self.group_size)

    @functools.cached_property
    def _pld_curve(self) -> npt.NDArray[np.float64]:
        """The one charge curve a PLD budget admits (float noise: cheap, bit-identical to the server's)."""
        assert self.profile is not None
        return mechanism_rdp(self.profile, orders=DEFAULT_ORDERS, hardened_dimension=self.hardened_dimension,
                             group_size=self.group_size)

    def pld_queries(self, spent: npt.ArrayLike) -> int:
        """Queries charged to a PLD budget, read off its running curve ``spent`` = T x the charge
        curve (summed in admission order): T = round(max over orders of spent / charge). Float
        summation errors are ~T^2 1e-16 relative, far below 1/2 for any T <= MAX_PLD_QUERIES; a
        curve migrated to a new order grid (each order takes a value at a larger stored order,
        :func:`dprdm.privacy.orders.migrate_curve`) reads as >= T: the count errs high (safe)."""
        curve = np.asarray(spent, dtype=np.float64)
        unit = self._pld_curve
        use = np.isfinite(unit) & (unit > 0.0)
        if not use.any():
            return 0
        ratio = float(np.max(curve[use] / unit[use]))
        if math.isnan(ratio) or ratio > 1e15:
            return 2**62
        return max(0, math.floor(ratio + 0.5))

    def admits(self, spent: npt.ArrayLike, charge: npt.ArrayLike) -> bool:
        """Whether adding ``charge`` to ``spent`` (curves over ``DEFAULT_ORDERS``) stays within budget.

        O(#orders) with precomputed grid constants: the ledger calls it inside its transaction. A
        PLD budget admits only its mechanism's own charge curve (or a zero one) while the count
        stays <= T_max; any other curve is refused (the catalog never sends one).
        """
        total = np.asarray(spent, dtype=np.float64) + np.asarray(charge, dtype=np.float64)
        if self._filter is not None:
            idx, cap = self._filter
            return bool(total[idx] <= cap)
        if self.accountant == "pld":
            c = np.asarray(charge, dtype=np.float64)
            if c.any() and not np.array_equal(c, self._pld_curve):
                return False
            return self.pld_queries(total) <= self.pld.max_queries
        return self._converter.epsilon(total) <= self.epsilon

    def spent_epsilon(self, spent: npt.ArrayLike) -> float:
        """Informational epsilon spent at the budget's delta: min over the grid (RDP), or the PLD
        table's upper bound after the number of queries ``spent`` holds."""
        if self.accountant == "pld" and self.profile is not None:
            return self.pld.epsilon_after(self.pld_queries(spent))
        return self._converter.epsilon(np.asarray(spent, dtype=np.float64))

    def describe_mechanism(self) -> str:
        """One line naming the mechanism a single-profile budget serves (or "a Rényi filter")."""
        if self.profile is None:
            return f"a Rényi filter at order {self.filter_order:g}"
        if not self.noise_recorded:
            group = "" if self.group_size == 1 else f" (group size {self.group_size})"
            return f"profile {self.profile.to_dict()} with one noise kind (not recorded){group}"
        return f"profile {mechanism_text(self.profile, self.hardened_dimension, self.group_size)}"

    def describe_rule(self) -> str:
        """One line naming the admission rule and its accountant (for startup logs)."""
        if self.profile is None:
            return f"Rényi filter at order {self.filter_order:g} (RDP)"
        if self.accountant == "pld":
            plan = self.pld
            return (
                f"single profile, PLD: at most {plan.max_queries} queries of {self.describe_mechanism()} "
                f"(dp-accounting {plan.dp_accounting or '?'}, discretisation {plan.discretisation:g})"
            )
        return f"single profile, RDP (min over {len(DEFAULT_ORDERS)} orders) for {self.describe_mechanism()}"

    def summary(self) -> dict[str, Any]:
        """:meth:`to_dict` without the PLD table (for messages)."""
        out = self.to_dict()
        if "pld" in out:
            out["pld"] = {"max_queries": out["pld"]["max_queries"], "dp_accounting": out["pld"]["dp_accounting"]}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``hardened_dimension`` present iff a single budget's noise is recorded;
        ``accountant`` and the PLD plan (:attr:`pld`) iff the accountant is ``"pld"``)."""
        out: dict[str, Any] = {
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "profile": None if self.profile is None else self.profile.to_dict(),
            "filter_order": self.filter_order,
        }
        if self.profile is not None and self.noise_recorded:
            out["hardened_dimension"] = self.hardened_dimension
        if self.group_size != 1:
            out["group_size"] = self.group_size
        if self.accountant == "pld":  # absent means "rdp" (every budget stored before issue 17)
            out["accountant"] = self.accountant
            out["pld"] = self.pld.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """Inverse of :meth:`to_dict`; a single budget without ``hardened_dimension`` (written before
        noise kinds were recorded) has ``noise_recorded = False``; one without ``accountant``
        (written before issue 17) is ``"rdp"``.

        Raises:
            ValueError: a malformed field, or a stored PLD plan that does not match the budget.
        """
        prof = data.get("profile")
        plan = data.get("pld")
        return cls(
            epsilon=data["epsilon"],
            delta=data["delta"],
            profile=None if prof is None else Profile.from_dict(prof),
            filter_order=data.get("filter_order"),
            hardened_dimension=data.get("hardened_dimension"),
            noise_recorded=prof is None or "hardened_dimension" in data,
            group_size=int(data.get("group_size", 1)),
            accountant=str(data.get("accountant", "rdp")),
            pld_record=None if plan is None else PldPlan.from_dict(plan),
        )


def mechanism_rdp(
    profile: Profile, *, orders: Sequence[float] | npt.ArrayLike, hardened_dimension: int | None = None, group_size: int = 1
) -> npt.NDArray[np.float64]:
    """RDP curve of one query of a mechanism: the retrieval curve (float or discrete noise), or its
    group-2 bound (:func:`dprdm.privacy.group.group2_rdp`) on an index where one record can
    change two stored records.

    Raises:
        ValueError: a group size other than 1 or 2.
    """
    if group_size == 1:
        return retrieval_rdp(profile, orders=orders, hardened_dimension=hardened_dimension)
    if group_size == 2:
        return group2_rdp(profile, orders=orders, hardened_dimension=hardened_dimension)
    raise ValueError(f"group_size must be 1 or 2; found {group_size!r}")


def mechanism_text(profile: Profile, hardened_dimension: int | None, group_size: int = 1) -> str:
    """A mechanism in one phrase, e.g. ``{'k': 5, ...} with discrete noise at dimension 16 (group size 2)``
    (for errors and logs that name what a budget serves or refuses)."""
    noise = "float noise" if hardened_dimension is None else f"discrete noise at dimension {hardened_dimension}"
    group = "" if group_size == 1 else f" (group size {group_size})"
    return f"{profile.to_dict()} with {noise}{group}"
