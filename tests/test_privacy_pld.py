"""Issue 17: the PLD accountant of single-profile budgets (``dprdm.privacy.pld``) and PLD budgets.

Oracle: dp-accounting's own ``PLDAccountant`` (``compose(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma k / 2)), T)``, pessimistic, add/remove), called directly. Ours must never be
below it; PLD must never be above RDP; the receipts' table must bound the oracle at every T.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dprdm.ledger import BudgetExhausted, MemoryLedger, QuotaExhausted, SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, epsilon_for, max_queries, mechanism_rdp
from dprdm.privacy import pld as pld_mod
from dprdm.privacy.calibration import calibrate_k, calibrate_q, calibrate_sigma
from dprdm.privacy.pld import (
    DISCRETISATION,
    TABLE_DISCRETISATION,
    GaussianPair,
    delta_pld,
    epsilon_pld,
    max_queries_pld,
    pld_dominating_pair,
    pld_plan,
    require_pair,
)

REFERENCE = Profile(k=23, q=0.01, sigma=0.05, lam=1.0)  # SPEC §4
SMALL = Profile(k=5, q=0.5, sigma=0.8, lam=0.5)  # T_max 10 at epsilon 4, delta 1e-5


def oracle(profile: Profile, queries: int, delta: float, discretisation: float = DISCRETISATION) -> float:
    """dp-accounting's PLDAccountant, used directly."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretisation)
    acc.compose(dp_event.PoissonSampledDpEvent(profile.q, dp_event.GaussianDpEvent(profile.noise_multiplier)), queries)
    return float(acc.get_epsilon(delta))


def _random_profiles(n: int, seed: int, low: float = -0.3) -> list[tuple[Profile, float, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 40))
        q = float(min(1.0, 10 ** rng.uniform(-2.5, 0.0)))
        z = float(10 ** rng.uniform(low, 0.7))  # multiplier 10^low (0.5) .. 5
        out.append((Profile(k=k, q=q, sigma=2 * z / k, lam=1.0), float(10 ** rng.uniform(-8, -4)), int(rng.integers(1, 200))))
    return out


def test_never_below_dp_accounting_and_never_above_rdp_on_55_random_profiles() -> None:
    """55 random float profiles (coarse grid: 10x cheaper, the same code path): ours equals the
    library accountant (never below it), and the PLD epsilon is at most the RDP epsilon."""
    for profile, delta, t in _random_profiles(55, seed=17):
        ours = epsilon_pld(profile=profile, queries=t, delta=delta, discretisation=TABLE_DISCRETISATION)
        assert ours >= oracle(profile, t, delta, TABLE_DISCRETISATION), (profile, delta, t)
        assert ours <= epsilon_for(profile, queries=t, delta=delta), (profile, delta, t)


def test_discrete_noise_between_the_float_pld_and_the_discrete_rdp_on_random_profiles() -> None:
    """14 random profiles with DISCRETE lattice noise at random dimensions: the lattice PLD epsilon is
    at least the float one (the oracle: the lattice can only cost) and at most the discrete RDP one
    the server would otherwise charge."""
    rng = np.random.default_rng(29)
    for profile, delta, t in _random_profiles(14, seed=31):
        d = int(rng.choice([16, 512, 768, 1280]))
        ours = epsilon_pld(profile=profile, queries=t, delta=delta, hardened_dimension=d,
                           discretisation=TABLE_DISCRETISATION)
        assert ours >= oracle(profile, t, delta, TABLE_DISCRETISATION), (profile, delta, t, d)
        assert ours <= epsilon_for(profile, queries=t, delta=delta, hardened_dimension=d), (profile, delta, t, d)


def test_max_queries_is_certified_by_the_oracle() -> None:
    """T_max: the oracle (fine grid) admits T_max and refuses T_max + 1; the target epsilon sits
    between two consecutive oracle values, so an off-by-one either way fails."""
    rng = np.random.default_rng(5)
    for profile, delta, _t in _random_profiles(3, seed=23, low=0.0):  # z >= 1: cheap fine-grid PLDs
        target = int(rng.integers(5, 150))
        eps = 0.5 * (oracle(profile, target, delta) + oracle(profile, target + 1, delta))
        t_max = max_queries_pld(epsilon=eps, delta=delta, profile=profile)
        assert t_max == target, (profile, delta, target, t_max)
        assert oracle(profile, t_max, delta) <= eps < oracle(profile, t_max + 1, delta)


def test_reference_profile_golden() -> None:
    """SPEC §4: sigma 0.05, q 0.01, k 23, delta 2e-5, epsilon 9.44: RDP 999 queries, PLD exactly 1455."""
    t_max = max_queries_pld(epsilon=9.44, delta=2e-5, profile=REFERENCE)
    assert t_max == 1455 and t_max >= 1400
    assert max_queries(epsilon=9.44, delta=2e-5, profile=REFERENCE) == 999
    assert epsilon_pld(profile=REFERENCE, queries=1455, delta=2e-5) <= 9.44 < oracle(REFERENCE, 1456, 2e-5)
    plan = pld_plan(epsilon=9.44, delta=2e-5, profile=REFERENCE)
    assert plan.max_queries == 1455 and plan.epsilon_after(1455) <= 9.44
    assert plan.epsilon_after(999) >= oracle(REFERENCE, 999, 2e-5)


def test_table_bounds_the_oracle_at_every_t() -> None:
    """Receipts' table: >= the fine-grid oracle at EVERY T up to T_max, non-decreasing, rounded up."""
    profile = Profile(k=8, q=0.3, sigma=0.5, lam=1.0)
    eps, delta = 4.0, 1e-5
    plan = pld_plan(epsilon=eps, delta=delta, profile=profile)
    assert 20 <= plan.max_queries <= 200, plan.max_queries
    values = [plan.epsilon_after(t) for t in range(plan.max_queries + 1)]
    assert values[0] == 0.0 and values == sorted(values) and values[-1] <= eps
    for t in range(1, plan.max_queries + 1):
        assert values[t] >= oracle(profile, t, delta), t
    assert plan.epsilon_after(plan.max_queries + 1) == math.inf
    assert plan.table[0][0] == 1 and plan.table[-1][0] == plan.max_queries


def test_delta_is_the_inverse_and_monotone() -> None:
    eps = epsilon_pld(profile=SMALL, queries=7, delta=1e-5)
    assert delta_pld(profile=SMALL, queries=7, epsilon=eps) <= 1e-5 * (1 + 1e-9)
    assert delta_pld(profile=SMALL, queries=8, epsilon=eps) > 1e-5
    assert delta_pld(profile=SMALL, queries=0, epsilon=0.0) == 0.0


def test_one_function_decides_the_dominating_pair() -> None:
    assert pld_dominating_pair(SMALL, None) == GaussianPair(q=0.5, noise_multiplier=2.0)
    lattice = pld_dominating_pair(SMALL, 16)  # discrete lattice noise: item 4 (privacy.lattice_gdp)
    assert lattice is not None and lattice.q == 0.5 and 0.0 < lattice.tail_tv < 1e-80
    assert 2.0 * 0.999 < lattice.noise_multiplier < 2.0  # widened sensitivity and the GDP inflation
    assert pld_dominating_pair(SMALL, None, group_size=2) is None
    tiny = Profile(k=5, q=0.5, sigma=2.0**-21, lam=0.5)  # half a lattice step
    assert pld_dominating_pair(tiny, 16) is None and pld_dominating_pair(tiny, None) is not None
    with pytest.raises(ValueError, match=r"needs sigma >= 9.54e-07 .*found sigma 4.76837158203125e-07"):
        require_pair(tiny, 512)
    with pytest.raises(ValueError, match="sigma >= "):
        epsilon_pld(profile=tiny, queries=3, delta=1e-5, hardened_dimension=16)
    with pytest.raises(ValueError, match="group size 2"):
        max_queries_pld(epsilon=1.0, delta=1e-5, profile=SMALL, group_size=2)
    public = Profile(k=5, q=0.5, sigma=0.8, lam=0.0)
    assert max_queries_pld(epsilon=1.0, delta=1e-5, profile=public) is None
    assert epsilon_pld(profile=public, queries=10, delta=1e-5) == 0.0
    noiseless = Profile(k=5, q=0.5, sigma=0.0, lam=1.0)
    assert max_queries_pld(epsilon=1.0, delta=1e-5, profile=noiseless) == 0
    assert epsilon_pld(profile=noiseless, queries=1, delta=1e-5) == math.inf
    for bad, match in ((dict(epsilon=0.0, delta=1e-5), "epsilon"), (dict(epsilon=1.0, delta=1.5), "delta")):
        with pytest.raises(ValueError, match=match):
            max_queries_pld(profile=SMALL, **bad)  # type: ignore[arg-type]


# -- budgets ---------------------------------------------------------------------------------------


def test_budget_accountant_validation() -> None:
    with pytest.raises(ValueError, match="accountant must be one of rdp, pld; found 'prv'"):
        Budget.single(4.0, 1e-5, SMALL, accountant="prv")
    tiny = Profile(k=5, q=0.5, sigma=2.0**-21, lam=0.5)
    with pytest.raises(ValueError, match="refused for profile .* discrete noise at dimension 16.*needs sigma >="):
        Budget.single(4.0, 1e-5, tiny, hardened_dimension=16, accountant="pld")
    assert Budget.single(4.0, 1e-5, SMALL, hardened_dimension=16, accountant="pld").pld.max_queries == 10
    with pytest.raises(ValueError, match="noise kind recorded"):
        Budget.single(4.0, 1e-5, SMALL, noise_recorded=False, accountant="pld")
    with pytest.raises(ValueError, match="needs a single-profile budget"):
        Budget(epsilon=4.0, delta=1e-5, filter_order=8.0, accountant="pld")
    with pytest.raises(ValueError, match="accounted by rdp, not pld"):
        _ = Budget.single(4.0, 1e-5, SMALL).pld


def test_budget_round_trip_keeps_the_plan_and_old_budgets_load_as_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = Budget.single(4.0, 1e-5, SMALL, accountant="pld")
    doc = budget.to_dict()
    assert doc["accountant"] == "pld" and doc["pld"]["max_queries"] == 10 == budget.pld.max_queries
    monkeypatch.setattr(pld_mod, "_plan", lambda *a: pytest.fail("the stored plan is used, never recomputed"))
    back = Budget.from_dict(doc)
    assert back == budget and back.pld == budget.pld and back.pld is back.pld_record
    legacy = {k: v for k, v in doc.items() if k not in ("accountant", "pld")}
    assert Budget.from_dict(legacy).accountant == "rdp"
    tampered = {**doc, "pld": {**doc["pld"], "epsilon": 40.0}}
    with pytest.raises(ValueError, match="stored PLD plan .* does not match the budget"):
        Budget.from_dict(tampered)


def _reserve_all(ledger, domain: str, charge, tenant: str = "t") -> list:
    receipts = []
    with pytest.raises(BudgetExhausted):
        for i in range(10_000):
            res = ledger.reserve(domain=domain, tenant=tenant, request_id=f"{tenant}{i}", binding_hash=f"b{i}",
                                 profile=SMALL.to_dict(), charge_rdp=charge)
            receipts.append(res.receipt)
    return receipts


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_ledger_admits_exactly_t_max_with_conservative_receipts(store: str, tmp_path, monkeypatch) -> None:
    eps, delta = 4.0, 1e-5
    ledger = MemoryLedger() if store == "memory" else SqliteLedger(tmp_path / "l.sqlite3")
    ledger.create_budget("d", Budget.single(eps, delta, SMALL, accountant="pld"))
    charge = mechanism_rdp(SMALL, orders=DEFAULT_ORDERS)
    other = mechanism_rdp(Profile(k=6, q=0.5, sigma=0.8, lam=0.5), orders=DEFAULT_ORDERS)
    with pytest.raises(BudgetExhausted):  # another mechanism's curve is never admitted
        ledger.reserve(domain="d", tenant="t", request_id="x", binding_hash="x", profile={}, charge_rdp=other)
    receipts = _reserve_all(ledger, "d", charge)
    t_max = max_queries_pld(epsilon=eps, delta=delta, profile=SMALL)
    assert len(receipts) == t_max == 10
    assert max_queries(epsilon=eps, delta=delta, profile=SMALL) == 8  # RDP admits fewer
    spent = [r.epsilon_spent for r in receipts]
    assert spent == sorted(spent) and spent[-1] <= eps
    for t in (1, 5, t_max):
        r = receipts[t - 1]
        assert oracle(SMALL, t, delta) <= r.epsilon_spent
        assert r.epsilon_left == pytest.approx(eps - r.epsilon_spent) and r.epsilon_left <= eps - oracle(SMALL, t, delta)
    assert receipts[0].epsilon_charged == receipts[0].epsilon_spent
    assert ledger.budget_state("d").spends == t_max
    if store == "sqlite":  # a reopened ledger uses the stored plan: nothing is recomputed
        ledger.close()
        monkeypatch.setattr(pld_mod, "_plan", lambda *a: pytest.fail("recomputed"))
        monkeypatch.setattr(pld_mod, "_max_queries", lambda *a: pytest.fail("recomputed"))
        again = SqliteLedger(tmp_path / "l.sqlite3")
        assert again.budget_state("d").budget.pld.max_queries == t_max
        with pytest.raises(BudgetExhausted):
            again.reserve(domain="d", tenant="t", request_id="late", binding_hash="late", profile={}, charge_rdp=charge)
        again.close()


def test_tenant_quota_uses_the_pld_table() -> None:
    ledger = MemoryLedger()
    budget = Budget.single(4.0, 1e-5, SMALL, accountant="pld")
    quota = budget.pld.epsilon_after(3)
    ledger.create_budget("d", budget, tenant_quotas={"alice": quota})
    charge = mechanism_rdp(SMALL, orders=DEFAULT_ORDERS)
    for i in range(3):
        ledger.reserve(domain="d", tenant="alice", request_id=f"a{i}", binding_hash=f"a{i}", profile={}, charge_rdp=charge)
    with pytest.raises(QuotaExhausted):
        ledger.reserve(domain="d", tenant="alice", request_id="a3", binding_hash="a3", profile={}, charge_rdp=charge)


def test_query_count_read_off_the_curve_is_exact_or_high() -> None:
    budget = Budget.single(40.0, 1e-5, SMALL, accountant="pld")
    unit = mechanism_rdp(SMALL, orders=DEFAULT_ORDERS)
    spent = np.zeros_like(unit)
    for t in range(1, 3001):
        spent = spent + unit  # the ledger's sequential sum
        if t in (1, 2, 10, 999, 3000):
            assert budget.pld_queries(spent) == t
    assert budget.pld_queries(np.zeros_like(unit)) == 0
    migrated = spent.copy()
    migrated[5:] = np.maximum(spent[5:], 3000 * np.roll(unit, -1)[5:])  # a value from a larger order
    assert budget.pld_queries(migrated) >= 3000


# -- calibration -----------------------------------------------------------------------------------


def test_pld_calibration_meets_the_target_and_beats_rdp() -> None:
    eps, delta, t = 2.0, 1e-6, 50
    sigma = calibrate_sigma(epsilon=eps, delta=delta, queries=t, k=10, q=0.1, accountant="pld")
    sigma_rdp = calibrate_sigma(epsilon=eps, delta=delta, queries=t, k=10, q=0.1)
    assert sigma < sigma_rdp
    assert oracle(Profile(k=10, q=0.1, sigma=sigma, lam=1.0), t, delta) <= eps
    k = calibrate_k(epsilon=eps, delta=delta, queries=t, sigma=0.2, q=0.1, accountant="pld")
    assert k <= calibrate_k(epsilon=eps, delta=delta, queries=t, sigma=0.2, q=0.1)
    assert oracle(Profile(k=k, q=0.1, sigma=0.2, lam=1.0), t, delta) <= eps
    q = calibrate_q(epsilon=eps, delta=delta, queries=t, sigma=0.2, k=10, accountant="pld", tol=1e-4)
    assert q >= calibrate_q(epsilon=eps, delta=delta, queries=t, sigma=0.2, k=10, tol=1e-4)
    assert oracle(Profile(k=10, q=q, sigma=0.2, lam=1.0), t, delta) <= eps
    # discrete noise: between the float PLD value and the discrete RDP one, and it meets the target
    hard = calibrate_sigma(epsilon=eps, delta=delta, queries=t, k=10, q=0.1, accountant="pld", hardened_dimension=16)
    hard_rdp = calibrate_sigma(epsilon=eps, delta=delta, queries=t, k=10, q=0.1, hardened_dimension=16)
    assert sigma < hard < hard_rdp
    assert epsilon_pld(profile=Profile(k=10, q=0.1, sigma=hard, lam=1.0), queries=t, delta=delta,
                       hardened_dimension=16) <= eps


# -- empirical audit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile",
    [Profile(k=1, q=1.0, sigma=3.0, lam=1.0), Profile(k=4, q=0.3, sigma=0.6, lam=1.0)],
    ids=["q=1", "subsampled"],
)
def test_empirical_audit_never_above_the_pld_claim(profile: Profile) -> None:
    """The audit's lower bound (real search and release code) stays below the PLD upper bound of
    one release, which is tighter than the RDP claim."""
    from dprdm.index.search import search_array
    from dprdm.privacy.empirical_audit import audit_retrieval

    res = audit_retrieval(search_array, profile, trials=6000, delta=1e-5, rng=np.random.default_rng(7))
    claim = epsilon_pld(profile=profile, queries=1, delta=1e-5)
    assert claim <= res.claimed_epsilon  # PLD <= RDP
    assert 0.0 < res.audited_lower_bound <= claim, (res.audited_lower_bound, claim)


def test_t_max_search_certifies_on_the_fine_grid_whatever_the_coarse_bracket_says(monkeypatch) -> None:
    """The search only trusts the fine grid: a coarse grid that is too optimistic (gallop down), too
    pessimistic (gallop up), or the cap, with synthetic epsilon curves (eps(T) = rate * T)."""
    search = pld_mod._max_queries.__wrapped__  # uncached

    def fake(fine_rate: float, coarse_rate: float):
        return lambda q, z, t, delta, grid, tail=0.0: (fine_rate if grid == DISCRETISATION else coarse_rate) * t

    for fine_rate, coarse_rate, expected in ((0.1, 0.05, 10), (0.1, 0.3, 10), (0.1, 0.1, 10), (0.0013, 0.002, 769)):
        monkeypatch.setattr(pld_mod, "_epsilon", fake(fine_rate, coarse_rate))
        assert search(0.5, 1.0, 1.0, 1e-5) == expected, (fine_rate, coarse_rate)
    monkeypatch.setattr(pld_mod, "_epsilon", fake(1e-9, 1e-9))
    assert search(0.5, 1.0, 1.0, 1e-5) == pld_mod.MAX_PLD_QUERIES
    monkeypatch.setattr(pld_mod, "_epsilon", fake(2.0, 0.5))
    assert search(0.5, 1.0, 1.0, 1e-5) == 0


def test_a_multiplier_too_small_for_memory_is_infinite_not_a_crash() -> None:
    """dp-accounting's loss grid for a tiny multiplier would need ~150 GiB (MemoryError): the answer
    is the conservative one (epsilon +inf, delta 1), so admission and calibration refuse it."""
    tiny = Profile(k=10, q=0.5, sigma=1e-4, lam=1.0)
    assert epsilon_pld(profile=tiny, queries=100, delta=1e-6) == math.inf
    assert delta_pld(profile=tiny, queries=100, epsilon=1.0) == 1.0
    assert epsilon_pld(profile=Profile(k=10, q=0.5, sigma=4e-6, lam=1.0), queries=100, delta=1e-6,
                       hardened_dimension=16) == math.inf
