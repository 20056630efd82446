"""Migration of a ledger file's stored curves to the current Rényi order grid (SPEC §4).

A ledger records the grid its curves are over (``meta.orders``). When the code's grid
(``DEFAULT_ORDERS``) differs, :func:`migrate_grid` rewrites, inside the caller's open
transaction, every stored curve with the privacy core's conservative rule
(:func:`dprdm.privacy.orders.migrate_curve`: the value at a new order is the stored value at the
smallest stored order above or at it, ``+inf`` above the largest): the domains' running curves,
the quota tenants' curves and the charge curves of the spends (re-keyed by their new text's hash).
It then records the new grid and appends a record of the migration to ``meta.grid_migrations``.

The rule only selects stored values, so it commutes with the running sums bit for bit: after a
migration a running curve is still exactly the sequential sum of its spends' (migrated) charge
curves, and :meth:`SqliteLedger.verify` checks the same invariant as before. Every order of the
old grid keeps its value, so a Rényi-filter budget (whose order must be on both grids) admits
exactly as before, and a single-profile budget's spent epsilon (min over the grid) is unchanged
for delta < 1/max-order (the conversion term decreases with the order there; see
``migrate_curve``): the migrated curve only states what the old one did. Receipts and their
``epsilon_charged`` stay as issued (they record what was said then).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.privacy import DEFAULT_ORDERS
from dprdm.privacy.accountant import curve_from_json
from dprdm.privacy.orders import validate_orders

from .api import SchemaMismatch
from .state import curve_id_of, curve_text

__all__ = ["ORDERS_JSON", "migrate_grid", "grid_is_current"]

ORDERS_JSON = json.dumps([float(a) for a in DEFAULT_ORDERS])
"""The current grid as stored in ``meta.orders``."""

_LOG = logging.getLogger("dprdm.ledger")


def _stored_grid(text: str | None, path: Path) -> list[float]:
    try:
        grid = [float(a) for a in json.loads(text or "null")]
        validate_orders(grid)
    except (TypeError, ValueError) as exc:
        raise SchemaMismatch(f"{path}: the ledger's order grid (meta.orders) is unreadable: {exc}") from None
    return grid


def _migrate_text(text: str, grid: list[float]) -> str:
    return curve_text(curve_from_json(json.loads(text), stored_orders=grid))


def migrate_grid(conn: sqlite3.Connection, path: Path, stored_orders: str | None) -> dict[str, Any]:
    """Migrate every stored curve of the open file from its grid to ``DEFAULT_ORDERS``.

    Runs inside the caller's ``BEGIN IMMEDIATE`` transaction (all or nothing); the caller commits.

    Args:
        conn: the writer connection, in a write transaction.
        path: the file (messages).
        stored_orders: ``meta.orders`` as stored.

    Returns:
        The record appended to ``meta.grid_migrations``.

    Raises:
        SchemaMismatch: the stored grid is unreadable, or a Rényi-filter budget's order is not on
            the current grid (its guarantee cannot be carried over), or a stored curve does not
            match the stored grid; nothing is changed.
    """
    grid = _stored_grid(stored_orders, path)
    try:
        domains = conn.execute("SELECT domain, budget, spent_rdp FROM budgets").fetchall()
        for domain, budget, spent in domains:
            order = json.loads(budget).get("filter_order")
            if order is not None and float(order) not in DEFAULT_ORDERS:
                raise SchemaMismatch(
                    f"{path}: domain {domain!r} is a Rényi filter at order {order!r}, which is not on the "
                    "current order grid; open it with the version of dprdm that wrote it"
                )
            conn.execute("UPDATE budgets SET spent_rdp = ? WHERE domain = ?", (_migrate_text(spent, grid), domain))
        tenants = conn.execute("SELECT domain, tenant, spent_rdp FROM tenant_quotas").fetchall()
        conn.executemany(
            "UPDATE tenant_quotas SET spent_rdp = ? WHERE domain = ? AND tenant = ?",
            [(_migrate_text(c, grid), d, t) for d, t, c in tenants],
        )
        mapping = {}
        for curve_id, text in conn.execute("SELECT curve_id, rdp FROM curves").fetchall():
            new_text = _migrate_text(text, grid)
            mapping[curve_id] = (curve_id_of(new_text), new_text)
    except ValueError as exc:  # a curve whose length or values do not fit the stored grid
        raise SchemaMismatch(f"{path}: a stored curve does not match the ledger's order grid: {exc}") from None
    # Re-key the charge curves in one statement per table, so an old id that equals another
    # curve's new id cannot be rewritten twice.
    conn.execute("CREATE TEMP TABLE grid_map (old TEXT PRIMARY KEY, new TEXT NOT NULL)")
    try:
        conn.executemany("INSERT INTO grid_map VALUES (?, ?)", [(old, new) for old, (new, _) in mapping.items()])
        conn.execute(
            "UPDATE spends SET charge_id = (SELECT new FROM grid_map WHERE old = spends.charge_id) "
            "WHERE charge_id IN (SELECT old FROM grid_map)"
        )
        conn.execute("DELETE FROM curves")
        conn.executemany("INSERT OR IGNORE INTO curves VALUES (?, ?)", list(mapping.values()))
    finally:
        conn.execute("DROP TABLE temp.grid_map")
    record = {
        "from_orders": grid,
        "to_orders": [float(a) for a in DEFAULT_ORDERS],
        "migrated_at": time.time(),
        "domains": len(domains),
        "tenant_curves": len(tenants),
        "charge_curves": len(mapping),
        "rule": "value at the smallest stored order >= the new order; +inf above the largest",
    }
    row = conn.execute("SELECT value FROM meta WHERE key = 'grid_migrations'").fetchone()
    history = [] if row is None else json.loads(row[0])
    history.append(record)
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('grid_migrations', ?)", (json.dumps(history),))
    conn.execute("UPDATE meta SET value = ? WHERE key = 'orders'", (ORDERS_JSON,))
    _LOG.warning(
        "ledger %s: migrated its curves from a %d-order grid to the current %d-order grid "
        "(%d domains, %d tenant curves, %d charge curves; conservative, recorded in meta.grid_migrations)",
        path, len(grid), len(DEFAULT_ORDERS), len(domains), len(tenants), len(mapping),
    )  # fmt: skip
    return record


def grid_is_current(stored_orders: str | None) -> bool:
    """Whether ``meta.orders`` (as stored) is the current grid (parsed, not compared as text)."""
    if stored_orders is None:
        return False
    try:
        return bool(np.array_equal(np.asarray(json.loads(stored_orders), dtype=np.float64), DEFAULT_ORDERS))
    except (TypeError, ValueError):
        return False
