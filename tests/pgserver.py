"""The session's PostgreSQL server for the PostgreSQL ledger's tests (the fixture ``pg_server`` in
``conftest.py``): :class:`dprdm.ledger.testing.PgServer`, a REAL server in a temporary directory.

:func:`start_or_skip` starts one server for the whole session. When none can start the tests
that need it are skipped with ONE line (``conftest.py`` folds them into one ``-ra`` summary line
saying how to install it), or FAIL when ``DPRDM_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import os

import pytest

from dprdm.ledger.testing import INSTALL_HINT, PgServer, PgUnavailable, find_bindir

__all__ = ["PgServer", "start_or_skip", "SKIP_PREFIX", "REQUIRE_ENV"]

REQUIRE_ENV = "DPRDM_REQUIRE_POSTGRES"
"""Set to 1 (CI): a PostgreSQL server that cannot start fails the tests instead of skipping them."""
SKIP_PREFIX = "PostgreSQL tests skipped"
"""Every skip reason of these tests starts with it (conftest.py folds them into one line)."""


def start_or_skip() -> PgServer:
    """Start a server, or skip (with :data:`INSTALL_HINT`'s one line) / fail under ``DPRDM_REQUIRE_POSTGRES=1``."""
    try:
        import psycopg  # noqa: F401  (the server extra)
    except ImportError:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but psycopg is missing: pip install 'dprdm[server]'", pytrace=False)
        pytest.skip(f"{SKIP_PREFIX}: psycopg is missing (pip install 'dprdm[server]')")
    try:
        return PgServer()
    except PgUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no PostgreSQL server could start: {exc}", pytrace=False)
        pytest.skip(f"{SKIP_PREFIX}: {INSTALL_HINT if find_bindir() is None else exc}")
