"""One behavioural suite for every ledger store (SPEC §6), as dp_accounting runs one base test
class against every accountant.

The ``make_ledger`` fixture is parametrized over every store: SQLite with group commit, SQLite
with one transaction per call, the in-memory store, and PostgreSQL (a real server, ``pg_server``
in ``conftest.py``; a fresh schema per ledger) with and without group commit. A test here states the ledger contract
(``dprdm.ledger.api.Ledger``) and must pass unchanged for each; store-specific behaviour
(durability, schema, several processes, ``verify``, batching) is tested in ``test_ledger.py`` and
``test_ledger_concurrency.py``. A new store joins by adding a case to ``make_ledger``.

Size (~480 lines): the whole behavioural contract in one suite, so every store is held to all of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from dprdm.ledger import MemoryLedger, SqliteLedger, open_ledger
from dprdm.ledger.api import (
    BudgetExhausted,
    BudgetState,
    DomainExists,
    Ledger,
    LedgerError,
    QuotaExhausted,
    Receipt,
    ReleaseConflict,
    ReleaseMissing,
    ReplayMismatch,
    UnknownDomain,
    UnknownSpend,
)
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
BUDGET = Budget.single(1.0, 1e-7, PROFILE)
CHARGE = np.full(len(DEFAULT_ORDERS), 0.045)  # ~21 admissions under BUDGET
ZERO = np.zeros(len(DEFAULT_ORDERS))
FILTER = Budget.renyi_filter(2.0, 1e-6, [PROFILE, Profile(k=10, q=0.05, sigma=0.3, lam=0.7)])


def expected_admissions(budget: Budget, charge: np.ndarray) -> int:
    """The oracle: how many identical charges ``Budget.admits`` accepts one after another."""
    spent, n = np.zeros(len(DEFAULT_ORDERS)), 0
    while budget.admits(spent, charge):
        spent, n = spent + charge, n + 1
    return n


M = expected_admissions(BUDGET, CHARGE)


@pytest.fixture(params=["sqlite-group", "sqlite-single", "memory", "postgres-group", "postgres-single"])
def make_ledger(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[[], Ledger]]:
    """A factory of empty ledgers of one store kind (each closed after the test)."""
    made: list[Ledger] = []
    pg = request.getfixturevalue("pg_server") if request.param.startswith("postgres") else None
    group = request.param.endswith("-group")

    def make() -> Ledger:
        led: Ledger
        if request.param == "memory":
            led = MemoryLedger()
        elif pg is not None:
            led = open_ledger(pg.new_url(), group_commit=group)
        else:
            led = SqliteLedger(tmp_path / f"ledger-{len(made)}.db", group_commit=group)
        made.append(led)
        return led

    yield make
    for led in made:
        led.close()


@pytest.fixture()
def ledger(make_ledger: Callable[[], Ledger]) -> Ledger:
    """A ledger with domain "c" (BUDGET) where tenant "q" has an epsilon quota of 0.5."""
    led = make_ledger()
    led.create_budget("c", BUDGET, tenant_quotas={"q": 0.5})
    return led


def reserve(led: Ledger, rid: str, *, tenant: str = "t0", binding: str = "h", domain: str = "c", charge: Any = CHARGE,
            profile: Any = None, index: str = "faces"):  # fmt: skip
    return led.reserve(
        domain=domain, tenant=tenant, request_id=rid, binding_hash=binding,
        profile={"name": "default", **PROFILE.to_dict()} if profile is None else profile, charge_rdp=charge,
        index=index,
    )  # fmt: skip


def check_consistent(led: Ledger) -> None:
    """The store's own consistency check, where it has one (SQLite's ``verify``)."""
    verify = getattr(led, "verify", None)
    if verify is not None:
        verify()


# ------------------------------------------------------------------------------------- domains


def test_oracle_is_small_and_positive():
    assert 5 <= M <= 40


def test_create_budget_and_duplicate_domain(ledger):
    assert ledger.domains() == ["c"]
    with pytest.raises(DomainExists, match="'c'"):
        ledger.create_budget("c", FILTER)
    assert ledger.budget_state("c").budget == BUDGET  # never replaced
    ledger.create_budget("a", FILTER)
    assert ledger.domains() == ["a", "c"]
    state = ledger.budget_state("c")
    assert state.domain == "c" and state.spends == 0 and state.epsilon_spent == 0.0 and state.epsilon_left == 1.0
    assert np.array_equal(state.spent_rdp, ZERO)
    assert ledger.tenant_quotas("c") == {"q": (0.5, 0.0)} and ledger.tenant_quotas("a") == {}


def test_unknown_domain_raises_the_same_way_everywhere(ledger):
    calls = {
        "budget_state": lambda: ledger.budget_state("nope"),
        "reserve": lambda: reserve(ledger, "r", domain="nope"),
        "audit_trail": lambda: ledger.audit_trail("nope"),
        "tenant_quotas": lambda: ledger.tenant_quotas("nope"),
        "find_release": lambda: ledger.find_release(domain="nope", tenant="t0", binding_hash="h"),
    }
    for name, call in calls.items():
        with pytest.raises(UnknownDomain, match="^no budget for privacy domain 'nope'$"):
            call()
        assert ledger.domains() == ["c"], name
    assert ledger.request_binding(tenant="t0", request_id="r") is None  # nothing was reserved


def test_bad_quota_is_named(make_ledger):
    led = make_ledger()
    with pytest.raises(ValueError, match="tenant 'a'"):
        led.create_budget("c", BUDGET, tenant_quotas={"a": -1.0})
    with pytest.raises(ValueError, match="budget"):
        led.create_budget("c", BUDGET.to_dict())
    assert led.domains() == []


# ----------------------------------------------------------------------------------- admission


def test_admits_exactly_m_and_refusal_writes_nothing(ledger):
    states = [reserve(ledger, f"r{i}").state for i in range(M)]
    assert [s.spends for s in states] == list(range(1, M + 1))
    assert all(a.epsilon_spent <= b.epsilon_spent for a, b in zip(states, states[1:]))
    with pytest.raises(BudgetExhausted) as info:
        reserve(ledger, "over")
    err = info.value
    assert err.domain == "c" and err.epsilon_budget == 1.0
    assert err.epsilon_spent == pytest.approx(states[-1].epsilon_spent)
    assert ledger.budget_state("c").spends == M
    assert len(ledger.audit_trail("c")) == M
    assert np.array_equal(ledger.budget_state("c").spent_rdp, states[-1].spent_rdp)
    assert ledger.request_binding(tenant="t0", request_id="over") is None
    # refused request ids are not consumed: a zero charge (lambda = 0) under the same id is admitted
    res = reserve(ledger, "over", charge=ZERO)
    assert not res.replay and res.receipt.epsilon_charged == 0.0
    check_consistent(ledger)


def test_mixed_charges_follow_the_oracle_under_a_filter(make_ledger):
    led = make_ledger()
    led.create_budget("f", FILTER)
    rng = np.random.default_rng(7)  # test data only
    spent, admitted = np.zeros(len(DEFAULT_ORDERS)), 0
    for i in range(60):
        charge = CHARGE * rng.uniform(0.0, 2.0)
        if i % 7 == 3:  # +inf at every other order: only the filter order counts
            charge = np.where(np.arange(len(DEFAULT_ORDERS)) % 2 == 0, np.inf, charge)
        if FILTER.admits(spent, charge):
            res = reserve(led, f"r{i}", domain="f", charge=charge)
            spent, admitted = spent + charge, admitted + 1
            assert np.array_equal(res.state.spent_rdp, spent)
        else:
            with pytest.raises(BudgetExhausted):
                reserve(led, f"r{i}", domain="f", charge=charge)
    assert 10 <= admitted <= 50  # both branches run
    assert np.array_equal(led.budget_state("f").spent_rdp, spent) and led.budget_state("f").spends == admitted
    check_consistent(led)


def test_tenant_quota_limits_only_that_tenant(ledger):
    admitted = 0
    with pytest.raises(QuotaExhausted) as info:
        for i in range(M + 1):
            reserve(ledger, f"q{i}", tenant="q")
            admitted += 1
    err = info.value
    assert err.domain == "c" and err.tenant == "q" and err.epsilon_quota == 0.5
    assert err.epsilon_spent == pytest.approx(BUDGET.spent_epsilon(CHARGE * admitted))
    assert admitted == expected_admissions(Budget.single(0.5, 1e-7, PROFILE), CHARGE)
    quota, spent = ledger.tenant_quotas("c")["q"]
    assert quota == 0.5 and spent == pytest.approx(BUDGET.spent_epsilon(CHARGE * admitted)) and spent <= 0.5
    assert ledger.budget_state("c").spends == admitted  # the refused one wrote nothing
    for i in range(M - admitted):  # the others use the rest of the domain budget
        reserve(ledger, f"o{i}", tenant="other")
    with pytest.raises(BudgetExhausted):
        reserve(ledger, "o-last", tenant="other")
    assert set(ledger.tenant_quotas("c")) == {"q"}
    check_consistent(ledger)


def test_infinite_charge_is_refused_not_nan(ledger):
    with pytest.raises(BudgetExhausted):
        reserve(ledger, "r0", charge=np.full(len(DEFAULT_ORDERS), np.inf))
    assert ledger.budget_state("c").spends == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"charge": np.full(3, 0.1)}, "shape"),
        ({"charge": np.full(len(DEFAULT_ORDERS), np.nan)}, "NaN"),
        ({"charge": -CHARGE}, ">= 0"),
        ({"charge": "lots"}, "charge_rdp"),
        ({"tenant": ""}, "tenant"),
        ({"binding": 5}, "binding_hash"),
        ({"domain": "x" * 2000}, "domain"),
        ({"profile": {"sigma": float("nan")}}, "profile"),
        ({"profile": ["not", "an", "object"]}, "profile"),
        ({"index": None}, "index"),
    ],
)
def test_bad_arguments_are_named(ledger, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reserve(ledger, "r0", **kwargs)
    assert ledger.budget_state("c").spends == 0


# ------------------------------------------------------------------------------------ receipts


def test_receipt_of_a_new_reservation(ledger):
    res = reserve(ledger, "r0")
    assert not res.replay and res.release is None
    assert res.receipt == Receipt(
        spend_id=res.spend_id,
        request_id="r0",
        index="faces",
        domain="c",
        profile="default",
        epsilon_charged=pytest.approx(BUDGET.spent_epsilon(CHARGE)),
        delta=1e-7,
        epsilon_spent=res.state.epsilon_spent,
        epsilon_left=pytest.approx(1.0 - res.state.epsilon_spent),
        epsilon_budget=1.0,
    )
    assert res.state.epsilon_spent == pytest.approx(BUDGET.spent_epsilon(CHARGE))
    assert Receipt.from_dict(res.receipt.to_dict()) == res.receipt
    with pytest.raises(ValueError):
        res.state.spent_rdp[0] = 5.0  # snapshots are read-only


def test_receipts_carry_the_figures_right_after_each_spend(ledger):
    receipts = [reserve(ledger, f"r{i}", charge=CHARGE * f).receipt for i, f in enumerate((0.5, 1.0, 2.0))]
    total = np.zeros(len(DEFAULT_ORDERS))
    for receipt, f in zip(receipts, (0.5, 1.0, 2.0)):
        total = total + CHARGE * f
        assert receipt.epsilon_charged == pytest.approx(BUDGET.spent_epsilon(CHARGE * f))
        assert receipt.epsilon_spent == pytest.approx(BUDGET.spent_epsilon(total))
        assert receipt.epsilon_left == pytest.approx(max(0.0, 1.0 - receipt.epsilon_spent))
    assert receipts[-1].epsilon_spent == pytest.approx(ledger.budget_state("c").epsilon_spent)
    assert len({r.spend_id for r in receipts}) == 3
    nameless = reserve(ledger, "r9", profile=PROFILE.to_dict(), index="")  # e.g. a baseline's charge
    assert (nameless.receipt.profile, nameless.receipt.index) == ("", "")


def test_receipt_under_a_filter_budget(make_ledger):
    led = make_ledger()
    led.create_budget("f", FILTER)
    res = reserve(led, "r0", domain="f")
    r = res.receipt
    assert (r.delta, r.epsilon_budget) == (1e-6, 2.0)
    assert r.epsilon_charged == pytest.approx(FILTER.spent_epsilon(CHARGE))
    assert r.epsilon_spent == pytest.approx(FILTER.spent_epsilon(CHARGE)) == pytest.approx(res.state.epsilon_spent)


def test_reuse_and_replay_marks_of_a_stored_receipt():
    stored = Receipt("s1", "r1", "faces", "c", "default", 0.3, 1e-7, 0.3, 0.7, 1.0)
    assert stored.as_replay() == Receipt("s1", "r1", "faces", "c", "default", 0.3, 1e-7, 0.3, 0.7, 1.0, replayed=True)
    reused = stored.as_reuse("r2")
    assert reused.reused and not reused.replayed and reused.request_id == "r2" and reused.epsilon_charged == 0.0
    assert (reused.spend_id, reused.epsilon_spent, reused.epsilon_left) == ("s1", 0.3, 0.7)
    now = BudgetState("c", Budget.single(1.0, 1e-7, Profile(k=4, q=0.1, sigma=1.0, lam=1.0)), np.zeros(1), 3, 0.5)
    current = stored.as_reuse("r2", now)
    assert (current.epsilon_charged, current.epsilon_spent, current.epsilon_left) == (0.0, 0.5, 0.5)
    assert Receipt.free(request_id="r3", index="faces", domain="c", profile="public").to_dict() == {
        "spend_id": "", "request_id": "r3", "index": "faces", "domain": "c", "profile": "public",
        "epsilon_charged": 0.0, "delta": 0.0, "epsilon_spent": 0.0, "epsilon_left": 0.0, "epsilon_budget": 0.0,
        "replayed": False, "reused": False,
    }  # fmt: skip
    with pytest.raises(ValueError, match="not a receipt"):
        Receipt.from_dict({"artifact": "x"})


# ------------------------------------------------------------------------------ replay, release


def test_replay_returns_the_stored_release_and_receipt_without_a_charge(ledger):
    res = reserve(ledger, "r0")
    with pytest.raises(ReleaseMissing, match="'r0'"):
        reserve(ledger, "r0")
    release = np.linspace(-1.0, 1.0, 8)
    ledger.store_release(res.spend_id, release)
    for i in range(M - 1):
        reserve(ledger, f"fill{i}")
    again = reserve(ledger, "r0")  # a replay succeeds even with the budget exhausted
    assert again.replay and again.spend_id == res.spend_id
    assert np.array_equal(again.release, release) and again.release.dtype == np.float64
    assert again.receipt == res.receipt.as_replay()  # the stored receipt: figures of the original spend
    assert again.state.spends == M and ledger.budget_state("c").spends == M
    with pytest.raises(ReplayMismatch, match="'r0'"):
        reserve(ledger, "r0", binding="other")
    ledger.create_budget("c2", BUDGET)
    with pytest.raises(ReplayMismatch, match="'r0'"):  # same id and binding on another domain
        reserve(ledger, "r0", domain="c2")
    assert reserve(ledger, "r0", tenant="t1", charge=ZERO).replay is False  # per tenant
    check_consistent(ledger)


def test_store_release_is_idempotent_and_a_conflict_raises(ledger):
    res = reserve(ledger, "r0")
    secret = np.array([0.123456789, 2.5])
    ledger.store_release(res.spend_id, secret)
    ledger.store_release(res.spend_id, secret.copy())  # the same release again: a no-op
    for conflicting in (secret + 1.0, secret.reshape(2, 1), np.array([0.123456789, 2.5, 0.0])):
        with pytest.raises(ReleaseConflict, match=f"'{res.spend_id}'") as info:
            ledger.store_release(res.spend_id, conflicting)
        assert "0.123" not in str(info.value) and "1.123" not in str(info.value)  # nothing private-derived
    spend_id, stored, receipt = ledger.find_release(domain="c", tenant="t0", binding_hash="h")
    assert spend_id == res.spend_id and np.array_equal(stored, secret) and receipt == res.receipt
    assert [s.status for s in ledger.audit_trail("c")] == ["released"]


def test_unknown_spend_id_raises_unknown_spend(ledger):
    with pytest.raises(UnknownSpend, match="'nope'") as info:
        ledger.store_release("nope", np.ones(2))
    assert not isinstance(info.value, KeyError)
    with pytest.raises(ValueError, match="spend_id"):
        ledger.store_release("", np.ones(2))


def test_find_release_is_per_tenant_domain_and_newest(ledger):
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h") is None
    first, second = reserve(ledger, "a"), reserve(ledger, "b")
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h") is None  # reserved, not released
    ledger.store_release(first.spend_id, np.ones(4))
    found = ledger.find_release(domain="c", tenant="t0", binding_hash="h")
    assert found[0] == first.spend_id and found[2] == first.receipt
    ledger.store_release(second.spend_id, np.full((2, 2), 2.0))
    spend_id, release, receipt = ledger.find_release(domain="c", tenant="t0", binding_hash="h")
    assert spend_id == second.spend_id and release.shape == (2, 2) and receipt == second.receipt
    assert not receipt.replayed and not receipt.reused  # stored unmarked; the caller marks reuse
    assert ledger.find_release(domain="c", tenant="t1", binding_hash="h") is None  # never across tenants
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h2") is None
    ledger.create_budget("c2", BUDGET)
    assert ledger.find_release(domain="c2", tenant="t0", binding_hash="h") is None


def test_request_binding(ledger):
    assert ledger.request_binding(tenant="t0", request_id="r0") is None
    reserve(ledger, "r0", binding="h-r0")
    assert ledger.request_binding(tenant="t0", request_id="r0") == "h-r0"
    assert ledger.request_binding(tenant="t1", request_id="r0") is None
    with pytest.raises(BudgetExhausted):
        reserve(ledger, "big", binding="h-big", charge=CHARGE * 1000)
    assert ledger.request_binding(tenant="t0", request_id="big") is None  # a refusal binds nothing


# --------------------------------------------------------------------------------- audit trail


def test_audit_trail_order_paging_status_and_timestamps(ledger):
    before = time.time()
    profile = {"name": "default", "k": 18, "nested": {"a": [1, 2]}}
    rids = [f"r{i}" for i in range(5)]
    reservations = [reserve(ledger, rid, tenant=f"t{i % 2}", binding=f"h{i}", profile=profile) for i, rid in enumerate(rids)]
    ledger.store_release(reservations[1].spend_id, np.zeros(3))
    after = time.time()
    trail = ledger.audit_trail("c")
    assert [s.request_id for s in trail] == rids and [s.spend_id for s in trail] == [r.spend_id for r in reservations]
    assert [s.status for s in trail] == ["reserved", "released", "reserved", "reserved", "reserved"]
    assert [s.tenant for s in trail] == ["t0", "t1", "t0", "t1", "t0"]
    assert [s.binding_hash for s in trail] == [f"h{i}" for i in range(5)]
    assert all(s.domain == "c" and s.profile == profile for s in trail)
    assert all(s.epsilon_charged == pytest.approx(BUDGET.spent_epsilon(CHARGE)) for s in trail)
    assert all(before - 1.0 <= s.created_at <= after + 1.0 for s in trail)  # a real timestamp, not 0
    assert [s.created_at for s in trail] == sorted(s.created_at for s in trail)
    assert [s.request_id for s in ledger.audit_trail("c", limit=2)] == ["r0", "r1"]
    assert [s.request_id for s in ledger.audit_trail("c", limit=2, offset=3)] == ["r3", "r4"]
    assert ledger.audit_trail("c", offset=5) == []
    ledger.create_budget("c2", BUDGET)
    assert ledger.audit_trail("c2") == []
    for kwargs, match in (({"limit": 0}, "limit"), ({"limit": 100_001}, "limit"), ({"offset": -1}, "offset")):
        with pytest.raises(ValueError, match=match):
            ledger.audit_trail("c", **kwargs)


def test_closed_ledger_refuses(make_ledger):
    led = make_ledger()
    led.create_budget("c", BUDGET)
    led.close()
    led.close()  # idempotent
    calls = (
        lambda: reserve(led, "r0"),
        lambda: led.create_budget("d", BUDGET),
        lambda: led.store_release("0" * 32, np.ones(2)),
        lambda: led.budget_state("c"),
        led.domains,
        lambda: led.audit_trail("c"),
        lambda: led.tenant_quotas("c"),
        lambda: led.find_release(domain="c", tenant="t0", binding_hash="h"),
        lambda: led.request_binding(tenant="t0", request_id="r0"),
    )
    for call in calls:
        with pytest.raises(LedgerError, match="closed"):
            call()


# --------------------------------------------------------------------------------- concurrency


def test_threads_get_exactly_m_admissions(ledger):
    n_threads, per_thread = 16, 4  # N = 64 > M
    barrier = threading.Barrier(n_threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            try:
                reserve(ledger, f"r{i}", tenant=f"t{t}")
                result = "admitted"
            except BudgetExhausted:
                result = "refused"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("admitted") == M
    assert outcomes.count("refused") == n_threads * per_thread - M
    assert ledger.budget_state("c").spends == M == len(ledger.audit_trail("c"))
    check_consistent(ledger)


def test_concurrent_replays_of_one_request_charge_once(ledger):
    n = 12
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            reserve(ledger, "same")
            result = "admitted"
        except ReleaseMissing:
            result = "missing"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["admitted"] + ["missing"] * (n - 1)
    assert ledger.budget_state("c").spends == 1
