"""The durable privacy ledger (SPEC §6): the protocol every store implements, its errors, and the
stores: :class:`SqliteLedger` (the default, one file) and :class:`MemoryLedger` (no durability).

Imports only :mod:`dprdm.privacy`: the server, the baselines and the benchmarks use the ledger
without importing the server. The ledger composes and stores every :class:`Receipt`.

Every store passes ONE behavioural suite, ``tests/test_ledger_conformance.py`` (a fixture over
SQLite with and without group commit and the in-memory store); a new store joins that fixture.
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
from .memory import MemoryLedger
from .sqlite import SCHEMA_VERSION, SqliteLedger

__all__ = [
    "Ledger",
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
