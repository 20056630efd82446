"""Privacy loss distributions (PLD) for single-profile budgets (SPEC §4, issue 17).

A budget that serves ONE mechanism admits "at most T_max queries"; T-fold adaptive composition of
one mechanism is accounted here by its privacy loss distribution, with dp-accounting's PLD library
(``dp_accounting.pld``, imported lazily: it costs ~0.7 s to import). At the SPEC §4 reference
profile (sigma 0.05, q 0.01, k 23, delta 2e-5, epsilon 9.44) RDP admits 999 queries, PLD 1,455.

Why every number here is an UPPER bound on the epsilon (or delta) of the mechanism served
---------------------------------------------------------------------------------------
1. **Dominating pair of one query (float noise, group size 1).** Fix the neighbouring corpora
   D and D' = D + x* (add/remove one record) and the Poisson coins S of the other records (same
   law under both). Given S, the un-mixed release is N(v(S), sigma^2 I) under D and
   (1-q) N(v(S), sigma^2 I) + q N(v(S + x*), sigma^2 I) under D', with
   ||v(S + x*) - v(S)|| = s <= 2/k (``mechanism`` module docstring). Projected onto the shift the
   pair is one-dimensional; the kernel x -> (s/Delta) x + N(0, 1 - (s/Delta)^2) (in units of
   sigma, Delta = 2/k) maps N(0, 1) to itself and N(Delta/sigma, 1) to N(s/sigma, 1), so
   post-processing the shift-Delta pair gives the shift-s pair: for every alpha the hockey-stick
   divergence H_alpha (every alpha >= 0) is largest at s = Delta. Averaging over S (identical
   weights on both sides) cannot increase H_alpha (joint convexity). Hence the pair
   P = (1-q) N(0, z^2) + q N(1, z^2), Q = N(0, z^2) at multiplier z = sigma k / 2 (sensitivity 1)
   dominates one query in the "remove" direction (H_alpha(M(D') || M(D)) <= H_alpha(P || Q)) and
   (Q, P) in the "add" direction: the dominating pairs of the Poisson-subsampled Gaussian of
   Y. Zhu, J. Dong, Y.-X. Wang, "Optimal Accounting of Differential Privacy via Characteristic
   Function", AISTATS 2022 (Sec. 3: dominating pairs, their composition and Poisson subsampling;
   arXiv 2106.08567), which is what ``from_gaussian_mechanism(sampling_prob=q, neighboring_relation=ADD_OR_REMOVE_ONE)``
   builds (``pmf_remove`` and ``pmf_add``). The mix with the public query (lambda) is
   post-processing.
2. **Adaptive composition.** The direction (add or remove) is fixed by the pair (D, D') for all
   queries, and the T-fold product of a dominating pair dominates the adaptive T-fold composition
   (J. Dong, A. Roth, W. Su, "Gaussian Differential Privacy", JRSS-B 2022, composition theorem
   of f-DP, Sec. 3; Zhu et al. 2022, Sec. 3). dp-accounting composes each direction and reports
   the larger delta.
3. **Pessimistic discretisation.** With ``pessimistic_estimate=True`` the continuous PLD is
   replaced by the "connect the dots" PLD on the grid ``discretisation * Z`` (V. Doroshenko,
   B. Ghazi, P. Kamath, R. Kumar, P. Manurangsi, "Connect the Dots: Tighter Discrete
   Approximations of Privacy Loss Distributions", PoPETs 2022, the pessimistic connect-the-dots
   construction; arXiv 2207.04380): a pair of distributions that itself dominates the continuous
   one; the Gaussian's truncated tails
   (``log_mass_truncation_bound``) and the mass cut by each FFT composition
   (``tail_mass_truncation``) go to the +infinity loss, which only increases every delta; the
   returned epsilon is the smallest one whose delta is at most the target. Connect-the-dots is
   the best pessimistic estimate supported on its grid (same paper); the 1e-3 grid is a subset of
   the 1e-4 grid, so the coarse estimate is a pessimistic estimate on the fine grid too and lies
   above the fine one for every epsilon, and composition keeps that order (a dominating pair
   stays dominating): :data:`TABLE_DISCRETISATION` (1e-3) numbers bound the
   :data:`DISCRETISATION` (1e-4) ones, which is why the receipts' table and the calibration use
   the coarse, 10x cheaper grid and still never fall below the fine value (tests check it).
   Residual: the FFT convolutions' floating-point error (~1e-15 in probability), far below the
   upward rounding of every stored epsilon (:func:`ceil_digits`).
4. **Lattice rounding (discrete noise).** Private indexes release the rounded mean plus the exact
   discrete Gaussian N_Z(0, s^2) per coordinate on the lattice 2^k Z^d (s = sigma / 2^k, the shift
   between neighbours a lattice vector of norm <= Delta_w / 2^k, Delta_w = 2/k + 2^k sqrt(d):
   ``discrete_rdp`` item 1). :mod:`dprdm.privacy.lattice_gdp` proves that with the noise's tails
   replaced beyond A s by geometric ones (the "cut" law X'), the d-dimensional pair is mu-GDP with
   mu = (1 + eta) Delta_w / sigma (1 + eta = ``LatticeGdp.inflation``: ~1 + 1/A^4 at large s,
   ~1 + 7e-4 at s ~ 1,000). By Blackwell's
   theorem (DRS22, Thm 2.10) a mu-GDP pair (A, B) is the image of (N(0, 1), N(mu, 1)) under one
   kernel K, so, given the coins S of the other records, the pair of item 1
   ((1 - q) A + q B, A) = K((1 - q) N(0, 1) + q N(mu, 1), N(0, 1)) is a post-processing of the
   subsampled Gaussian pair at multiplier 1/mu = sigma / ((1 + eta) Delta_w); averaging over S and
   items 2-3 follow unchanged. So the cut server is bounded by the same dp-accounting PLD at that
   multiplier. The real server differs from the cut one, over T queries of d coordinates, with
   probability <= T d ``tail_tv`` (``lattice_gdp`` (vii)), so it is
   (eps, delta_cut(eps) + (1 + e^eps) T d tail_tv)-DP: :data:`TAIL_SHARE` of every delta is
   reserved for that term (the PLD is asked for delta (1 - TAIL_SHARE)) and each result checks
   the term fits in the reserve (+inf epsilon otherwise, which no budget reaches). The cut A is
   the smallest one whose term fits for every epsilon <= :data:`_EPS_CAP`, delta >=
   :data:`_DELTA_FLOOR` and T <= :data:`MAX_PLD_QUERIES` (A ~ 20 at d 512). At the reference
   profile (s = 52,428.8, d 512) eta ~ 7.7e-6 and the widening 2^-20 sqrt(512) is 2.5e-4 of 2/k:
   1,455 float queries become 1,453 discrete ones. Noise
   scales s < 1 lattice step (sigma < 2^-20) have no pair (the theorem needs s >= 1). Group size
   2 (one record changing two stored records on capacity-limited IVF lists) has no pair here.

:func:`pld_dominating_pair` is the ONE place that decides which mechanisms have a pair; a proven
bound for the lattice can be plugged in there.

Costs (one core, reference profile): the one-query PLD ~0.6 s to build at 1e-4 (0.05 s at 1e-3);
one self-composition to T ~ 1,455 ~0.3 s at 1e-4 (0.03 s at 1e-3). :func:`max_queries_pld`
searches on the coarse grid (doubling, then bisection) and certifies the result on the fine grid
(typically 2 fine compositions), 2.3 s in all; :func:`pld_plan` adds the receipts' table (about
100 coarse compositions, 2.1 s). Results are cached per process; a ledger keeps the plan with the
budget, so a restart recomputes nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

from .lattice import DEFAULT_LATTICE_EXPONENT, widened_sensitivity
from .lattice_gdp import MIN_SCALE, choose_cut, lattice_gdp
from .mechanism import Profile

__all__ = [
    "DISCRETISATION",
    "TABLE_DISCRETISATION",
    "MAX_PLD_QUERIES",
    "TAIL_SHARE",
    "lattice_cut",
    "GaussianPair",
    "PldPlan",
    "ceil_digits",
    "dp_accounting_version",
    "pld_dominating_pair",
    "pld_refusal",
    "require_pair",
    "epsilon_pld",
    "delta_pld",
    "max_queries_pld",
    "pld_plan",
]

DISCRETISATION = 1e-4
"""``value_discretization_interval`` that certifies T_max and every epsilon/delta reported
(dp-accounting's default)."""
TABLE_DISCRETISATION = 1e-3
"""Coarser grid (an upper bound of the fine one, module docstring item 3): the T_max search's
bracket, calibration and the receipts' table."""
MAX_PLD_QUERIES = 1_000_000
"""T_max is capped here (a composition to 10^6 queries is already ~seconds); a larger budget
admits this many (conservative)."""
TAIL_SHARE = 1e-6
"""Share of every delta reserved for the lattice cut's total variation (module docstring, item 4)."""
_EPS_CAP = 100.0
_DELTA_FLOOR = 1e-30
"""The cut is chosen so that its term fits in the reserve for every epsilon <= 100 and delta >= 1e-30."""
_TABLE_RATIO = 1.05
"""Receipts' table: every T up to 8, then grid points at most 5 % apart, T_max included."""
_DIGITS = 9
"""Significant digits of every stored epsilon (rounded UP)."""


def dp_accounting_version() -> str:
    """The installed dp-accounting version (recorded with every PLD plan); "" when not installed."""
    try:
        return importlib.metadata.version("dp-accounting")
    except importlib.metadata.PackageNotFoundError:
        return ""


def ceil_digits(value: float, digits: int = _DIGITS) -> float:
    """``value`` rounded UP to ``digits`` significant digits (the float parsed back is >= value)."""
    if not math.isfinite(value) or value == 0.0:
        return float(value)
    d = Decimal(repr(float(value)))
    step = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return float(d.quantize(step, rounding=ROUND_CEILING))


@dataclass(frozen=True)
class GaussianPair:
    """The dominating pair of one query: P = (1 - q) N(0, z^2) + q N(1, z^2) and Q = N(0, z^2)
    (remove direction), (Q, P) (add); sensitivity 1, ``noise_multiplier`` z = sigma k / 2 for float
    noise (module docstring, item 1), sigma / ((1 + eta) Delta_w) for the lattice (item 4), whose
    ``tail_tv`` bounds the total variation of one query's noise from the cut law (0 for float)."""

    q: float
    noise_multiplier: float
    tail_tv: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 < float(self.q) <= 1.0):
            raise ValueError(f"q must be in (0, 1]; found {self.q!r}")
        z = float(self.noise_multiplier)
        if not (z >= 0.0) or math.isinf(z):
            raise ValueError(f"noise_multiplier must be finite and >= 0; found {self.noise_multiplier!r}")
        tv = float(self.tail_tv)
        if not (0.0 <= tv < 1.0):
            raise ValueError(f"tail_tv must be in [0, 1); found {self.tail_tv!r}")

    def to_dict(self) -> dict[str, float]:
        """Plain-JSON form (``tail_tv`` only when non-zero: float pairs keep their old form)."""
        out = {"q": float(self.q), "noise_multiplier": float(self.noise_multiplier)}
        if self.tail_tv:
            out["tail_tv"] = float(self.tail_tv)
        return out


def _lattice_scale(sigma: float) -> float:
    """s = sigma / 2^k: the discrete Gaussian's parameter in lattice steps."""
    return math.ldexp(float(sigma), -DEFAULT_LATTICE_EXPONENT)


def lattice_cut(dimension: int) -> float:
    """The cut A of item 4 at dimension d: the smallest whose per-coordinate total variation,
    times (1 + e^eps) T d, fits in the reserve ``TAIL_SHARE * delta`` for every epsilon <=
    :data:`_EPS_CAP`, delta >= :data:`_DELTA_FLOOR` and T <= :data:`MAX_PLD_QUERIES`."""
    allowance = (
        math.log(TAIL_SHARE * _DELTA_FLOOR)
        - (_EPS_CAP + math.log1p(math.exp(-_EPS_CAP)))
        - math.log(MAX_PLD_QUERIES)
        - math.log(dimension)
    )
    return choose_cut(allowance)


def pld_refusal(
    *, hardened_dimension: int | None, group_size: int = 1, profile: Profile | None = None
) -> str | None:
    """Why a mechanism has no PLD dominating pair here (None: it has one). One phrase, for errors.

    ``profile`` lets the lattice's scale condition be checked (without it, discrete noise is assumed
    to meet it)."""
    if group_size != 1:
        return f"PLD is not implemented for group size {group_size} (one record changing two stored records)"
    if hardened_dimension is not None and profile is not None and profile.sigma > 0.0:
        s = _lattice_scale(profile.sigma)
        if s < MIN_SCALE:
            return (
                f"PLD for discrete lattice noise needs sigma >= {math.ldexp(MIN_SCALE, DEFAULT_LATTICE_EXPONENT):.3g} "
                f"(one lattice step); found sigma {profile.sigma!r} (privacy.lattice_gdp)"
            )
    return None


@functools.lru_cache(maxsize=256)
def _lattice_pair(q: float, sigma: float, sensitivity: float, dimension: int) -> GaussianPair:
    """Item 4: the subsampled Gaussian pair at multiplier sigma / ((1 + eta) Delta_w), rounded down."""
    gdp = lattice_gdp(_lattice_scale(sigma), lattice_cut(dimension))
    z = sigma / (gdp.inflation * widened_sensitivity(sensitivity, dimension, DEFAULT_LATTICE_EXPONENT))
    z = math.nextafter(math.nextafter(z, 0.0), 0.0)  # two ulps down: the division and the product
    return GaussianPair(q=q, noise_multiplier=z, tail_tv=min(0.5, dimension * gdp.tail_tv))


def pld_dominating_pair(
    profile: Profile, hardened_dimension: int | None, *, group_size: int = 1
) -> GaussianPair | None:
    """The dominating pair of one query of a mechanism, or None when none is proven here.

    Args:
        profile: the retrieval profile (must retrieve: lambda > 0).
        hardened_dimension: None for float noise (item 1); d for the exact discrete Gaussian on the
            lattice at dimension d (item 4: None when sigma is below one lattice step).
        group_size: 1, or 2 on capacity-limited IVF lists (-> None).

    Raises:
        ValueError: a profile that never retrieves (lambda = 0 releases nothing private).
    """
    if not profile.retrieves:
        raise ValueError(f"profile {profile.to_dict()} never retrieves (lambda = 0): nothing to account")
    if pld_refusal(hardened_dimension=hardened_dimension, group_size=group_size, profile=profile) is not None:
        return None
    if hardened_dimension is None or profile.sigma == 0.0:
        return GaussianPair(q=profile.q, noise_multiplier=profile.noise_multiplier)
    d = int(hardened_dimension)
    if d < 1:
        raise ValueError(f"hardened_dimension must be an integer >= 1; found {hardened_dimension!r}")
    return _lattice_pair(float(profile.q), float(profile.sigma), float(profile.sensitivity), d)


def require_pair(profile: Profile, hardened_dimension: int | None, *, group_size: int = 1) -> GaussianPair:
    """:func:`pld_dominating_pair`, raising ``ValueError`` with the reason when there is none."""
    pair = pld_dominating_pair(profile, hardened_dimension, group_size=group_size)
    if pair is None:
        raise ValueError(str(pld_refusal(hardened_dimension=hardened_dimension, group_size=group_size,
                                         profile=profile)))
    return pair


# ---------------------------------------------------------------------------------- dp-accounting


@functools.lru_cache(maxsize=32)
def _base(q: float, z: float, discretisation: float) -> Any:
    """dp-accounting's pessimistic PLD of one query (both directions); cached per process."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=z,
        sensitivity=1.0,
        sampling_prob=q,
        pessimistic_estimate=True,
        value_discretization_interval=discretisation,
        use_connect_dots=True,
        neighboring_relation=pld_lib.NeighborRel.ADD_OR_REMOVE_ONE,
    )


def _composed(q: float, z: float, queries: int, discretisation: float) -> Any:
    """The T-fold composition exactly as dp-accounting's ``PLDAccountant`` computes it for
    ``compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)``: the identity PLD composed with
    ``self_compose(T)`` of the one-query PLD (that last composition's tail truncation adds its
    mass to the infinite loss too, so this is the library accountant's number, bit for bit, and
    never below it)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    identity = pld_lib.identity(value_discretization_interval=discretisation)
    return identity.compose(_base(q, z, discretisation).self_compose(queries))


def _log_tail_term(epsilon: float, queries: int, tail_tv: float) -> float:
    """log((1 + e^eps) T tail_tv): the cut's share of delta (item 4); -inf without a tail."""
    if tail_tv == 0.0 or queries == 0:
        return -math.inf
    log_one_plus = epsilon + math.log1p(math.exp(-epsilon)) if epsilon > 0 else math.log1p(math.exp(epsilon))
    return log_one_plus + math.log(queries) + math.log(tail_tv)


@functools.lru_cache(maxsize=4096)
def _epsilon(q: float, z: float, queries: int, delta: float, discretisation: float, tail_tv: float = 0.0) -> float:
    if queries == 0:
        return 0.0
    if z == 0.0:
        return math.inf
    target = delta * (1.0 - TAIL_SHARE) if tail_tv else delta
    try:
        eps = float(_composed(q, z, queries, discretisation).get_epsilon_for_delta(target))
    except MemoryError:  # a tiny multiplier: the loss grid would not fit in memory; +inf refuses safely
        return math.inf
    if tail_tv and _log_tail_term(eps, queries, tail_tv) > math.log(delta * TAIL_SHARE):
        return math.inf  # the cut's term does not fit in the reserve (never for eps <= 100, delta >= 1e-30)
    return eps


@functools.lru_cache(maxsize=1024)
def _delta(q: float, z: float, queries: int, epsilon: float, discretisation: float, tail_tv: float = 0.0) -> float:
    if queries == 0:
        return 0.0
    if z == 0.0:
        return 1.0
    try:
        value = float(_composed(q, z, queries, discretisation).get_delta_for_epsilon(epsilon))
    except MemoryError:  # as in _epsilon: the conservative answer
        return 1.0
    term = _log_tail_term(epsilon, queries, tail_tv)
    if term > -math.inf:
        value += math.exp(min(term, 0.0))
    return min(1.0, value)


def _check(epsilon: float | None, delta: float | None, queries: int | None) -> None:
    if epsilon is not None and (not (float(epsilon) > 0.0) or math.isinf(float(epsilon))):
        raise ValueError(f"epsilon must be finite and > 0; found {epsilon!r}")
    if delta is not None and not (0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1); found {delta!r}")
    if queries is not None and (not isinstance(queries, int) or isinstance(queries, bool) or queries < 0):
        raise ValueError(f"queries must be an integer >= 0; found {queries!r}")


def epsilon_pld(
    *,
    profile: Profile,
    queries: int,
    delta: float,
    hardened_dimension: int | None = None,
    group_size: int = 1,
    discretisation: float = DISCRETISATION,
) -> float:
    """Epsilon of ``queries`` adaptive releases of the mechanism at ``delta`` (upper bound; module
    docstring). 0 for zero queries or a profile that never retrieves; +inf for sigma = 0.

    Raises:
        ValueError: a bad argument, or a mechanism without a PLD pair (the reason).
    """
    _check(None, delta, queries)
    if not profile.retrieves:
        return 0.0
    pair = require_pair(profile, hardened_dimension, group_size=group_size)
    return _epsilon(pair.q, pair.noise_multiplier, queries, float(delta), discretisation, pair.tail_tv)


def delta_pld(
    *,
    profile: Profile,
    queries: int,
    epsilon: float,
    hardened_dimension: int | None = None,
    group_size: int = 1,
) -> float:
    """Delta of ``queries`` adaptive releases at ``epsilon`` (upper bound), in [0, 1].

    Raises:
        ValueError: a bad argument, or a mechanism without a PLD pair.
    """
    _check(None, None, queries)
    if not (float(epsilon) >= 0.0) or math.isinf(float(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0; found {epsilon!r}")
    if not profile.retrieves:
        return 0.0
    pair = require_pair(profile, hardened_dimension, group_size=group_size)
    return _delta(pair.q, pair.noise_multiplier, queries, float(epsilon), DISCRETISATION, pair.tail_tv)


def _largest(ok: Any, lo: int, hi: int) -> int:
    """Largest T in [lo, hi) with ok(T), given ok(lo) and not ok(hi) (ok non-increasing)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@functools.lru_cache(maxsize=256)
def _max_queries(q: float, z: float, epsilon: float, delta: float, tail_tv: float = 0.0) -> int:
    """Largest T <= MAX_PLD_QUERIES whose fine-grid epsilon is <= ``epsilon`` (0 if none)."""

    def fine(t: int) -> bool:
        return _epsilon(q, z, t, delta, DISCRETISATION, tail_tv) <= epsilon

    def coarse(t: int) -> bool:
        return _epsilon(q, z, t, delta, TABLE_DISCRETISATION, tail_tv) <= epsilon

    if not fine(1):
        return 0
    # bracket on the coarse grid (cheap), then certify on the fine one
    guess = 0
    if coarse(1):
        hi = 2
        while hi <= MAX_PLD_QUERIES and coarse(hi):
            hi *= 2
        guess = MAX_PLD_QUERIES if hi > MAX_PLD_QUERIES else _largest(coarse, hi // 2, hi)
    guess = max(guess, 1)
    if fine(guess):  # gallop up from a feasible point
        step = 1
        while True:
            nxt = guess + step
            if nxt > MAX_PLD_QUERIES:
                return MAX_PLD_QUERIES if fine(MAX_PLD_QUERIES) else _largest(fine, guess, MAX_PLD_QUERIES)
            if not fine(nxt):
                return _largest(fine, guess, nxt)
            guess, step = nxt, step * 2
    step, cand = 1, guess - 1  # gallop down to a feasible point (fine(1) holds)
    while not fine(cand):
        guess, step = cand, step * 2
        cand = max(1, guess - step)
    return _largest(fine, cand, guess)


def max_queries_pld(
    *,
    epsilon: float,
    delta: float,
    profile: Profile,
    hardened_dimension: int | None = None,
    group_size: int = 1,
) -> int | None:
    """Largest T (<= :data:`MAX_PLD_QUERIES`) such that T adaptive releases cost at most
    ``epsilon`` at ``delta`` by the fine-grid PLD; None means unlimited (lambda = 0). Rounded down
    by construction (an integer certified by an upper bound); cached per process.

    Raises:
        ValueError: a bad argument, or a mechanism without a PLD pair (the reason).
    """
    _check(epsilon, delta, None)
    if not profile.retrieves:
        return None
    pair = require_pair(profile, hardened_dimension, group_size=group_size)
    if pair.noise_multiplier == 0.0:
        return 0
    return _max_queries(pair.q, pair.noise_multiplier, float(epsilon), float(delta), pair.tail_tv)


# --------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PldPlan:
    """A PLD budget's rule, fixed when the budget is created and stored with it in the ledger.

    Attributes:
        pair: the mechanism's dominating pair.
        epsilon, delta: the budget.
        max_queries: T_max (fine grid; module docstring).
        table: (T_i, eps_i) with 1 = T_1 < ... < T_n = T_max and eps_i non-decreasing: an upper
            bound on epsilon after T_i queries, rounded UP to 9 significant digits; for T in
            (T_{i-1}, T_i] :meth:`epsilon_after` reports eps_i (epsilon is non-decreasing in T).
        dp_accounting: the library version that computed it.
        discretisation, table_discretisation: the two grids.
    """

    pair: GaussianPair
    epsilon: float
    delta: float
    max_queries: int
    table: tuple[tuple[int, float], ...]
    dp_accounting: str
    discretisation: float = DISCRETISATION
    table_discretisation: float = TABLE_DISCRETISATION

    def __post_init__(self) -> None:
        _check(self.epsilon, self.delta, self.max_queries)
        ts = [t for t, _ in self.table]
        eps = [e for _, e in self.table]
        if self.max_queries and (not ts or ts[0] != 1 or ts[-1] != self.max_queries):
            raise ValueError(f"a PLD table must run from T = 1 to T_max = {self.max_queries}")
        if any(b <= a for a, b in zip(ts, ts[1:])) or any(b < a for a, b in zip(eps, eps[1:])):
            raise ValueError("a PLD table must have increasing T and non-decreasing epsilons")
        if any(not (e >= 0.0) for e in eps):
            raise ValueError("a PLD table's epsilons must be >= 0")

    def epsilon_after(self, queries: int) -> float:
        """Upper bound on epsilon after ``queries`` queries (0 for none; +inf past T_max, which
        admission never reaches)."""
        if queries <= 0:
            return 0.0
        if queries > self.max_queries:
            return math.inf
        lo, hi = 0, len(self.table) - 1  # smallest T_i >= queries
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.table[mid][0] < queries else (lo, mid)
        return self.table[lo][1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored with the budget)."""
        return {
            "pair": self.pair.to_dict(),
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "max_queries": int(self.max_queries),
            "table": [[int(t), float(e)] for t, e in self.table],
            "dp_accounting": self.dp_accounting,
            "discretisation": float(self.discretisation),
            "table_discretisation": float(self.table_discretisation),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PldPlan:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a malformed field."""
        try:
            return cls(
                pair=GaussianPair(**data["pair"]),
                epsilon=float(data["epsilon"]),
                delta=float(data["delta"]),
                max_queries=int(data["max_queries"]),
                table=tuple((int(t), float(e)) for t, e in data["table"]),
                dp_accounting=str(data["dp_accounting"]),
                discretisation=float(data["discretisation"]),
                table_discretisation=float(data["table_discretisation"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed PLD plan: {exc!r}") from None


def _table_points(t_max: int) -> list[int]:
    points = list(range(1, min(8, t_max) + 1))
    while points and points[-1] < t_max:
        points.append(min(t_max, max(points[-1] + 1, math.ceil(points[-1] * _TABLE_RATIO))))
    return points


@functools.lru_cache(maxsize=64)
def _plan(q: float, z: float, epsilon: float, delta: float, tail_tv: float = 0.0) -> PldPlan:
    pair = GaussianPair(q=q, noise_multiplier=z, tail_tv=tail_tv)
    t_max = 0 if z == 0.0 else _max_queries(q, z, epsilon, delta, tail_tv)
    table: list[tuple[int, float]] = []
    running = 0.0
    for t in _table_points(t_max):
        value = _epsilon(q, z, t, delta, TABLE_DISCRETISATION, tail_tv)
        if t == t_max:  # certified on the fine grid (<= epsilon); the coarse one bounds it too
            value = min(value, _epsilon(q, z, t, delta, DISCRETISATION, tail_tv))
        running = max(running, ceil_digits(value))
        table.append((t, running))
    return PldPlan(pair=pair, epsilon=epsilon, delta=delta, max_queries=t_max, table=tuple(table),
                   dp_accounting=dp_accounting_version())


def pld_plan(
    *,
    epsilon: float,
    delta: float,
    profile: Profile,
    hardened_dimension: int | None = None,
    group_size: int = 1,
) -> PldPlan:
    """T_max and the receipts' epsilon table of a single-profile PLD budget (cached per process).

    Raises:
        ValueError: a bad argument, a profile that never retrieves, or a mechanism without a pair.
    """
    _check(epsilon, delta, None)
    pair = require_pair(profile, hardened_dimension, group_size=group_size)
    return _plan(pair.q, pair.noise_multiplier, float(epsilon), float(delta), pair.tail_tv)
