"""The durable privacy ledger (SPEC §6): the protocol every store implements, its errors, and the
stores: :class:`SqliteLedger` (the default, one file), ``dprdm.ledger.postgres.PostgresLedger``
(PostgreSQL: several servers and hosts on one budget; needs the ``server`` extra, so it is
imported only by :func:`open_ledger` for a ``postgresql://`` URL) and :class:`MemoryLedger` (no
durability). :func:`open_ledger` opens a store from a URL or a path.

Imports only :mod:`dprdm.privacy`: the server, the baselines and the benchmarks use the ledger
without importing the server. The ledger composes and stores every :class:`Receipt`.

Every store passes ONE behavioural suite, ``tests/test_ledger_conformance.py`` (a fixture over
SQLite and PostgreSQL, each with and without group commit, and the in-memory store); a new store
joins that fixture.
"""

from .api import (
    BudgetExhausted,
    BudgetState,
    DomainExists,
    Ledger,
    LedgerCorrupt,
    LedgerError,
    LedgerUnavailable,
    QuotaExhausted,
    Receipt,
    ReleaseConflict,
    ReleaseMissing,
    ReplayMismatch,
    Reservation,
    SchemaMismatch,
    Spend,
    UnknownDomain,
    UnknownSpend,
)
from .factory import open_ledger, parse_ledger_url, redact_url
from .memory import MemoryLedger
from .sqlite import SCHEMA_VERSION, SqliteLedger

__all__ = [
    "Ledger",
    "open_ledger",
    "parse_ledger_url",
    "redact_url",
    "SqliteLedger",
    "MemoryLedger",
    "SCHEMA_VERSION",
    "BudgetState",
    "Spend",
    "Reservation",
    "Receipt",
    "LedgerError",
    "BudgetExhausted",
    "QuotaExhausted",
    "UnknownDomain",
    "DomainExists",
    "ReplayMismatch",
    "ReleaseMissing",
    "SchemaMismatch",
    "UnknownSpend",
    "ReleaseConflict",
    "LedgerCorrupt",
    "LedgerUnavailable",
]
