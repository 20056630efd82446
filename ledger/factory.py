"""Open a ledger store from a URL or a path: the one factory the server and the command line use.

* ``postgresql://user@host:port/db`` (or ``postgres://``): :class:`~dprdm.ledger.postgres.PostgresLedger`
  (psycopg 3 with a connection pool; the ``server`` extra). Any libpq URL parameter is passed on,
  e.g. ``?sslmode=require`` or ``?options=-csearch_path%3Ddprdm`` (the ledger's tables in schema
  ``dprdm``); a password is better given by ``PGPASSWORD`` or ``~/.pgpass`` than in the URL.
* ``sqlite:///PATH`` or a plain path: :class:`~dprdm.ledger.sqlite.SqliteLedger` on that file
  (``sqlite:///ledger.db`` is relative, ``sqlite:////srv/ledger.db`` absolute, as SQLAlchemy
  spells them).

Errors and logs name a URL with its password replaced by ``***`` (:func:`redact_url`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .api import Ledger, LedgerError

__all__ = ["open_ledger", "parse_ledger_url", "redact_url", "POSTGRES_SCHEMES"]

POSTGRES_SCHEMES = ("postgresql", "postgres")
"""URL schemes of the PostgreSQL store (libpq accepts both)."""


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "(a malformed URL)"


def parse_ledger_url(target: str | Path) -> tuple[str, str]:
    """Which store ``target`` names: ``("postgresql", url)`` or ``("sqlite", path)``.

    Raises:
        ValueError: one line naming the (redacted) URL: an unknown scheme, no path, no host or
            database, or a malformed URL.
    """
    if isinstance(target, Path):
        return "sqlite", str(target)
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"ledger URL must be a non-empty string; found {target!r}")
    scheme, sep, rest = target.partition("://")
    if not sep:
        if ":" in target.split("/", 1)[0] and not Path(target).exists():  # "postgresql:host/db", "mysql:..."
            raise ValueError(f"ledger URL {redact_url(target)!r} is not postgresql://... or sqlite:///PATH")
        return "sqlite", target
    scheme = scheme.lower()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path or rest[:1] != "/":
            raise ValueError(f"ledger URL {target!r} has no file: use sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH")
        return "sqlite", path
    if scheme in POSTGRES_SCHEMES:
        try:
            parts = urlsplit(target)
            parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"ledger URL {redact_url(target)!r} is malformed: {exc}") from None
        if not parts.path.strip("/") and not parts.hostname:
            raise ValueError(f"ledger URL {redact_url(target)!r} names no host and no database")
        return "postgresql", target
    raise ValueError(f"ledger URL {redact_url(target)!r}: unknown scheme {scheme!r} (expected postgresql:// or sqlite:///)")


def open_ledger(target: str | Path, *, group_commit: bool = True, **options: Any) -> Ledger:
    """The ledger store ``target`` names (see the module docstring), opened.

    Args:
        target: a ``postgresql://`` or ``sqlite:///`` URL, or a SQLite file path.
        group_commit: batch concurrent writes into one transaction (both stores).
        options: further keyword arguments of the store's constructor.

    Raises:
        ValueError: a bad URL (one line naming it).
        LedgerError: the PostgreSQL store without psycopg installed (one line: how to install it).
        LedgerUnavailable: the database cannot be reached.
        SchemaMismatch: the store holds another schema version or is not a dprdm ledger.
    """
    kind, where = parse_ledger_url(target)
    if kind == "sqlite":
        from .sqlite import SqliteLedger

        return SqliteLedger(where, group_commit=group_commit, **options)
    try:
        from .postgres import PostgresLedger
    except ImportError as exc:
        raise LedgerError(
            f"ledger {redact_url(where)}: the PostgreSQL store needs psycopg: pip install 'dprdm[server]' "
            f"(missing module {exc.name})"
        ) from None
    return PostgresLedger(where, group_commit=group_commit, **options)
