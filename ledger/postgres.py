"""The PostgreSQL privacy ledger: several servers on several hosts spending one budget (SPEC §6).

Same semantics as the SQLite store (the same public methods, SQL, operations and admission code:
:class:`~dprdm.ledger.sqlstore.SqlLedger`, :mod:`dprdm.ledger.writer`), on a database the
operator already runs, through psycopg 3 and two connection pools (psycopg_pool): one connection
for the writer, a few for reads.

Admission is exact under concurrency from any number of processes and hosts. Each write batch is
one READ COMMITTED transaction that first takes the row lock of every privacy domain it charges
(``SELECT ... FOR UPDATE``, in domain order, so two writers never deadlock on them); every later
statement of the transaction then sees everything committed before the lock was granted, and the
domain's running curve is read, checked and written back under that lock, so admissions of one
domain are serialised across every process. A process keeps a domain's running state cached and
reuses it while the locked row's spend count is the one it cached (a count changes with every
spend, and the quota tenants' curves only change with one). The commit is durable
(``synchronous_commit = on`` is set on the writer's connection, whatever the server's default)
before any caller is answered. A batch costs three round trips: BEGIN; the row locks with the
idempotency prefetch; the writes with COMMIT (psycopg's pipeline mode).

Transient conflicts run the batch again inside the ledger (at most ``MAX_RETRIES`` times, see
:mod:`dprdm.ledger.writer`): a serialisation failure or deadlock (SQLSTATE 40001, 40P01), a
concurrent insert of the same (tenant, request id) by another process (23505: the retry then sees
that spend and answers as a replay), and a pooled connection found dead before the writes and
COMMIT were sent (a database restart: nothing of the batch was committed). They never surface as a spend that did
not happen or a refusal that should not be.

A database that cannot be reached or cannot commit (connection refused or lost, server shutting
down, disk full, lock timeout, read-only standby) raises
:class:`~dprdm.ledger.api.LedgerUnavailable`, as the SQLite store does for I/O faults. When the
connection is lost once the writes and COMMIT were sent the outcome is unknown: the caller gets
``LedgerUnavailable``, and if the commit did happen, a retry with the same request id is answered
with :class:`~dprdm.ledger.api.ReleaseMissing` (a charge without a release: the safe side, as
SQLite after a failed fsync). The pools reconnect after a restart.

Schema: the tables of :mod:`dprdm.ledger.schema` in PostgreSQL's types, created by the first
server that opens an empty schema (under an advisory lock, so several servers starting at once
create it once) and checked at every open (:class:`~dprdm.ledger.api.SchemaMismatch` names what
differs). Which PostgreSQL schema: the URL's ``search_path`` (default ``public``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors as pge
from psycopg_pool import ConnectionPool, PoolTimeout

from .api import LedgerCorrupt, LedgerError, LedgerUnavailable, SchemaMismatch
from .factory import POSTGRES_SCHEMES, redact_url
from .migration import ORDERS_JSON, grid_is_current
from .ops import Reserve, WriteOp
from .schema import SCHEMA_VERSION, check_counts, schema_statements
from .sqlstore import SqlLedger
from .state import Tx
from .writer import Writer

__all__ = ["PostgresLedger", "PgWriter", "pg_unavailable", "SCHEMA_LOCK_KEY"]

log = logging.getLogger("dprdm.ledger")

SCHEMA_LOCK_KEY = 0x6470726D_6C656467  # "dprmledg": the advisory lock held while a schema is created or checked
"""``pg_advisory_xact_lock`` key serialising schema creation between servers starting at once."""

RECONNECT_LOG_INTERVAL_S = 30.0
"""While PostgreSQL is down, psycopg's pool logs one WARNING per reconnection attempt of each pool
(several a second with its backoff); at most one per pool per this many seconds reaches the log,
with the number left out since the previous one."""


class ReconnectLogFilter(logging.Filter):
    """Rate-limits the ``psycopg.pool`` logger's "error connecting in <pool>" warnings (see
    :data:`RECONNECT_LOG_INTERVAL_S`); every other record passes unchanged."""

    def __init__(self, interval_s: float = RECONNECT_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval, self._clock = float(interval_s), clock
        self._last: dict[str, tuple[float, int]] = {}  # pool name -> (time of the last one logged, left out since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("error connecting in")):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        pool = str(args[0]) if args else ""
        now = self._clock()
        with self._lock:
            last, dropped = self._last.get(pool, (-math.inf, 0))
            if now - last < self._interval:
                self._last[pool] = (last, dropped + 1)
                return False
            self._last[pool] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} (%d similar left out in the last %.0f s)"
            record.args = (*args, dropped, now - last)
        return True


def install_reconnect_log_filter() -> None:
    """Put one :class:`ReconnectLogFilter` on the ``psycopg.pool`` logger (idempotent)."""
    pool_log = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, ReconnectLogFilter) for f in pool_log.filters):
        pool_log.addFilter(ReconnectLogFilter())


_LOCK_DOMAINS = "SELECT domain, spends FROM budgets WHERE domain = ANY(?) ORDER BY domain FOR UPDATE"
_RETRYABLE = (pge.SerializationFailure, pge.DeadlockDetected, pge.UniqueViolation)
_NO_STORE = (pge.ReadOnlySqlTransaction, pge.InsufficientPrivilege, pge.UndefinedTable, pge.InvalidSchemaName)


def pg_unavailable(exc: BaseException, where: str) -> LedgerUnavailable | None:
    """The :class:`LedgerUnavailable` a psycopg error means (the database cannot be reached or
    cannot commit: connection refused or lost, shutdown, disk full, lock or pool timeout,
    read-only standby, missing privilege or table), or None for anything else (a bug).

    Args:
        exc: the error.
        where: the ledger's URL without its password (named in the message).
    """
    if not isinstance(exc, (psycopg.OperationalError, *_NO_STORE)):
        return None
    out = LedgerUnavailable(where, _cause(exc))
    out.__cause__ = exc
    return out


def _cause(exc: BaseException) -> str:
    """A short, fixed description of a database failure (it reaches clients: no host, port or
    statement text; the full error stays the exception's ``__cause__`` for the logs)."""
    if isinstance(exc, PoolTimeout):
        return "no database connection available in time"
    for kinds, text in _CAUSES:
        if isinstance(exc, kinds):
            return text
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return f"database error (SQLSTATE {sqlstate})"
    return "database connection lost or refused"


_CAUSES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    ((pge.AdminShutdown, pge.CrashShutdown, pge.CannotConnectNow), "database is shutting down or starting up"),
    ((pge.DiskFull, pge.OutOfMemory, pge.InsufficientResources), "database is out of disk or memory"),
    (pge.LockNotAvailable, "timed out waiting for a privacy domain's row lock"),
    ((pge.SerializationFailure, pge.DeadlockDetected), "concurrent transactions kept conflicting"),
    (pge.QueryCanceled, "the database cancelled the transaction"),
    (pge.ReadOnlySqlTransaction, "database is read-only (a standby?)"),
    (pge.InsufficientPrivilege, "the database user lacks a privilege on the ledger's tables"),
    ((pge.UndefinedTable, pge.InvalidSchemaName), "the ledger's tables are missing"),
)


@functools.lru_cache(maxsize=4096)
def _pg_sql(sql: str) -> str:
    """The shared SQL (``?`` placeholders) in psycopg's placeholder style."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Conn:
    """A psycopg connection whose ``execute``/``executemany`` take the shared ``?`` placeholders."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> psycopg.Cursor[Any]:
        return self.raw.execute(_pg_sql(sql), None if params is None else list(params))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(_pg_sql(sql), [list(r) for r in rows])


class PgWriter(Writer):
    """The writer's PostgreSQL hooks (see the module docstring): a pooled connection per batch,
    the domains' row locks, retries of transient conflicts.

    Args:
        pool: the writer's pool (autocommit connections; the writer issues BEGIN and COMMIT).
        timeout_s: how long to wait for a connection.
        group_commit, window_s, max_batch, path: as :class:`~dprdm.ledger.writer.Writer`.
    """

    WRITE_CHECK_SQL = (
        "INSERT INTO meta VALUES ('write_check', md5(random()::text)) "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    )
    ROW_LOCK = " FOR UPDATE OF s"

    def __init__(
        self, pool: ConnectionPool, *, timeout_s: float, group_commit: bool, window_s: float, max_batch: int, path: str
    ) -> None:
        self._pool = pool
        self._timeout = timeout_s
        self._raw: psycopg.Connection[Any] | None = None
        self._committing = False  # COMMIT was sent: a lost connection leaves the outcome unknown
        self._broken = False  # the last batch's connection died
        super().__init__(group_commit=group_commit, window_s=window_s, max_batch=max_batch, path=path)

    def _begin(self) -> _Conn:
        self._committing = self._broken = False
        for _ in range((self._pool.max_size or 1) + 1):  # stale connections after a restart: drop each
            raw = self._pool.getconn(timeout=self._timeout)
            try:
                raw.execute("BEGIN")
            except psycopg.OperationalError:
                self._pool.putconn(raw)  # a broken one is discarded, the pool connects a new one
                if raw.broken or raw.closed:
                    continue
                raise
            self._raw = raw
            return _Conn(raw)
        raise LedgerUnavailable(self._path, "database connection lost or refused")

    def _refresh(self, tx: Tx, ops: list[WriteOp]) -> None:
        """Nothing here: the row locks are taken by :meth:`_prefetch`, in its round trip."""

    def _prefetch(self, tx: Tx, ops: list[WriteOp]) -> None:
        """The row lock of every domain the batch charges (in domain order), then the batch's
        spends, in ONE round trip (pipeline mode; the server runs them in order, so the prefetch
        sees every commit made before the locks were granted); a cached running state whose
        spend count differs from the locked row's is dropped (another process charged it)."""
        domains = sorted({op.domain for op in ops if isinstance(op, Reserve)})
        assert self._raw is not None
        with self._raw.pipeline():
            locked = tx.conn.execute(_LOCK_DOMAINS, (domains,)) if domains else None
            super()._prefetch(tx, ops)
            rows = locked.fetchall() if locked is not None else []
        for domain, spends in rows:
            cached = self._cache.get(domain)
            if cached is not None and cached.spends != spends:
                del self._cache[domain]

    def _flush(self, tx: Tx) -> None:
        """The batch's writes and COMMIT in ONE round trip (pipeline mode). From here on a lost
        connection leaves the outcome unknown: the batch is not run again."""
        assert self._raw is not None
        self._committing = True
        with self._raw.pipeline():
            super()._flush(tx)
            tx.conn.execute("COMMIT")

    def _commit(self, conn: Any) -> None:
        """Nothing here: COMMIT went out with the writes (:meth:`_flush`)."""

    def _rollback(self, conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:  # a lost connection: the server rolled back
            pass

    def _finish(self, conn: Any) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            self._broken = raw.broken or raw.closed
            self._pool.putconn(raw)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable | None:
        return pg_unavailable(exc, self._path)

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, _RETRYABLE):
            return True
        lost = isinstance(exc, psycopg.OperationalError) and not isinstance(exc, PoolTimeout)
        return lost and self._broken and not self._committing

    def _close_store(self) -> None:
        self._pool.close()


def _configure_writer(lock_timeout_s: float) -> Any:
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
        conn.execute("SET synchronous_commit = on")  # durable commits whatever the server's default

    return configure


def init_pg_schema(conn: psycopg.Connection[Any], where: str, *, create: bool = True) -> bool:
    """Create the schema in an empty PostgreSQL schema, or check an existing one's version and grid.

    Args:
        conn: an autocommit connection.
        where: the URL without its password (messages).
        create: create the tables if there are none (False: only check).

    Returns:
        Whether the ledger's tables exist now.

    Raises:
        SchemaMismatch: another schema version, another order grid (not migrated on PostgreSQL),
            tables that are not a dprdm ledger, or no schema to create the tables in.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        schema = conn.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            raise SchemaMismatch(f"ledger {where}: no schema to create the ledger in (its search_path names none that exists)")
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema[0],)
            )
        }
        if not tables:
            if not create:
                return False
            for statement in schema_statements("postgresql"):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta VALUES (%s, %s), (%s, %s)",
                ("schema_version", str(SCHEMA_VERSION), "orders", ORDERS_JSON),
            )
            log.info("ledger %s: created the ledger's tables (schema version %d) in schema %s", where, SCHEMA_VERSION, schema[0])
            return True
        if "meta" not in tables:
            raise SchemaMismatch(f"ledger {where}: schema {schema[0]!r} has tables but is not a dprdm ledger (no meta table)")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise SchemaMismatch(
                f"ledger {where}: schema version {meta.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
            )
        if not grid_is_current(meta.get("orders")):
            raise SchemaMismatch(
                f"ledger {where}: its curves are over another Rényi order grid; PostgreSQL ledgers are not "
                "migrated between grids: open it with the version of dprdm that wrote it"
            )
    return True


class PostgresLedger(SqlLedger):
    """A :class:`~dprdm.ledger.api.Ledger` on PostgreSQL (see the module docstring).

    Thread-safe; any number of processes and hosts may open the same database.

    Args:
        url: ``postgresql://user@host:port/db`` (libpq URL; parameters such as ``sslmode`` or
            ``options=-csearch_path%3DSCHEMA`` are passed on).
        group_commit: batch concurrent writes of this process into one transaction.
        pool_size: most connections kept for reads (the writer has one of its own).
        connect_timeout_s: how long a call waits for a connection (a database that does not
            answer within it: :class:`~dprdm.ledger.api.LedgerUnavailable`).
        lock_timeout_s: how long a transaction waits for a domain's row lock held by another
            process (PostgreSQL's ``lock_timeout``; then ``LedgerUnavailable``).
        batch_window_s, max_batch, check_on_open: as :class:`~dprdm.ledger.sqlite.SqliteLedger`.
        create: create the tables in an empty schema (False: :class:`SchemaMismatch` with the
            attribute ``empty = True`` if there are none; ``serve --check`` only reads).

    Raises:
        ValueError: a URL that is not ``postgresql://``, or a bad option.
        LedgerUnavailable: the database cannot be reached.
        SchemaMismatch: another schema version or order grid, or not a dprdm ledger.
        LedgerCorrupt: a domain's spend count does not match its spends.
    """

    SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(
        self,
        url: str,
        *,
        group_commit: bool = True,
        pool_size: int = 8,
        connect_timeout_s: float = 5.0,
        lock_timeout_s: float = 30.0,
        batch_window_s: float = 0.0,
        max_batch: int = 256,
        check_on_open: bool = True,
        create: bool = True,
    ) -> None:
        if not isinstance(url, str) or url.partition("://")[0].lower() not in POSTGRES_SCHEMES:
            raise ValueError(f"url must be a postgresql:// URL; found {redact_url(str(url))!r}")
        for name, value, low in (("pool_size", pool_size, 1), ("max_batch", max_batch, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}; found {value!r}")
        for name, seconds in (("connect_timeout_s", connect_timeout_s), ("lock_timeout_s", lock_timeout_s)):
            if not (seconds > 0.0):
                raise ValueError(f"{name} must be > 0; found {seconds!r}")
        if not (batch_window_s >= 0.0):
            raise ValueError(f"batch_window_s must be >= 0; found {batch_window_s!r}")
        self.url = self.path = redact_url(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)  # libpq's own parse: a bad parameter is named now
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None
        self._timeout = float(connect_timeout_s)
        # prepare_threshold None: no server-side prepared statements. psycopg prepares a query after
        # 5 runs; a statement prepared in a pipeline whose transaction then failed (a retried
        # serialisation failure or deadlock) was seen to be missing on the next run ("prepared
        # statement _pg3_4 does not exist"), failing a reservation that should have been retried.
        kwargs = {"autocommit": True, "connect_timeout": max(2, int(connect_timeout_s)),
                  "fallback_application_name": "dprdm-ledger", "prepare_threshold": None}  # fmt: skip
        try:
            with psycopg.connect(url, **kwargs) as conn:  # type: ignore[arg-type]
                self.exists = init_pg_schema(conn, self.url, create=create)
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None
        if not self.exists:
            missing = SchemaMismatch(f"ledger {self.url}: no dprdm ledger tables in this database (schema)")
            missing.empty = True  # type: ignore[attr-defined]  # serve --check: "new", not an error
            raise missing
        install_reconnect_log_filter()
        self._readers = ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=pool_size, open=False, timeout=self._timeout,
            check=ConnectionPool.check_connection, name="dprdm-ledger-read",
        )  # fmt: skip
        writer_pool = ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=1, open=False, timeout=self._timeout,
            configure=_configure_writer(lock_timeout_s), name="dprdm-ledger-write",
        )  # fmt: skip
        try:
            self._readers.open(wait=True, timeout=self._timeout)
            writer_pool.open(wait=True, timeout=self._timeout)
        except psycopg.Error as exc:
            self._readers.close()
            writer_pool.close()
            raise self._unreachable(exc) from None
        self._writer = PgWriter(
            writer_pool, timeout_s=self._timeout, group_commit=group_commit, window_s=float(batch_window_s),
            max_batch=int(max_batch), path=self.url,
        )  # fmt: skip
        if check_on_open:
            try:
                with self._reading() as conn:
                    check_counts(conn)
            except LedgerCorrupt:
                self.close()
                raise

    def _unreachable(self, exc: psycopg.Error) -> Exception:
        """At open: the error as one line naming the URL (the operator's log, so libpq's reason
        too): ValueError for a URL libpq refuses, else :class:`LedgerUnavailable`."""
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        if isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError):  # "invalid URI query parameter"
            return ValueError(f"ledger URL {self.url!r}: {detail}")
        out = LedgerUnavailable(self.url, f"{_cause(exc)}: {detail}")
        out.__cause__ = exc
        return out

    @contextmanager
    def _reading(self) -> Iterator[_Conn]:
        if self._writer.closed:
            raise LedgerError("ledger is closed")
        try:
            with self._readers.connection() as raw:
                yield _Conn(raw)
        except psycopg.Error as exc:
            err = pg_unavailable(exc, self.url)
            if err is None:
                raise
            self._writer.report(err)  # the database is down for writes too: health follows at once
            raise err from exc

    def close(self) -> None:
        """Finish queued writes, stop the committer and close both pools (idempotent).

        Later calls raise :class:`~dprdm.ledger.api.LedgerError` ("ledger is closed").
        """
        self._writer.close()
        self._readers.close()

    def __enter__(self) -> PostgresLedger:
        return self
