"""The ledger's batching writer: every write runs here, in batches, one transaction each (SPEC §6).

:meth:`Writer.execute` evaluates a batch of operations (:mod:`dprdm.ledger.ops`) in order inside
ONE transaction and commits before any caller is answered. With group commit a committer thread
drains whatever callers queued while the previous batch was committing; without, each caller runs
a batch of one under a lock. Both modes share the code, so they share the semantics; admission
inside a batch is sequential (each operation sees the ones before it).

The writer is store-independent: the SQL of the operations is shared (standard SQL with ``?``
placeholders, run by SQLite and, through an adapter, by PostgreSQL), and each store supplies the
few store-specific steps as hook methods: how a transaction begins and serialises against other
processes (SQLite's ``BEGIN IMMEDIATE``; PostgreSQL's row lock on each privacy domain of the
batch, ``SELECT ... FOR UPDATE``, sent with the prefetch), how it learns that another process
committed (its cached running curves are then reloaded), commit, rollback, which errors mean "the
store cannot commit" (:class:`LedgerUnavailable`) and which mean "run the batch again"
(PostgreSQL's serialisation failures, deadlocks and concurrent inserts of one key, retried here
a bounded number of times). :class:`~dprdm.ledger.sqlite.SqliteWriter` and
:class:`~dprdm.ledger.postgres.PgWriter` implement them.

Operations are dispatched on their type through :data:`HANDLERS`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from dprdm.privacy import Budget
from dprdm.privacy.accountant import curve_from_json

from .api import DomainExists, LedgerError, LedgerUnavailable, Receipt, Reservation
from .ops import CheckWritable, CreateBudget, Pending, Reserve, StoreRelease, WriteOp
from .state import (
    ORDERS,
    DomainState,
    Rule,
    SpendRow,
    Tx,
    chunks,
    curve_text,
    decode_release,
    unknown_domain,
    unknown_spend,
)

__all__ = ["Writer", "HANDLERS", "stored_receipt", "each_unavailable", "CommitObserver", "MAX_RETRIES"]

log = logging.getLogger("dprdm.ledger")

_SPEND_COLUMNS = "s.spend_id, s.domain, s.binding_hash, s.release, s.release_shape, s.receipt"


CommitObserver = Callable[[LedgerUnavailable | None], None]
"""Told the outcome of every write transaction: None after a commit, the error when the store
could not commit (called on the committing thread, in commit order; it must be quick)."""


MAX_RETRIES = 8
"""How many times a batch is run again after a transient conflict (PostgreSQL: serialisation
failure, deadlock, a concurrent insert of the same key, a pooled connection found dead before
anything was committed); after that its operations fail with :class:`LedgerUnavailable`."""


def each_unavailable(err: LedgerUnavailable, cause: BaseException) -> LedgerUnavailable:
    """A copy of ``err`` for one caller (each caller's thread raises its own exception object)."""
    out = LedgerUnavailable(err.path, err.cause, err.retry_after_seconds)
    out.__cause__ = cause
    return out


def stored_receipt(stored: str | Receipt) -> Receipt:
    """A spend's receipt from its stored JSON text (or the object composed in this batch)."""
    return stored if isinstance(stored, Receipt) else Receipt.from_dict(json.loads(stored))


class Writer:
    """Runs write operations in batches, one transaction each; owns the running-state cache.

    Store-independent: a store subclasses it and implements the hooks :meth:`_begin`,
    :meth:`_refresh`, :meth:`_commit`, :meth:`_rollback`, :meth:`_finish`, :meth:`_unavailable`,
    :meth:`_close_store` (and :meth:`_retryable`, :data:`WRITE_CHECK_SQL`, :data:`ROW_LOCK` when
    the defaults do not fit; it may wrap :meth:`_prefetch` and :meth:`_flush`, e.g. to send their
    statements in one round trip). A subclass sets its own attributes BEFORE calling this constructor
    (the committer thread may start a batch at once).

    A transaction the store cannot commit fails its operations with :class:`LedgerUnavailable`
    (naming the cause and ``path``); every outcome is reported to the :attr:`observers`.

    Args:
        group_commit: run a committer thread that batches concurrent callers.
        window_s: with group commit, how long to wait for more writes after the first one.
        max_batch: largest number of operations per transaction.
        path: the store (named in errors): a file, or a URL without its password.
    """

    WRITE_CHECK_SQL = ""
    """The health probe's statement (:class:`CheckWritable`): rewrites ``meta.write_check``."""
    ROW_LOCK = ""
    """Appended to the prefetch of the spends a batch stores releases for (PostgreSQL: row locks)."""

    def __init__(self, *, group_commit: bool, window_s: float, max_batch: int, path: str = "") -> None:
        self._path = path
        self.observers: list[CommitObserver] = []
        self._window = window_s
        self._max_batch = max_batch
        self._cache: dict[str, DomainState] = {}
        self._curves: set[str] = set()  # curve ids known to be committed
        self._rules: dict[str, Rule] = {}
        self._lock = threading.Lock()  # one transaction at a time when group_commit=False, and close()
        self._cv = threading.Condition()
        self._queue: deque[Pending] = deque()
        self.closed = False
        self._stats = {"transactions": 0, "operations": 0, "retries": 0}
        self._committer: threading.Thread | None = None
        if group_commit:
            self._committer = threading.Thread(target=self._commit_loop, name="ledger-committer", daemon=True)
            self._committer.start()

    # ------------------------------------------------------------------------ store-specific hooks

    def _begin(self) -> Any:
        """Begin a write transaction; return the connection the batch runs on (wrapped so that
        ``execute``/``executemany`` take ``?`` placeholders)."""
        raise NotImplementedError

    def _refresh(self, tx: Tx, ops: list[WriteOp]) -> None:
        """Inside the transaction, before anything is read: make sure no cached running state is
        older than what another connection committed (drop stale entries of ``self._cache``)."""
        raise NotImplementedError

    def _commit(self, conn: Any) -> None:
        """Commit (durably) the transaction on ``conn``."""
        raise NotImplementedError

    def _rollback(self, conn: Any) -> None:
        """Roll back after a failed statement or commit; must not raise."""
        raise NotImplementedError

    def _finish(self, conn: Any) -> None:
        """After the transaction, committed or not (e.g. give the connection back to a pool)."""

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable | None:
        """The :class:`LedgerUnavailable` a store error means (the store cannot commit), or None
        for anything else (a bug), which is raised as it is."""
        raise NotImplementedError

    def _retryable(self, exc: BaseException) -> bool:
        """Whether the failed batch had no effect and may simply run again (default: never)."""
        return False

    def _close_store(self) -> None:
        """Close the store's connections (called once, after the last batch)."""
        raise NotImplementedError

    def _before_batch(self) -> None:
        """Group commit, before the committer takes its batch off the queue (default: nothing).
        A store whose transactions wait for other processes may take its cross-process lock here,
        so that the callers who queued during that wait ride in this batch (SQLite)."""

    # ------------------------------------------------------------------------------------ batching

    def rule(self, domain: str, budget_json: str) -> Rule:
        """The cached admission rule of ``domain`` (built from its stored budget on first use)."""
        rule = self._rules.get(domain)
        if rule is None:
            rule = self._rules[domain] = Rule(Budget.from_dict(json.loads(budget_json)))
        return rule

    def known_rule(self, domain: str) -> Rule | None:
        """The cached rule of ``domain``, if any (a domain with a rule has a budget: none is deleted)."""
        return self._rules.get(domain)

    def submit(self, op: WriteOp) -> Any:
        """Run ``op`` (queued for the committer, or alone) and return its result once committed.

        Raises:
            LedgerError: the operation's refusal, or "ledger is closed".
        """
        pending = Pending(op)
        if self._committer is None:
            with self._lock:
                if self.closed:
                    raise LedgerError("ledger is closed")
                self.execute([pending])
        else:
            pending.done.acquire()
            with self._cv:
                if self.closed:
                    raise LedgerError("ledger is closed")
                self._queue.append(pending)
                self._cv.notify()
            pending.done.acquire()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _commit_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self.closed:
                    self._cv.wait()
                if not self._queue:
                    return
            if self._window > 0.0:
                time.sleep(self._window)
            self._before_batch()  # only this thread takes items off the queue: it is still non-empty
            with self._cv:
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                self.execute(batch)
            except Exception as exc:  # a bug: fail this batch's callers, keep committing for the others
                log.exception("ledger %s: a write batch failed unexpectedly", self._path)
                for pending in batch:
                    pending.result, pending.error = None, exc
            finally:
                for pending in batch:
                    pending.done.release()

    def execute(self, batch: list[Pending]) -> None:
        """Run ``batch`` in order in one transaction; set each operation's result or error.

        A ledger refusal fails only its operation; a transient conflict (:meth:`_retryable`) runs
        the whole batch again, at most :data:`MAX_RETRIES` times; an unexpected error rolls the
        batch back and runs each operation alone, so it fails only the operation that raised it.
        """
        for attempt in range(MAX_RETRIES + 1):
            exc = self._attempt(batch)
            if exc is None:
                return
            if attempt < MAX_RETRIES and self._retryable(exc):
                self._stats["retries"] += 1
                time.sleep(random.uniform(0.0, 0.001 * 2**attempt))  # jitter: conflicting writers diverge
                continue
            err = exc if isinstance(exc, LedgerUnavailable) else self._unavailable(exc)
            if err is None and self._retryable(exc):  # conflicts past the bound: nothing was written
                err = LedgerUnavailable(self._path, f"gave up after {MAX_RETRIES} retries: {exc}")
            if err is not None:  # the store cannot commit: every operation fails the same way
                for pending in batch:
                    pending.error = each_unavailable(err, err.__cause__ or exc)
                self.report(err)
            elif len(batch) == 1:
                batch[0].error = exc
            else:  # isolate the failing operation: run each alone
                for pending in batch:
                    self.execute([pending])
            return

    def _attempt(self, batch: list[Pending]) -> Exception | None:
        """One try of :meth:`execute`: None once committed (results and refusals set), else the
        error that rolled the transaction back (every result and error cleared)."""
        try:
            conn = self._begin()
        except Exception as exc:  # e.g. busy timeout: no operation ran, running each alone would wait again
            if self._retryable(exc) or isinstance(exc, LedgerUnavailable):
                return exc
            busy = self._unavailable(exc) or LedgerUnavailable(self._path, type(exc).__name__)
            busy.__cause__ = exc
            return busy
        tx = Tx(conn)
        try:
            try:
                ops = [p.op for p in batch]
                self._refresh(tx, ops)
                self._prefetch(tx, ops)
                for pending in batch:
                    try:
                        pending.result, pending.error = HANDLERS[type(pending.op)](self, tx, pending.op), None
                    except LedgerError as exc:
                        pending.result, pending.error = None, exc
                self._flush(tx)
                self._commit(conn)
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                self._finish(conn)
        except Exception as exc:
            for pending in batch:
                pending.result, pending.error = None, None
            return exc
        self._cache.update(tx.domains)
        self._curves.update(tx.new_curves)
        self._stats["transactions"] += 1
        self._stats["operations"] += len(batch)
        self.report(None)
        return None

    def report(self, error: LedgerUnavailable | None) -> None:
        """Tell every observer one outcome (a commit's, or a store failure a read ran into)."""
        for observer in list(self.observers):
            try:
                observer(error)
            except Exception:  # an observer must never fail a write
                log.exception("ledger commit observer %r failed", observer)

    def _prefetch(self, tx: Tx, ops: list[WriteOp]) -> None:
        keys = list({(op.tenant, op.request_id) for op in ops if isinstance(op, Reserve)})
        for chunk in chunks(keys):
            rows = tx.conn.execute(
                f"SELECT s.tenant, s.request_id, {_SPEND_COLUMNS} FROM (VALUES "
                + ", ".join(["(?, ?)"] * len(chunk))
                + ") AS v JOIN spends s ON s.tenant = v.column1 AND s.request_id = v.column2",
                [x for key in chunk for x in key],
            )
            for r in rows:
                tx.known[(r[0], r[1])] = tx.by_id[r[2]] = SpendRow(*r[2:])
        ids = list({op.spend_id for op in ops if isinstance(op, StoreRelease)} - tx.by_id.keys())
        for chunk in chunks(ids):
            sql = f"SELECT {_SPEND_COLUMNS} FROM spends s WHERE s.spend_id IN (" + ", ".join("?" * len(chunk))
            tx.by_id.update((r[0], SpendRow(*r)) for r in tx.conn.execute(sql + ")" + self.ROW_LOCK, chunk))

    def _flush(self, tx: Tx) -> None:
        if tx.new_curves:
            tx.conn.executemany("INSERT INTO curves VALUES (?, ?) ON CONFLICT DO NOTHING", tx.new_curves.items())
        for chunk in chunks(tx.new_spends):
            tx.conn.execute(
                "INSERT INTO spends (spend_id, domain, tenant, request_id, binding_hash, profile, charge_id, "
                "epsilon_charged, status, receipt, created_at) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?)"] * len(chunk)),
                [x for row in chunk for x in row],
            )
        for chunk in chunks(tx.new_releases):
            tx.conn.execute(
                "UPDATE spends SET release = v.column2, release_shape = v.column3, status = 'released' "
                "FROM (VALUES " + ", ".join(["(?, ?, ?)"] * len(chunk)) + ") AS v "
                "WHERE spends.spend_id = v.column1",
                [x for row in chunk for x in row],
            )
        for domain, st in tx.domains.items():
            if st.dirty:
                tx.conn.execute(
                    "UPDATE budgets SET spent_rdp = ?, spends = ? WHERE domain = ?",
                    (curve_text(st.spent), st.spends, domain),
                )
            for tenant in st.dirty_tenants:
                _, curve, n = st.tenants[tenant]
                tx.conn.execute(
                    "UPDATE tenant_quotas SET spent_rdp = ?, spends = ? WHERE domain = ? AND tenant = ?",
                    (curve_text(curve), n, domain, tenant),
                )

    def _domain(self, tx: Tx, domain: str) -> DomainState:
        st = tx.domains.get(domain)
        if st is not None:
            return st
        cached = self._cache.get(domain)
        if cached is None:
            row = tx.conn.execute("SELECT budget, spent_rdp, spends FROM budgets WHERE domain = ?", (domain,)).fetchone()
            if row is None:
                raise unknown_domain(domain)
            tenants = {
                t: (float(quota), curve_from_json(json.loads(curve)), int(n))
                for t, quota, curve, n in tx.conn.execute(
                    "SELECT tenant, epsilon_quota, spent_rdp, spends FROM tenant_quotas WHERE domain = ?", (domain,)
                )
            }
            cached = DomainState(self.rule(domain, row[0]), curve_from_json(json.loads(row[1])), int(row[2]), tenants)
            self._cache[domain] = cached
        st = tx.domains[domain] = cached.copy()
        return st

    # ---------------------------------------------------------------------------------- operations

    def _create(self, tx: Tx, op: CreateBudget) -> None:
        if tx.conn.execute("SELECT 1 FROM budgets WHERE domain = ?", (op.domain,)).fetchone():
            raise DomainExists(f"privacy domain {op.domain!r} already has a budget")
        zero = curve_text(np.zeros_like(ORDERS))
        tx.conn.execute(
            "INSERT INTO budgets VALUES (?, ?, ?, 0, ?)",
            (op.domain, json.dumps(op.budget.to_dict()), zero, time.time()),
        )
        tx.conn.executemany(
            "INSERT INTO tenant_quotas VALUES (?, ?, ?, ?, 0)", [(op.domain, t, q, zero) for t, q in op.quotas.items()]
        )

    def _reserve(self, tx: Tx, op: Reserve) -> Reservation:
        st = self._domain(tx, op.domain)
        known = tx.known.get((op.tenant, op.request_id))
        if known is not None:
            has_release = known.release is not None and known.shape is not None and known.receipt is not None
            op.check_replay(binding_hash=known.binding, domain=known.domain, has_release=has_release)
            assert known.release is not None and known.shape is not None and known.receipt is not None
            receipt = stored_receipt(known.receipt).as_replay()
            release = decode_release(known.release, known.shape)
            return Reservation(known.spend_id, True, st.state(op.domain), receipt, release)
        (curve_id, charge_json, eps_charged), state = st.charge(op.domain, op.tenant, op.charge, op.charge_key)
        if curve_id not in self._curves:
            tx.new_curves[curve_id] = charge_json
        spend_id, receipt = op.new_spend(eps_charged, state)
        tx.new_spends.append(
            (spend_id, op.domain, op.tenant, op.request_id, op.binding_hash, op.profile_json, curve_id, eps_charged,
             json.dumps(receipt.to_dict()), time.time())
        )  # fmt: skip
        tx.known[(op.tenant, op.request_id)] = tx.by_id[spend_id] = SpendRow(
            spend_id, op.domain, op.binding_hash, None, None, receipt
        )
        return Reservation(spend_id, False, state, receipt)

    def _store(self, tx: Tx, op: StoreRelease) -> None:
        row = tx.by_id.get(op.spend_id)
        if row is None:
            raise unknown_spend(op.spend_id)
        if op.needs_write(row.release, row.shape):
            row.release, row.shape = op.blob, op.shape
            tx.new_releases.append((op.spend_id, op.blob, op.shape))

    def _check_writable(self, tx: Tx, op: CheckWritable) -> None:
        tx.conn.execute(self.WRITE_CHECK_SQL)

    # ------------------------------------------------------------------------------------- misc

    def stats(self) -> dict[str, int]:
        """Write transactions committed, operations they carried and batches run again (this process)."""
        return dict(self._stats)

    def close(self) -> None:
        """Finish queued writes, stop the committer and close the connection (idempotent)."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._cv.notify_all()
        if self._committer is not None:
            self._committer.join()
        with self._lock:
            self._close_store()


HANDLERS: dict[type, Callable[[Writer, Tx, Any], Any]] = {
    CreateBudget: Writer._create,
    Reserve: Writer._reserve,
    StoreRelease: Writer._store,
    CheckWritable: Writer._check_writable,
}
"""Operation type -> the writer method that applies it inside a batch transaction."""
