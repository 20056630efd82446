"""A ledger written with the previous order grid (issue 12 item 9) opens with the current code:
its curves are migrated conservatively, once, in one transaction, and budgets keep their word."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from dprdm.ledger import BudgetExhausted, MemoryLedger, SchemaMismatch, SqliteLedger
from dprdm.ledger.state import ORDERS, check_curve, curve_id_of, curve_text
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, epsilon_from_rdp, filter_capacity, profile_rdp
from dprdm.privacy.accountant import curve_from_json
from dprdm.privacy.orders import ORDERS_V1

SMALL = Profile(k=62, q=0.00139, sigma=0.0858, lam=1.0)  # SPEC §4: over-charged on the old grid
DELTA = 1.08e-6
SINGLE = Budget.single(0.137, DELTA, SMALL)  # the old grid admits 72 queries (0.136 each alone)
FILTER_PROFILES = [Profile(k=4, q=0.05, sigma=1.0, lam=1.0), Profile(k=4, q=0.1, sigma=1.0, lam=0.8)]
FILTER_ORDER = 8.0  # on both grids; ~54 alternating queries
FILTER = Budget.renyi_filter(2.0, 1e-6, FILTER_PROFILES, order=FILTER_ORDER)
V1 = [DEFAULT_ORDERS.index(a) for a in ORDERS_V1]  # where the old orders sit on the new grid
BEFORE = 12  # spends of the single-profile domain written with the old grid


def charge(profile: Profile) -> np.ndarray:
    return profile_rdp(profile, DEFAULT_ORDERS)


def reserve(led: SqliteLedger, domain: str, rid: str, profile: Profile, tenant: str = "t0"):
    return led.reserve(
        domain=domain, tenant=tenant, request_id=rid, binding_hash=f"h-{rid}",
        profile={"name": "p", **profile.to_dict()}, charge_rdp=charge(profile),
    )  # fmt: skip


def _old_curve(text: str) -> str:
    """A stored curve as the previous version wrote it: its values at the old orders (each order's
    RDP is computed on its own, so the old code computed exactly these), in the same encoding."""
    return curve_text(curve_from_json(json.loads(text))[V1])


def write_old_grid_ledger(path: Path) -> None:
    """Spends written by the current code, then every table rewritten over ``ORDERS_V1``."""
    with SqliteLedger(path) as led:
        led.create_budget("single", SINGLE, tenant_quotas={"q": 0.8})
        led.create_budget("filter", FILTER)
        for i in range(BEFORE):
            res = reserve(led, "single", f"s{i}", SMALL, tenant="q" if i % 3 == 0 else "t0")
            led.store_release(res.spend_id, np.full(4, float(i)))
        for i in range(10):
            reserve(led, "filter", f"f{i}", FILTER_PROFILES[i % 2])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'orders'", (json.dumps(list(ORDERS_V1)),))
        for d, c in conn.execute("SELECT domain, spent_rdp FROM budgets").fetchall():
            conn.execute("UPDATE budgets SET spent_rdp = ? WHERE domain = ?", (_old_curve(c), d))
        for d, t, c in conn.execute("SELECT domain, tenant, spent_rdp FROM tenant_quotas").fetchall():
            conn.execute("UPDATE tenant_quotas SET spent_rdp = ? WHERE domain = ? AND tenant = ?", (_old_curve(c), d, t))
        for cid, text in conn.execute("SELECT curve_id, rdp FROM curves").fetchall():
            old = _old_curve(text)
            conn.execute("UPDATE curves SET curve_id = ?, rdp = ? WHERE curve_id = ?", (curve_id_of(old), old, cid))
            conn.execute("UPDATE spends SET charge_id = ? WHERE charge_id = ?", (curve_id_of(old), cid))
    conn.close()


def _stored(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(sql).fetchall()
    conn.close()
    return rows


def _curve(path: Path, sql: str) -> np.ndarray:
    return curve_from_json(json.loads(_stored(path, sql)[0][0]))


def test_old_grid_ledger_is_migrated_once_and_budgets_keep_their_word(tmp_path, caplog):
    path = tmp_path / "old.db"
    write_old_grid_ledger(path)
    old_spent = _curve(path, "SELECT spent_rdp FROM budgets WHERE domain = 'single'")
    old_quota = _curve(path, "SELECT spent_rdp FROM tenant_quotas WHERE tenant = 'q'")
    old_filter = _curve(path, "SELECT spent_rdp FROM budgets WHERE domain = 'filter'")
    assert old_spent.size == len(ORDERS_V1) == 101
    old_eps = epsilon_from_rdp(old_spent, ORDERS_V1, DELTA).epsilon  # what the old server reported

    with caplog.at_level(logging.WARNING, logger="dprdm.ledger"), SqliteLedger(path) as led:
        assert any("migrated its curves from a 101-order grid" in r.getMessage() for r in caplog.records)
        led.verify()  # running curves are still the exact sums of the (migrated) charges
        state = led.budget_state("single")
        # Every old order keeps its value; new orders take the next old order's value.
        np.testing.assert_array_equal(state.spent_rdp[V1], old_spent)
        direct = np.zeros(len(DEFAULT_ORDERS))
        for _ in range(BEFORE):
            direct = direct + charge(SMALL)
        assert np.all(state.spent_rdp >= direct)
        # The spent figure is never lower than the old curve implied, and still bounds the truth.
        assert state.epsilon_spent >= old_eps and state.epsilon_spent == pytest.approx(old_eps, rel=1e-12)
        assert state.epsilon_spent >= epsilon_from_rdp(direct, DEFAULT_ORDERS, DELTA).epsilon
        assert led.tenant_quotas("single")["q"][1] >= epsilon_from_rdp(old_quota, ORDERS_V1, DELTA).epsilon

        # Single profile: admission continues from the migrated curve, with new-grid charges.
        spent, expected = state.spent_rdp, 0
        while SINGLE.admits(spent, charge(SMALL)):
            spent, expected = spent + charge(SMALL), expected + 1
        old_more, s = 0, old_spent  # what the old grid would still have admitted
        while epsilon_from_rdp(s + profile_rdp(SMALL, ORDERS_V1), ORDERS_V1, DELTA).epsilon <= SINGLE.epsilon:
            s, old_more = s + profile_rdp(SMALL, ORDERS_V1), old_more + 1
        admitted = 0
        with pytest.raises(BudgetExhausted):
            for i in range(expected + 1):
                reserve(led, "single", f"n{i}", SMALL)
                admitted += 1
        assert admitted == expected >= old_more

        # Rényi filter: the filter order is on both grids, so it admits exactly as before.
        a = DEFAULT_ORDERS.index(FILTER_ORDER)
        assert led.budget_state("filter").spent_rdp[a] == old_filter[ORDERS_V1.index(FILTER_ORDER)]
        cap, level, more = filter_capacity(FILTER.epsilon, FILTER.delta, FILTER_ORDER), old_filter[ORDERS_V1.index(FILTER_ORDER)], 0
        while level + charge(FILTER_PROFILES[more % 2])[a] <= cap:
            level, more = level + charge(FILTER_PROFILES[more % 2])[a], more + 1
        with pytest.raises(BudgetExhausted):
            for i in range(more + 1):
                reserve(led, "filter", f"g{i}", FILTER_PROFILES[i % 2])
        assert led.budget_state("filter").spends == 10 + more

        replay = reserve(led, "single", "s1", SMALL)  # a replay still returns its stored release
        assert replay.replay and replay.release is not None and replay.release[0] == 1.0
        led.verify()

    history = json.loads(_stored(path, "SELECT value FROM meta WHERE key = 'grid_migrations'")[0][0])
    assert len(history) == 1 and history[0]["from_orders"] == list(ORDERS_V1) and history[0]["domains"] == 2
    assert json.loads(_stored(path, "SELECT value FROM meta WHERE key = 'orders'")[0][0]) == list(DEFAULT_ORDERS)

    # A second open migrates nothing.
    tables = _stored(path, "SELECT rdp FROM curves ORDER BY curve_id") + _stored(path, "SELECT spent_rdp FROM budgets")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dprdm.ledger"), SqliteLedger(path) as led:
        led.verify()
    assert not caplog.records
    assert _stored(path, "SELECT rdp FROM curves ORDER BY curve_id") + _stored(path, "SELECT spent_rdp FROM budgets") == tables
    assert len(json.loads(_stored(path, "SELECT value FROM meta WHERE key = 'grid_migrations'")[0][0])) == 1


def _corrupt_and_refuse(path: Path, sql: str, match: str) -> None:
    write_old_grid_ledger(path)
    with sqlite3.connect(path) as conn:
        conn.execute(sql)
    conn.close()
    before = _stored(path, "SELECT spent_rdp FROM budgets ORDER BY domain") + _stored(path, "SELECT * FROM meta")
    with pytest.raises(SchemaMismatch, match=match):
        SqliteLedger(path)
    after = _stored(path, "SELECT spent_rdp FROM budgets ORDER BY domain") + _stored(path, "SELECT * FROM meta")
    assert after == before  # all or nothing


def test_a_filter_order_off_the_new_grid_is_refused_and_nothing_changes(tmp_path):
    budget = json.dumps({**FILTER.to_dict(), "filter_order": 1.07})
    _corrupt_and_refuse(tmp_path / "f.db", f"UPDATE budgets SET budget = '{budget}' WHERE domain = 'filter'", "order 1.07")


def test_a_curve_that_does_not_fit_its_grid_is_refused_and_nothing_changes(tmp_path):
    _corrupt_and_refuse(tmp_path / "c.db", "UPDATE tenant_quotas SET spent_rdp = '[0.0, 1.0]'", "does not match")


def test_memory_ledger_is_on_the_new_grid() -> None:
    assert ORDERS.tolist() == list(DEFAULT_ORDERS)
    with pytest.raises(ValueError, match="shape"):
        check_curve(np.zeros(len(ORDERS_V1)))
    led = MemoryLedger()
    led.create_budget("d", SINGLE)
    res = led.reserve(domain="d", tenant="t", request_id="r", binding_hash="h", profile=SMALL.to_dict(), charge_rdp=charge(SMALL))
    assert res.receipt.epsilon_charged <= 0.0905
