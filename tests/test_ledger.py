"""The SQLite ledger: schema, admission, replay, release reuse, quotas, restart, consistency.

Concurrency (threads, processes) and crash safety are in ``test_ledger_concurrency.py``.
"""

from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pytest
from hypothesis import strategies as st

from dprdm.ledger.api import (
    BudgetExhausted,
    DomainExists,
    LedgerCorrupt,
    LedgerError,
    QuotaExhausted,
    ReleaseMissing,
    ReplayMismatch,
    SchemaMismatch,
    UnknownDomain,
    UnknownSpend,
)
from dprdm.ledger.sqlite import SCHEMA_VERSION, SqliteLedger
from dprdm.ledger.state import Op
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile
from dprdm.ledger import sqlite as ledger_module

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
BUDGET = Budget.single(1.0, 1e-7, PROFILE)
CHARGE = np.full(len(DEFAULT_ORDERS), 0.045)  # ~21 admissions under BUDGET


def expected_admissions(budget: Budget, charge: np.ndarray) -> int:
    """The oracle: how many identical charges ``Budget.admits`` accepts one after another."""
    spent, n = np.zeros(len(DEFAULT_ORDERS)), 0
    while budget.admits(spent, charge):
        spent, n = spent + charge, n + 1
    return n


M = expected_admissions(BUDGET, CHARGE)


def reserve(led: SqliteLedger, rid: str, *, tenant: str = "t0", binding: str = "h", domain: str = "c", charge=CHARGE):
    return led.reserve(
        domain=domain, tenant=tenant, request_id=rid, binding_hash=binding, profile=PROFILE.to_dict(), charge_rdp=charge
    )


@pytest.fixture(params=[True, False], ids=["group", "single"])
def ledger(request, tmp_path):
    led = SqliteLedger(tmp_path / "ledger.db", group_commit=request.param)
    led.create_budget("c", BUDGET, tenant_quotas={"q": 0.5})
    yield led
    led.close()


def test_oracle_is_small_and_positive():
    assert 5 <= M <= 40


def test_fresh_file_gets_schema_wal_and_full_sync(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        assert led._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert led.domains() == []
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


def test_unknown_schema_version_is_refused(tmp_path):
    path = tmp_path / "l.db"
    SqliteLedger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match="999"):
        SqliteLedger(path)


def test_other_order_grid_and_foreign_file_are_refused(tmp_path):
    path = tmp_path / "l.db"
    SqliteLedger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '[2.0, 3.0]' WHERE key = 'orders'")
    with pytest.raises(SchemaMismatch, match="order grid"):
        SqliteLedger(path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE stuff (x)")
    with pytest.raises(SchemaMismatch, match="not a dprdm ledger"):
        SqliteLedger(other)


def test_budget_creation_and_unknown_domain(ledger):
    assert ledger.domains() == ["c"]
    with pytest.raises(DomainExists, match="'c'"):
        ledger.create_budget("c", BUDGET)
    state = ledger.budget_state("c")
    assert state.spends == 0 and state.budget == BUDGET and state.epsilon_spent == 0.0
    for call in (
        lambda: ledger.budget_state("nope"),
        lambda: ledger.audit_trail("nope"),
        lambda: ledger.tenant_quotas("nope"),
        lambda: reserve(ledger, "r", domain="nope"),
        lambda: ledger.verify("nope"),
    ):
        with pytest.raises(UnknownDomain, match="'nope'"):
            call()


def test_admits_exactly_m_and_refusal_writes_nothing(ledger):
    states = [reserve(ledger, f"r{i}").state for i in range(M)]
    assert [s.spends for s in states] == list(range(1, M + 1))
    assert all(a.epsilon_spent <= b.epsilon_spent for a, b in zip(states, states[1:], strict=False))
    with pytest.raises(BudgetExhausted) as info:
        reserve(ledger, "over")
    err = info.value
    assert err.domain == "c" and err.epsilon_budget == 1.0
    assert err.epsilon_spent == pytest.approx(states[-1].epsilon_spent)
    assert ledger.budget_state("c").spends == M
    assert len(ledger.audit_trail("c")) == M
    assert np.array_equal(ledger.budget_state("c").spent_rdp, states[-1].spent_rdp)
    # refused request ids are not consumed: a zero charge (lambda = 0) under the same id is admitted
    res = reserve(ledger, "over", charge=np.zeros(len(DEFAULT_ORDERS)))
    assert not res.replay and res.receipt["epsilon_charged"] == 0.0
    ledger.verify("c")


def test_receipt_and_state_of_a_new_reservation(ledger):
    res = reserve(ledger, "r0")
    assert not res.replay and res.release is None
    assert res.receipt["spend_id"] == res.spend_id and res.receipt["domain"] == "c"
    assert res.receipt["profile"] == PROFILE.to_dict()
    assert res.receipt["epsilon_charged"] == pytest.approx(BUDGET.spent_epsilon(CHARGE))
    assert res.receipt["epsilon_spent"] == res.state.epsilon_spent == pytest.approx(BUDGET.spent_epsilon(CHARGE))
    assert res.receipt["epsilon_left"] == pytest.approx(1.0 - res.state.epsilon_spent)
    with pytest.raises(ValueError):
        res.state.spent_rdp[0] = 5.0  # snapshots are read-only


def test_replay_returns_stored_release_without_charge(ledger):
    res = reserve(ledger, "r0")
    with pytest.raises(ReleaseMissing, match="'r0'"):
        reserve(ledger, "r0")
    release = np.linspace(-1.0, 1.0, 8)
    ledger.store_release(res.spend_id, release, {"spend_id": res.spend_id, "x": 1})
    for i in range(M - 1):
        reserve(ledger, f"fill{i}")
    again = reserve(ledger, "r0")  # a replay succeeds even with the budget exhausted
    assert again.replay and again.spend_id == res.spend_id
    assert np.array_equal(again.release, release) and again.receipt == {"spend_id": res.spend_id, "x": 1}
    assert again.state.spends == M
    with pytest.raises(ReplayMismatch, match="'r0'"):
        reserve(ledger, "r0", binding="other")
    ledger.create_budget("c2", BUDGET)
    with pytest.raises(ReplayMismatch):  # same id and binding on another domain
        reserve(ledger, "r0", domain="c2")
    assert reserve(ledger, "r0", tenant="t1", charge=np.zeros(len(DEFAULT_ORDERS))).replay is False  # per tenant
    ledger.verify()


def test_store_release_is_idempotent_and_checked(ledger):
    res = reserve(ledger, "r0")
    secret = np.array([0.123456789, 2.5])
    ledger.store_release(res.spend_id, secret, {"a": 1})
    ledger.store_release(res.spend_id, secret.copy(), {"a": 2})  # same release: no-op, first receipt kept
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h")[2] == {"a": 1}
    with pytest.raises(LedgerError) as info:
        ledger.store_release(res.spend_id, secret + 1.0, {"a": 1})
    assert "0.123" not in str(info.value) and "1.123" not in str(info.value)  # nothing private-derived
    with pytest.raises(UnknownSpend, match="'nope'"):
        ledger.store_release("nope", secret, {})
    assert [s.status for s in ledger.audit_trail("c")] == ["released"]


def test_find_release_is_per_tenant_domain_and_newest(ledger):
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h") is None
    first, second = reserve(ledger, "a"), reserve(ledger, "b")
    ledger.store_release(first.spend_id, np.ones(4), {"n": 1})
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h")[0] == first.spend_id
    ledger.store_release(second.spend_id, np.full((2, 2), 2.0), {"n": 2})
    spend_id, release, receipt = ledger.find_release(domain="c", tenant="t0", binding_hash="h")
    assert spend_id == second.spend_id and release.shape == (2, 2) and receipt == {"n": 2}
    assert ledger.find_release(domain="c", tenant="t1", binding_hash="h") is None
    assert ledger.find_release(domain="c", tenant="t0", binding_hash="h2") is None
    assert ledger.find_release(domain="other", tenant="t0", binding_hash="h") is None


def test_tenant_quota_limits_only_that_tenant(ledger):
    admitted = 0
    with pytest.raises(QuotaExhausted) as info:
        for i in range(M + 1):
            reserve(ledger, f"q{i}", tenant="q")
            admitted += 1
    assert info.value.tenant == "q" and info.value.epsilon_quota == 0.5
    assert admitted == expected_admissions(Budget.single(0.5, 1e-7, PROFILE), CHARGE)
    quota, spent = ledger.tenant_quotas("c")["q"]
    assert quota == 0.5 and spent == pytest.approx(BUDGET.spent_epsilon(CHARGE * admitted)) and spent <= 0.5
    for i in range(M - admitted):  # the others use the rest of the domain budget
        reserve(ledger, f"o{i}", tenant="other")
    with pytest.raises(BudgetExhausted):
        reserve(ledger, "o-last", tenant="other")
    ledger.verify("c")


def test_restart_rebuilds_state_from_the_store(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.create_budget("c", BUDGET, tenant_quotas={"q": 0.5})
        for i in range(3):
            reserve(led, f"r{i}", tenant="q")
        before = led.budget_state("c")
    with SqliteLedger(path, group_commit=False) as led:
        after = led.budget_state("c")
        assert after.spends == 3 and np.array_equal(after.spent_rdp, before.spent_rdp)
        for i in range(3, M):
            reserve(led, f"r{i}")
        with pytest.raises(BudgetExhausted):
            reserve(led, "over")
        assert led.tenant_quotas("c")["q"][1] == pytest.approx(BUDGET.spent_epsilon(CHARGE * 3))
        led.verify()


def test_running_curve_is_the_sum_and_verify_detects_tampering(tmp_path):
    path = tmp_path / "l.db"
    charges = [CHARGE * f for f in (0.1, 1.0, 0.37, 2.0)]
    with SqliteLedger(path) as led:
        led.create_budget("c", BUDGET, tenant_quotas={"q": 0.9})
        for i, charge in enumerate(charges):
            reserve(led, f"r{i}", tenant="q", charge=charge)
        total = np.zeros(len(DEFAULT_ORDERS))
        for charge in charges:
            total = total + charge
        assert np.array_equal(led.budget_state("c").spent_rdp, total)
        led.verify()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM curves").fetchone()[0] == len(charges)  # stored once each
        conn.execute("UPDATE tenant_quotas SET spent_rdp = ?", (json.dumps([0.0] * len(DEFAULT_ORDERS)),))
    with SqliteLedger(path) as led, pytest.raises(LedgerCorrupt, match="tenant 'q'"):
        led.verify("c")
    with sqlite3.connect(path) as conn:
        curve_id, text = conn.execute("SELECT curve_id, rdp FROM curves LIMIT 1").fetchone()
        conn.execute("UPDATE curves SET rdp = ? WHERE curve_id = ?", (text.replace("[", "[1.0, ", 1), curve_id))
    with SqliteLedger(path) as led, pytest.raises(LedgerCorrupt, match="charge curve"):
        led.verify("c")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE curves SET rdp = ? WHERE curve_id = ?", (text, curve_id))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE budgets SET spent_rdp = ?", (json.dumps([0.0] * len(DEFAULT_ORDERS)),))
    with SqliteLedger(path) as led, pytest.raises(LedgerCorrupt, match="running curve"):
        led.verify()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE budgets SET spends = 1")
    with pytest.raises(LedgerCorrupt, match="records 1 spends but has 4"):
        SqliteLedger(path)


def _ops(led: SqliteLedger, rids: list[str], tenant: str = "t0") -> list[Op]:
    return [
        Op("reserve", ("c", tenant, rid, "h", json.dumps(PROFILE.to_dict()), CHARGE, CHARGE.tobytes()))
        for rid in rids
    ]


def test_one_batch_is_one_transaction_with_sequential_admission(tmp_path):
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led.create_budget("c", BUDGET)
        before = led.stats()["transactions"]
        ops = _ops(led, [f"r{i}" for i in range(M + 3)] + ["r0"])
        led._execute(ops)
        assert led.stats()["transactions"] == before + 1
        assert all(op.error is None and not op.result.replay for op in ops[:M])
        assert [op.result.state.spends for op in ops[:M]] == list(range(1, M + 1))
        assert all(isinstance(op.error, BudgetExhausted) for op in ops[M:-1])
        assert isinstance(ops[-1].error, ReleaseMissing)  # sees the reservation made earlier in the batch
        assert led.budget_state("c").spends == M
        led.verify()


def test_unexpected_error_in_a_batch_fails_only_its_operation(tmp_path, monkeypatch):
    def boom(self, tx):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(ledger_module._HANDLERS, "boom", boom)
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led.create_budget("c", BUDGET)
        ops = _ops(led, ["a"]) + [Op("boom", ())] + _ops(led, ["b"])
        led._execute(ops)
        assert ops[0].result.state.spends == 1 and ops[2].result.state.spends == 2
        assert isinstance(ops[1].error, RuntimeError)
        assert led.budget_state("c").spends == 2
        led.verify()


def test_group_commit_batches_concurrent_callers(tmp_path):
    with SqliteLedger(tmp_path / "l.db", group_commit=True, batch_window_s=0.05) as led:
        led.create_budget("c", BUDGET)
        before = led.stats()
        barrier = threading.Barrier(8)

        def worker(i):
            barrier.wait()
            reserve(led, f"r{i}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = led.stats()
        assert after["operations"] - before["operations"] == 8
        assert after["transactions"] - before["transactions"] < 8
        led.verify()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"charge": np.full(3, 0.1)}, "shape"),
        ({"charge": np.full(len(DEFAULT_ORDERS), np.nan)}, "NaN"),
        ({"charge": -CHARGE}, ">= 0"),
        ({"tenant": ""}, "tenant"),
        ({"binding": 5}, "binding_hash"),
        ({"domain": "x" * 2000}, "domain"),
    ],
)
def test_bad_arguments_are_named(ledger, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reserve(ledger, "r0", **kwargs)
    assert ledger.budget_state("c").spends == 0


def test_infinite_charge_is_refused_not_nan(ledger):
    with pytest.raises(BudgetExhausted):
        reserve(ledger, "r0", charge=np.full(len(DEFAULT_ORDERS), np.inf))


def test_closed_ledger_refuses(tmp_path):
    led = SqliteLedger(tmp_path / "l.db")
    led.create_budget("c", BUDGET)
    led.close()
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        reserve(led, "r0")


def test_bad_quota_is_named(tmp_path):
    with SqliteLedger(tmp_path / "l.db") as led:
        with pytest.raises(ValueError, match="tenant 'a'"):
            led.create_budget("c", BUDGET, tenant_quotas={"a": -1.0})
        assert led.domains() == []


FILTER = Budget.renyi_filter(2.0, 1e-6, [PROFILE, Profile(k=10, q=0.05, sigma=0.3, lam=0.7)])
curves = st.lists(
    st.one_of(st.floats(0.0, 50.0), st.floats(0.0, 1e-11), st.just(float("inf"))),
    min_size=len(DEFAULT_ORDERS),
    max_size=len(DEFAULT_ORDERS),
).map(np.array)


def test_busy_store_fails_the_batch_quickly_and_recovers(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path, group_commit=False, busy_timeout_s=0.05) as led:
        led.create_budget("c", BUDGET)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        ops = _ops(led, ["a", "b"])
        led._execute(ops)
        assert all(type(op.error) is LedgerError and "unavailable" in str(op.error) for op in ops)
        other.execute("ROLLBACK")
        other.close()
        assert reserve(led, "a").state.spends == 1
        led.verify()
