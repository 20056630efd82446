"""The SQLite ledger's file: schema, version check, connections (SPEC §6, §11).

Layout (schema version :data:`SCHEMA_VERSION`, checked at open):

* ``meta(key, value)``: ``schema_version``, the Rényi order grid the curves are over (``orders``)
  and, once a file has been migrated to a new grid, ``grid_migrations`` (a JSON list of records;
  see :mod:`dprdm.ledger.migration`: a file written with another grid is migrated conservatively
  at open, in the open's transaction); ``write_check`` is scratch space of the health probe
  (``SqliteLedger.check_writable``), rewritten while the store cannot commit.
* ``budgets``: one row per privacy domain: the budget (JSON), the running spent curve (JSON),
  the number of spends, creation time.
* ``tenant_quotas``: (domain, tenant) -> epsilon quota and the tenant's own running curve.
* ``curves``: charge curves (JSON) keyed by a hash of their text; a profile's curve is stored
  once, not in every spend row (2 KB per row; bigger rows make every commit's fsync slower).
* ``spends``: the append-only audit trail; ``seq`` is the admission order, (tenant, request_id)
  is unique, ``charge_id`` names the charge curve, ``receipt`` is the receipt (JSON) the ledger
  composed when it admitted the spend; the release (float64 bytes) is attached after the fact.
  (Files written before receipts were composed by the ledger hold the same receipt JSON, written
  with the release; the layout did not change.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .api import LedgerCorrupt, SchemaMismatch
from .migration import ORDERS_JSON, grid_is_current, migrate_grid

__all__ = ["SCHEMA_VERSION", "connect", "init_schema", "check_counts"]

SCHEMA_VERSION = 1
"""The layout this code reads and writes; a file with another version is refused at open."""

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


def connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    """A connection in autocommit mode with ``synchronous=FULL`` and a busy timeout.

    Args:
        path: the database file.
        timeout_s: how long to wait for another connection's write lock.
    """
    conn = sqlite3.connect(
        path, timeout=timeout_s, isolation_level=None, check_same_thread=False, cached_statements=1024
    )
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    return conn


def init_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty file, or check an existing file's version and order grid.

    A file whose curves are over another order grid is migrated to ``DEFAULT_ORDERS`` in this
    transaction (:func:`~dprdm.ledger.migration.migrate_grid`, logged and recorded in ``meta``).
    Closes ``conn`` when it raises.

    Raises:
        SchemaMismatch: another schema version, a grid that cannot be migrated, or not a dprdm
            ledger.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)", [("schema_version", str(SCHEMA_VERSION)), ("orders", ORDERS_JSON)]
            )
        elif "meta" not in tables:
            raise SchemaMismatch(f"{path} is not a dprdm ledger (no meta table)")
        else:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise SchemaMismatch(
                    f"ledger schema version {meta.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
                )
            if not grid_is_current(meta.get("orders")):
                migrate_grid(conn, path, meta.get("orders"))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise


def check_counts(conn: sqlite3.Connection) -> None:
    """Check every domain's recorded spend count against its spends (one aggregate query).

    Raises:
        LedgerCorrupt: naming the domain whose count differs.
    """
    rows = conn.execute(
        "SELECT b.domain, b.spends, (SELECT COUNT(*) FROM spends s WHERE s.domain = b.domain) FROM budgets b"
    )
    for domain, stored, counted in rows:
        if stored != counted:
            raise LedgerCorrupt(f"domain {domain!r} records {stored} spends but has {counted}")
