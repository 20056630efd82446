"""The default durable privacy ledger: SQLite in WAL mode with ``synchronous=FULL`` (SPEC §6, §11).

Layout (schema version :data:`SCHEMA_VERSION`, checked at open):

* ``meta(key, value)``: ``schema_version`` and the Rényi order grid the curves are over.
* ``budgets``: one row per privacy domain: the budget (JSON), the running spent curve (JSON),
  the number of spends, creation time.
* ``tenant_quotas``: (domain, tenant) -> epsilon quota and the tenant's own running curve.
* ``curves``: charge curves (JSON) keyed by a hash of their text; a profile's curve is stored
  once, not in every spend row (2 KB per row; bigger rows make every commit's fsync slower).
* ``spends``: the append-only audit trail; ``seq`` is the admission order, (tenant, request_id)
  is unique, ``charge_id`` names the charge curve; the release (float64 bytes) and receipt (JSON)
  are attached after the fact.

Every write runs through :meth:`SqliteLedger._execute`, which evaluates a batch of operations in
order inside ONE ``BEGIN IMMEDIATE`` transaction and commits (one fsync) before any caller is
answered. With ``group_commit=True`` a committer thread drains whatever callers queued while the
previous batch was committing; with ``group_commit=False`` each caller runs a batch of one under
a process-wide lock. Both modes share the code, so they share the semantics; admission inside a
batch is sequential (each operation sees the ones before it). Several processes may share one
file: ``BEGIN IMMEDIATE`` serialises them (busy timeout) and ``PRAGMA data_version`` tells a
process when another one committed, so its in-memory running curves are reloaded.

Running curves are updated by ``spent = spent + charge`` in admission order, so they equal,
bit for bit, the sequential sum of the spends' charge curves in ``seq`` order; :meth:`verify`
checks exactly that. Reservations are never refunded and there is no delete.

Admission uses :class:`~dprdm.ledger.state.Rule`, a thin wrapper over the privacy core's
``Budget.admits`` / ``Budget.spent_epsilon`` (O(#orders), the grid constants precomputed by
``EpsilonConverter``, ~15 us), so the ledger and the privacy core share one admission rule.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import DEFAULT_ORDERS, Budget
from dprdm.privacy.accountant import curve_from_json

from .api import (
    BudgetExhausted,
    BudgetState,
    DomainExists,
    LedgerCorrupt,
    LedgerError,
    QuotaExhausted,
    ReleaseMissing,
    ReplayMismatch,
    Reservation,
    SchemaMismatch,
    Spend,
    UnknownDomain,
    UnknownSpend,
)
from .state import (
    ORDERS,
    DomainState,
    Op,
    Rule,
    Tx,
    check_curve,
    check_text,
    chunks,
    curve_id_of,
    curve_text,
    decode_release,
    short_repr,
)

__all__ = ["SCHEMA_VERSION", "SqliteLedger"]

_log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_ORDERS_JSON = json.dumps([float(a) for a in DEFAULT_ORDERS])

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE budgets (
    domain TEXT PRIMARY KEY, budget TEXT NOT NULL, spent_rdp TEXT NOT NULL,
    spends INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE tenant_quotas (
    domain TEXT NOT NULL REFERENCES budgets(domain), tenant TEXT NOT NULL,
    epsilon_quota REAL NOT NULL, spent_rdp TEXT NOT NULL, spends INTEGER NOT NULL,
    PRIMARY KEY (domain, tenant));
CREATE TABLE curves (curve_id TEXT PRIMARY KEY, rdp TEXT NOT NULL);
CREATE TABLE spends (
    seq INTEGER PRIMARY KEY, spend_id TEXT NOT NULL UNIQUE, domain TEXT NOT NULL,
    tenant TEXT NOT NULL, request_id TEXT NOT NULL, binding_hash TEXT NOT NULL,
    profile TEXT NOT NULL, charge_id TEXT NOT NULL REFERENCES curves(curve_id), epsilon_charged REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released')),
    release BLOB, release_shape TEXT, receipt TEXT, created_at REAL NOT NULL,
    UNIQUE (tenant, request_id));
CREATE INDEX spends_by_domain ON spends (domain, seq);
CREATE INDEX spends_by_binding ON spends (tenant, binding_hash);
"""


class SqliteLedger:
    """The default :class:`~dprdm.ledger.api.Ledger`: SQLite, WAL, ``synchronous=FULL``.

    Thread-safe; several processes may open the same file.

    Args:
        path: the database file (created with the schema if missing).
        group_commit: batch concurrent writes into one transaction (one fsync per batch).
        busy_timeout_s: how long to wait for another process's write lock.
        batch_window_s: with group commit, how long the committer waits for more writes after
            the first one arrives (0: batch only what queued during the previous commit).
        max_batch: largest number of writes per transaction.
        check_on_open: check every domain's spend count against its spends at open
            (one aggregate query; :meth:`verify` checks the curves too).

    Raises:
        SchemaMismatch: the file holds another schema version, another order grid, or is not
            a dprdm ledger.
        LedgerCorrupt: a domain's spend count does not match its spends.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        group_commit: bool = True,
        busy_timeout_s: float = 30.0,
        batch_window_s: float = 0.0,
        max_batch: int = 256,
        check_on_open: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; found {max_batch!r}")
        if not (batch_window_s >= 0.0):
            raise ValueError(f"batch_window_s must be >= 0; found {batch_window_s!r}")
        self.path = Path(path)
        self._timeout = float(busy_timeout_s)
        self._window = float(batch_window_s)
        self._max_batch = int(max_batch)
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._init_schema()
        self._cache: dict[str, DomainState] = {}
        self._curves: set[str] = set()  # curve ids known to be committed
        self._rules: dict[str, Rule] = {}
        self._data_version = -1
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # the writer connection when group_commit=False, and close()
        self._readers_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[Op] = deque()
        self._closed = False
        self._stats = {"transactions": 0, "operations": 0}
        self._committer: threading.Thread | None = None
        if check_on_open:
            self._check_counts()
        if group_commit:
            self._committer = threading.Thread(target=self._commit_loop, name="ledger-committer", daemon=True)
            self._committer.start()

    # ----------------------------------------------------------------------------------------- open

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False, cached_statements=1024
        )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
        return conn

    def _init_schema(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("schema_version", str(SCHEMA_VERSION)), ("orders", _ORDERS_JSON)]
                )
            elif "meta" not in tables:
                raise SchemaMismatch(f"{self.path} is not a dprdm ledger (no meta table)")
            else:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if meta.get("schema_version") != str(SCHEMA_VERSION):
                    raise SchemaMismatch(
                        f"ledger schema version {meta.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
                    )
                if meta.get("orders") is None or json.loads(meta["orders"]) != json.loads(_ORDERS_JSON):
                    raise SchemaMismatch("ledger curves are over another Rényi order grid than DEFAULT_ORDERS")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise

    def _check_counts(self) -> None:
        rows = self._reader().execute(
            "SELECT b.domain, b.spends, (SELECT COUNT(*) FROM spends s WHERE s.domain = b.domain) FROM budgets b"
        )
        for domain, stored, counted in rows:
            if stored != counted:
                raise LedgerCorrupt(f"domain {domain!r} records {stored} spends but has {counted}")

    # --------------------------------------------------------------------------------- write path

    def _submit(self, kind: str, *args: Any) -> Any:
        op = Op(kind, args)
        if self._committer is None:
            with self._lock:
                if self._closed:
                    raise LedgerError("ledger is closed")
                self._execute([op])
        else:
            op.done.acquire()
            with self._cv:
                if self._closed:
                    raise LedgerError("ledger is closed")
                self._queue.append(op)
                self._cv.notify()
            op.done.acquire()
        if op.error is not None:
            raise op.error
        return op.result

    def _commit_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
            if self._window > 0.0:
                time.sleep(self._window)
            with self._cv:
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                self._execute(batch)
            finally:
                for op in batch:
                    op.done.release()

    def _execute(self, ops: list[Op]) -> None:
        """Run ``ops`` in order in one transaction; set each op's result or error."""
        conn = self._conn
        tx = Tx(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # e.g. busy timeout: no operation ran, retrying each would wait again
            for op in ops:
                op.result, op.error = None, LedgerError(f"ledger store unavailable ({type(exc).__name__})")
                op.error.__cause__ = exc
            return
        try:
            try:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != self._data_version:  # another connection committed: reload
                    self._cache.clear()
                    self._data_version = version
                self._prefetch(tx, ops)
                for op in ops:
                    try:
                        op.result = _HANDLERS[op.kind](self, tx, *op.args)
                    except LedgerError as exc:
                        op.error = exc
                self._flush(tx)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            for op in ops:
                op.result, op.error = None, None
            if len(ops) == 1:
                ops[0].error = exc
            else:  # isolate the failing operation: run each alone
                for op in ops:
                    self._execute([op])
            return
        self._cache.update(tx.domains)
        self._curves.update(tx.new_curves)
        self._stats["transactions"] += 1
        self._stats["operations"] += len(ops)

    def _prefetch(self, tx: Tx, ops: list[Op]) -> None:
        keys = list({(op.args[1], op.args[2]) for op in ops if op.kind == "reserve"})
        for chunk in chunks(keys):
            rows = tx.conn.execute(
                "SELECT s.tenant, s.request_id, s.spend_id, s.domain, s.binding_hash, s.release, s.release_shape, "
                "s.receipt FROM (VALUES " + ", ".join(["(?, ?)"] * len(chunk)) + ") AS v "
                "JOIN spends s ON s.tenant = v.column1 AND s.request_id = v.column2",
                [x for key in chunk for x in key],
            )
            tx.known.update(((r[0], r[1]), list(r[2:])) for r in rows)
        ids = list({op.args[0] for op in ops if op.kind == "store"})
        for chunk in chunks(ids):
            sql = "SELECT spend_id, release, release_shape FROM spends WHERE spend_id IN (" + ", ".join("?" * len(chunk))
            tx.by_id.update((r[0], [r[1], r[2]]) for r in tx.conn.execute(sql + ")", chunk))

    def _flush(self, tx: Tx) -> None:
        if tx.new_curves:
            tx.conn.executemany("INSERT OR IGNORE INTO curves VALUES (?, ?)", tx.new_curves.items())
        for chunk in chunks(tx.new_spends):
            tx.conn.execute(
                "INSERT INTO spends (spend_id, domain, tenant, request_id, binding_hash, profile, charge_id, "
                "epsilon_charged, status, created_at) VALUES "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?)"] * len(chunk)),
                [x for row in chunk for x in row],
            )
        for chunk in chunks(tx.new_releases):
            tx.conn.execute(
                "UPDATE spends SET release = v.column2, release_shape = v.column3, receipt = v.column4, "
                "status = 'released' FROM (VALUES " + ", ".join(["(?, ?, ?, ?)"] * len(chunk)) + ") AS v "
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
                raise UnknownDomain(f"no budget for privacy domain {domain!r}")
            tenants = {
                t: (float(quota), curve_from_json(json.loads(curve)), int(n))
                for t, quota, curve, n in tx.conn.execute(
                    "SELECT tenant, epsilon_quota, spent_rdp, spends FROM tenant_quotas WHERE domain = ?", (domain,)
                )
            }
            cached = DomainState(self._rule(domain, row[0]), curve_from_json(json.loads(row[1])), int(row[2]), tenants)
            self._cache[domain] = cached
        st = tx.domains[domain] = cached.copy()
        return st

    def _rule(self, domain: str, budget_json: str) -> Rule:
        rule = self._rules.get(domain)
        if rule is None:
            rule = self._rules[domain] = Rule(Budget.from_dict(json.loads(budget_json)))
        return rule

    # ---------------------------------------------------------------------------------- operations

    def _op_create(self, tx: Tx, domain: str, budget: Budget, quotas: dict[str, float]) -> None:
        if tx.conn.execute("SELECT 1 FROM budgets WHERE domain = ?", (domain,)).fetchone():
            raise DomainExists(f"privacy domain {domain!r} already has a budget")
        zero = curve_text(np.zeros_like(ORDERS))
        tx.conn.execute(
            "INSERT INTO budgets VALUES (?, ?, ?, 0, ?)", (domain, json.dumps(budget.to_dict()), zero, time.time())
        )
        tx.conn.executemany(
            "INSERT INTO tenant_quotas VALUES (?, ?, ?, ?, 0)", [(domain, t, q, zero) for t, q in quotas.items()]
        )

    def _op_reserve(
        self,
        tx: Tx,
        domain: str,
        tenant: str,
        request_id: str,
        binding: str,
        profile: str,
        charge: npt.NDArray[np.float64],
        key: bytes,
    ) -> Reservation:
        st = self._domain(tx, domain)
        known = tx.known.get((tenant, request_id))
        if known is not None:
            spend_id, spend_domain, spend_binding, release, shape, receipt = known
            if spend_binding != binding or spend_domain != domain:
                raise ReplayMismatch(f"request_id {request_id!r} of tenant {tenant!r} was used for another request")
            if release is None:
                raise ReleaseMissing(f"request_id {request_id!r} of tenant {tenant!r} has no stored release")
            return Reservation(spend_id, True, st.state(domain), decode_release(release, shape), json.loads(receipt))
        rule = st.rule
        admitted, eps_total = rule.admit(st.spent, charge)
        if not admitted:
            raise BudgetExhausted(domain, rule.epsilon(st.spent), rule.epsilon_budget)
        quota = st.tenants.get(tenant)
        if quota is not None and rule.epsilon(quota[1] + charge) > quota[0]:
            raise QuotaExhausted(domain, tenant, rule.epsilon(quota[1]), quota[0])
        curve_id, charge_json, eps_charged = rule.charge_info(charge, key)
        if curve_id not in self._curves:
            tx.new_curves[curve_id] = charge_json
        spend_id = f"{time.time_ns():016x}{os.urandom(8).hex()}"  # time-ordered: appends to its index
        tx.new_spends.append((spend_id, domain, tenant, request_id, binding, profile, curve_id, eps_charged, time.time()))
        tx.known[(tenant, request_id)] = [spend_id, domain, binding, None, None, None]
        st.spent = st.spent + charge
        st.spent.flags.writeable = False
        st.spends += 1
        st.dirty = True
        if quota is not None:
            st.tenants[tenant] = (quota[0], quota[1] + charge, quota[2] + 1)
            st.dirty_tenants.add(tenant)
        state = st.state(domain, eps_total)
        receipt = {
            "spend_id": spend_id,
            "domain": domain,
            "profile": json.loads(profile),
            "delta": float(rule.budget.delta),
            "epsilon_charged": eps_charged,
            "epsilon_spent": state.epsilon_spent,
            "epsilon_left": state.epsilon_left,
        }
        return Reservation(spend_id, False, state, None, receipt)

    def _op_store(self, tx: Tx, spend_id: str, blob: bytes, shape: str, receipt: str) -> None:
        row = tx.by_id.get(spend_id)
        if row is None:
            raise UnknownSpend(f"no spend with id {spend_id!r}")
        if row[0] is not None:
            if row[0] != blob or row[1] != shape:
                raise LedgerError(f"spend {spend_id!r} already has a different release")
            return
        row[0], row[1] = blob, shape
        tx.new_releases.append((spend_id, blob, shape, receipt))

    # ------------------------------------------------------------------------------- public writes

    def create_budget(self, domain: str, budget: Budget, *, tenant_quotas: dict[str, float] | None = None) -> None:
        """Create the budget of a privacy domain, with optional per-tenant epsilon quotas.

        Args:
            domain: privacy domain (corpus id).
            budget: its (epsilon, delta) budget and admission rule.
            tenant_quotas: tenant -> epsilon quota at the budget's delta (bookkeeping under the
                domain budget; tenants without a quota are limited by the budget only).

        Raises:
            DomainExists: the domain already has a budget (never replaced).
            ValueError: naming a bad domain, tenant or quota.
        """
        check_text("domain", domain)
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be a dprdm.privacy.Budget; found {type(budget).__name__}")
        quotas: dict[str, float] = {}
        for tenant, quota in (tenant_quotas or {}).items():
            check_text("tenant", tenant)
            q = float(quota)
            if not (q > 0.0) or math.isinf(q):
                raise ValueError(f"quota of tenant {tenant!r} must be finite and > 0; found {quota!r}")
            quotas[tenant] = q
        self._submit("create", domain, budget, quotas)

    def reserve(
        self,
        *,
        domain: str,
        tenant: str,
        request_id: str,
        binding_hash: str,
        profile: dict[str, Any],
        charge_rdp: npt.NDArray[np.float64],
    ) -> Reservation:
        """Check and durably append a charge; committed (fsync) before returning.

        Args:
            domain: privacy domain.
            tenant: the authenticated tenant.
            request_id: the client's idempotency key (unique per tenant).
            binding_hash: hash of (index version, profile, prompt) the request id is bound to.
            profile: the profile as plain JSON (stored in the audit trail and the receipt).
            charge_rdp: the charge, an RDP curve over ``DEFAULT_ORDERS`` (>= 0, may be ``+inf``).

        Returns:
            The new reservation, or the stored release of a replay (nothing charged).

        Raises:
            UnknownDomain: no budget for ``domain``.
            ReplayMismatch: ``request_id`` was used with another binding or domain.
            ReleaseMissing: ``request_id`` was reserved but its release never stored.
            BudgetExhausted: the domain budget does not admit the charge (nothing written).
            QuotaExhausted: the tenant's quota does not admit the charge (nothing written).
            ValueError: naming a malformed argument.
        """
        for name, value in (("domain", domain), ("tenant", tenant), ("request_id", request_id)):
            check_text(name, value)
        check_text("binding_hash", binding_hash)
        try:
            profile_json = json.dumps(profile, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"profile must be plain JSON; found {short_repr(profile)}") from exc
        charge = check_curve(charge_rdp)
        res: Reservation = self._submit(
            "reserve", domain, tenant, request_id, binding_hash, profile_json, charge, charge.tobytes()
        )
        return res

    def store_release(self, spend_id: str, release: npt.NDArray[np.float64], receipt: dict[str, Any]) -> None:
        """Durably attach the release and receipt to a reserved spend.

        Idempotent: storing the same release again is a no-op (the first receipt is kept).

        Args:
            spend_id: the reservation's spend id.
            release: the released array (stored as float64).
            receipt: the receipt returned to the client (plain JSON).

        Raises:
            UnknownSpend: no spend has this id.
            LedgerError: the spend already has a different release.
            ValueError: a malformed argument.
        """
        check_text("spend_id", spend_id)
        arr = np.ascontiguousarray(release, dtype="<f8")
        try:
            receipt_json = json.dumps(receipt, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError("receipt must be plain JSON") from exc
        self._submit("store", spend_id, arr.tobytes(), json.dumps(list(arr.shape)), receipt_json)

    # -------------------------------------------------------------------------------------- reads

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._closed:
                    raise LedgerError("ledger is closed")
                conn = self._connect()
                conn.execute("PRAGMA query_only=ON")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _read_rule(self, conn: sqlite3.Connection, domain: str) -> Rule:
        rule = self._rules.get(domain)
        if rule is None:
            row = conn.execute("SELECT budget FROM budgets WHERE domain = ?", (domain,)).fetchone()
            if row is None:
                raise UnknownDomain(f"no budget for privacy domain {domain!r}")
            rule = self._rule(domain, row[0])
        return rule

    def budget_state(self, domain: str) -> BudgetState:
        """The domain's committed state (including other processes' commits).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        conn = self._reader()
        row = conn.execute("SELECT budget, spent_rdp, spends FROM budgets WHERE domain = ?", (domain,)).fetchone()
        if row is None:
            raise UnknownDomain(f"no budget for privacy domain {domain!r}")
        rule = self._rule(domain, row[0])
        spent = curve_from_json(json.loads(row[1]))
        spent.flags.writeable = False
        return BudgetState(domain, rule.budget, spent, int(row[2]), rule.epsilon(spent))

    def domains(self) -> list[str]:
        """All domains with a budget, sorted."""
        return [r[0] for r in self._reader().execute("SELECT domain FROM budgets ORDER BY domain")]

    def find_release(
        self, *, domain: str, tenant: str, binding_hash: str
    ) -> tuple[str, npt.NDArray[np.float64], dict[str, Any]] | None:
        """The newest stored release of ``tenant`` for the same public input (reuse, charged 0).

        Returns:
            ``(spend_id, release, receipt)``, or None. Other tenants' releases are never returned.
        """
        row = self._reader().execute(
            "SELECT spend_id, release, release_shape, receipt FROM spends WHERE tenant = ? AND binding_hash = ? "
            "AND domain = ? AND release IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (tenant, binding_hash, domain),
        ).fetchone()
        if row is None:
            return None
        return row[0], decode_release(row[1], row[2]), json.loads(row[3])

    def request_binding(self, *, tenant: str, request_id: str) -> str | None:
        """The binding hash of the spend charged for (tenant, request id), or None."""
        row = self._reader().execute(
            "SELECT binding_hash FROM spends WHERE tenant = ? AND request_id = ? LIMIT 1", (tenant, request_id)
        ).fetchone()
        return None if row is None else str(row[0])

    def audit_trail(self, domain: str, *, limit: int = 1000, offset: int = 0) -> list[Spend]:
        """Spends of a domain in admission order (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
            ValueError: ``limit`` not in [1, 100000] or ``offset`` < 0.
        """
        if not (isinstance(limit, int) and 1 <= limit <= 100_000):
            raise ValueError(f"limit must be an integer in [1, 100000]; found {limit!r}")
        if not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"offset must be an integer >= 0; found {offset!r}")
        conn = self._reader()
        self._read_rule(conn, domain)
        rows = conn.execute(
            "SELECT spend_id, domain, tenant, request_id, binding_hash, profile, epsilon_charged, created_at, status "
            "FROM spends WHERE domain = ? ORDER BY seq LIMIT ? OFFSET ?",
            (domain, limit, offset),
        )
        return [Spend(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8]) for r in rows]

    def tenant_quotas(self, domain: str) -> dict[str, tuple[float, float]]:
        """tenant -> (epsilon quota, epsilon spent at the budget's delta) (admin only).

        Raises:
            UnknownDomain: no budget for ``domain``.
        """
        conn = self._reader()
        rule = self._read_rule(conn, domain)
        rows = conn.execute("SELECT tenant, epsilon_quota, spent_rdp FROM tenant_quotas WHERE domain = ?", (domain,))
        return {t: (float(q), rule.epsilon(curve_from_json(json.loads(c)))) for t, q, c in rows}

    def verify(self, domain: str | None = None) -> None:
        """Check that stored running curves and counts equal what the spends add up to.

        Recomputes, in one read snapshot, the sequential sum of the charge curves in admission
        order per domain and per quota tenant, which must equal the running curves bit for bit,
        and checks the spend counts and that a spend is ``released`` iff it has a release.

        Args:
            domain: one domain, or None for all.

        Raises:
            UnknownDomain: ``domain`` has no budget.
            LedgerCorrupt: naming the domain (and tenant) that does not add up.
        """
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            names = self.domains() if domain is None else [domain]
            for name in names:
                self._verify_domain(conn, name)
        finally:
            conn.execute("COMMIT")

    def _verify_domain(self, conn: sqlite3.Connection, domain: str) -> None:
        row = conn.execute("SELECT spent_rdp, spends FROM budgets WHERE domain = ?", (domain,)).fetchone()
        if row is None:
            raise UnknownDomain(f"no budget for privacy domain {domain!r}")
        quotas = {
            t: (curve_from_json(json.loads(c)), n)
            for t, c, n in conn.execute("SELECT tenant, spent_rdp, spends FROM tenant_quotas WHERE domain = ?", (domain,))
        }
        total = np.zeros_like(ORDERS)
        tenants = {t: np.zeros_like(ORDERS) for t in quotas}
        tenant_counts = dict.fromkeys(quotas, 0)
        decoded: dict[str, npt.NDArray[np.float64]] = {}  # by curve id
        count = 0
        for tenant, curve_id, text, status, has_release in conn.execute(
            "SELECT s.tenant, s.charge_id, c.rdp, s.status, s.release IS NOT NULL FROM spends s "
            "LEFT JOIN curves c ON c.curve_id = s.charge_id WHERE s.domain = ? ORDER BY s.seq",
            (domain,),
        ):
            charge = decoded.get(curve_id)
            if charge is None:
                if text is None or curve_id_of(text) != curve_id:
                    raise LedgerCorrupt(f"domain {domain!r}: charge curve {curve_id!r} is missing or altered")
                charge = decoded[curve_id] = curve_from_json(json.loads(text))
            total = total + charge
            count += 1
            if tenant in tenants:
                tenants[tenant] = tenants[tenant] + charge
                tenant_counts[tenant] += 1
            if (status == "released") != bool(has_release):
                raise LedgerCorrupt(f"domain {domain!r} has a spend whose status {status!r} disagrees with its release")
        if count != row[1] or not np.array_equal(total, curve_from_json(json.loads(row[0]))):
            raise LedgerCorrupt(f"domain {domain!r}: running curve or count ({row[1]}) differs from its {count} spends")
        for tenant, (curve, n) in quotas.items():
            if n != tenant_counts[tenant] or not np.array_equal(curve, tenants[tenant]):
                raise LedgerCorrupt(f"domain {domain!r}: quota curve of tenant {tenant!r} differs from its spends")

    def stats(self) -> dict[str, int]:
        """Write transactions committed and operations they carried (this process)."""
        return dict(self._stats)

    def close(self) -> None:
        """Finish queued writes, stop the committer and close every connection (idempotent)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._committer is not None:
            self._committer.join()
        with self._lock, self._readers_lock:
            for conn in [*self._readers, self._conn]:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HANDLERS: dict[str, Callable[..., Any]] = {
    "create": SqliteLedger._op_create,
    "reserve": SqliteLedger._op_reserve,
    "store": SqliteLedger._op_store,
}
