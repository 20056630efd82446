"""The SQLite ledger only: schema and version checks, durability across restarts, stored receipts
in the file, consistency (``verify``), batch transactions and group commit.

The behaviour every store shares (admission, quotas, replay, receipts, release reuse, audit
trail, concurrency exactness) is in ``test_ledger_conformance.py``; several processes on one file
and kill -9 safety are in ``test_ledger_concurrency.py``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from dprdm.ledger import writer as writer_module
from dprdm.ledger.api import (
    BudgetExhausted,
    LedgerCorrupt,
    LedgerUnavailable,
    Receipt,
    ReleaseMissing,
    SchemaMismatch,
    UnknownDomain,
)
from dprdm.ledger.ops import Pending, Reserve, StoreRelease
from dprdm.ledger.sqlite import SCHEMA_VERSION, SqliteLedger, WriterLock
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile

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
        domain=domain, tenant=tenant, request_id=rid, binding_hash=binding,
        profile={"name": "default", **PROFILE.to_dict()}, charge_rdp=charge, index="faces",
    )  # fmt: skip


def _reserve_op(rid: str, tenant: str = "t0") -> Reserve:
    return Reserve.build(
        domain="c", tenant=tenant, request_id=rid, binding_hash="h", profile=PROFILE.to_dict(), charge_rdp=CHARGE
    )


def _batch(rids: list[str], tenant: str = "t0") -> list[Pending]:
    return [Pending(_reserve_op(rid, tenant)) for rid in rids]


def test_fresh_file_gets_schema_wal_and_full_sync(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        assert led._writer._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert led._reader().execute("PRAGMA synchronous").fetchone()[0] == 2
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


def test_unreadable_order_grid_and_foreign_file_are_refused(tmp_path):
    # (another, readable grid is migrated at open: tests/test_ledger_migration.py)
    path = tmp_path / "l.db"
    SqliteLedger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '[0.5, 3.0]' WHERE key = 'orders'")
    with pytest.raises(SchemaMismatch, match="order grid"):
        SqliteLedger(path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE stuff (x)")
    with pytest.raises(SchemaMismatch, match="not a dprdm ledger"):
        SqliteLedger(other)


def test_verify_of_an_unknown_domain(tmp_path):
    with SqliteLedger(tmp_path / "l.db") as led:
        led.create_budget("c", BUDGET)
        with pytest.raises(UnknownDomain, match="'nope'"):
            led.verify("nope")
        led.verify()


def test_receipt_is_stored_at_reservation_and_survives_a_restart(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.create_budget("c", BUDGET)
        res = reserve(led, "r0")
    with sqlite3.connect(path) as conn:
        (text,) = conn.execute("SELECT receipt FROM spends WHERE spend_id = ?", (res.spend_id,)).fetchone()
    assert Receipt.from_dict(json.loads(text)) == res.receipt  # written with the reservation, before any release
    with SqliteLedger(path, group_commit=False) as led:
        with pytest.raises(ReleaseMissing):
            reserve(led, "r0")
        led.store_release(res.spend_id, np.arange(3.0))
    with SqliteLedger(path) as led:
        again = reserve(led, "r0")
        assert again.replay and again.receipt == res.receipt.as_replay()
        assert led.find_release(domain="c", tenant="t0", binding_hash="h")[2] == res.receipt


def test_a_receipt_written_with_the_release_by_older_code_is_read(tmp_path):
    """Schema 1 files written before the ledger composed receipts hold the server's receipt JSON,
    stored with the release; the layout is the same, so they replay unchanged."""
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.create_budget("c", BUDGET)
        res = reserve(led, "r0")
        led.store_release(res.spend_id, np.ones(2))
    old = {**res.receipt.to_dict(), "epsilon_charged": 0.25, "extra": "ignored"}
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE spends SET receipt = ?", (json.dumps(old, sort_keys=True),))
    with SqliteLedger(path) as led:
        assert reserve(led, "r0").receipt.epsilon_charged == 0.25


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


def test_one_batch_is_one_transaction_with_sequential_admission(tmp_path):
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led.create_budget("c", BUDGET)
        before = led.stats()["transactions"]
        batch = _batch([f"r{i}" for i in range(M + 3)] + ["r0"])
        led._writer.execute(batch)
        assert led.stats()["transactions"] == before + 1
        assert all(p.error is None and not p.result.replay for p in batch[:M])
        assert [p.result.state.spends for p in batch[:M]] == list(range(1, M + 1))
        assert all(isinstance(p.error, BudgetExhausted) for p in batch[M:-1])
        assert isinstance(batch[-1].error, ReleaseMissing)  # sees the reservation made earlier in the batch
        assert led.budget_state("c").spends == M
        led.verify()


def test_a_replay_sees_a_release_stored_earlier_in_its_batch(tmp_path):
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led.create_budget("c", BUDGET)
        res = reserve(led, "r0")
        batch = [Pending(StoreRelease.build(res.spend_id, np.ones(2))), Pending(_reserve_op("r0"))]
        led._writer.execute(batch)
        assert batch[0].error is None and batch[1].error is None
        assert batch[1].result.replay and np.array_equal(batch[1].result.release, np.ones(2))
        assert batch[1].result.receipt == res.receipt.as_replay()


@dataclass(frozen=True)
class Boom:
    """An operation whose handler fails unexpectedly."""


def test_unexpected_error_in_a_batch_fails_only_its_operation(tmp_path, monkeypatch):
    def boom(writer, tx, op):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(writer_module.HANDLERS, Boom, boom)
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led.create_budget("c", BUDGET)
        batch = _batch(["a"]) + [Pending(Boom())] + _batch(["b"])
        led._writer.execute(batch)
        assert batch[0].result.state.spends == 1 and batch[2].result.state.spends == 2
        assert isinstance(batch[1].error, RuntimeError)
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


def test_busy_store_fails_the_batch_quickly_and_recovers(tmp_path):
    path = tmp_path / "l.db"
    with SqliteLedger(path, group_commit=False, busy_timeout_s=0.05) as led:
        led.create_budget("c", BUDGET)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        batch = _batch(["a", "b"])
        led._writer.execute(batch)
        assert all(type(p.error) is LedgerUnavailable and "database is locked" in str(p.error) for p in batch)
        other.execute("ROLLBACK")
        other.close()
        assert reserve(led, "a").state.spends == 1
        led.verify()


def test_writer_lock_orders_writers_and_never_hangs(tmp_path):
    """The side ``flock`` of issue 14: a contended acquire is woken when the holder releases, a
    timed-out one gives the lock back when it later gets it, and a ledger whose writer cannot get
    it fails with the busy timeout (nothing charged), then recovers. Two open files in one process
    conflict like two processes (flock locks belong to the open file)."""
    path = tmp_path / "l.db"
    with SqliteLedger(path, group_commit=False, busy_timeout_s=0.05) as led:
        led.create_budget("c", BUDGET)
        lock_path = tmp_path / "l.db-writer.lock"
        assert led._writer._file_lock is not None and led._writer._file_lock.path == lock_path
        holder, other = WriterLock(lock_path), WriterLock(lock_path)
        try:
            assert holder.acquire(0.0)
            batch = _batch(["a"])
            led._writer.execute(batch)  # the ledger's writer waits 0.05 s for the lock, then gives up
            assert type(batch[0].error) is LedgerUnavailable and "database is locked" in str(batch[0].error)
            assert not other.acquire(0.01)  # timed out; its helper thread still waits in flock
            got = threading.Event()
            waiter = threading.Thread(target=lambda: other.acquire(60) and got.set())
            waiter.start()
            holder.release()  # wakes the helper: the waiting acquire gets the lock
            waiter.join(60)
            assert got.is_set() and not holder.acquire(0.01)
            other.release()
            assert holder.acquire(60)  # nobody kept it after the release
            holder.release()
        finally:
            holder.close()
            other.close()
        assert reserve(led, "a").state.spends == 1  # the writer takes the free lock again
        led.verify()


def test_writer_lock_is_optional(tmp_path):
    """A directory where the lock file cannot be created: the ledger still works on SQLite's
    own locking (the flock only orders writers; it is never what makes admission exact)."""
    assert WriterLock.open(tmp_path / "missing-dir" / "l.db") is None
    with SqliteLedger(tmp_path / "l.db", group_commit=False) as led:
        led._writer._file_lock.close()
        led._writer._file_lock = None
        led.create_budget("c", BUDGET)
        assert reserve(led, "a").state.spends == 1
