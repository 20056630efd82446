"""The default durable privacy ledger: SQLite in WAL mode with ``synchronous=FULL`` (SPEC §6, §11).

The file's layout is in :mod:`dprdm.ledger.schema`; every write runs through the batching writer
of :mod:`dprdm.ledger.writer` (one ``BEGIN IMMEDIATE`` transaction per batch, committed before
any caller is answered; group commit optional), whose SQLite hooks are :class:`SqliteWriter`.
The public methods, reads and the consistency check (``verify``) are shared with the other SQL
stores (:class:`~dprdm.ledger.sqlstore.SqlLedger`); this module opens the file, serves reads
from per-thread read-only connections and tells which SQLite errors mean "cannot commit".
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .api import LedgerCorrupt, LedgerError, LedgerUnavailable
from .ops import WriteOp
from .schema import SCHEMA_VERSION, check_counts, connect, init_schema
from .sqlstore import SqlLedger
from .state import Tx
from .writer import Writer

__all__ = ["SCHEMA_VERSION", "SqliteLedger", "SqliteWriter", "WriterLock", "unavailable"]

log = logging.getLogger("dprdm.ledger")

# SQLite's primary result codes for a store that cannot commit (not a bug in the program):
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOLFS, NOTADB.
_STORE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 22, 26})
_STORE_TEXTS = (  # the same failures by message, for an error without a code (raised by Python code)
    "database or disk is full",
    "disk i/o error",
    "readonly database",
    "unable to open database file",
    "database is locked",
    "database table is locked",
    "malformed",
    "not a database",
    "out of memory",
)


def unavailable(exc: BaseException, path: str) -> LedgerUnavailable | None:
    """The :class:`LedgerUnavailable` a SQLite error means, or None for anything else (a bug:
    an SQL error, a constraint, misuse), which stays as it is.

    The store cannot commit when SQLite says "database or disk is full", "disk I/O error",
    "attempt to write a readonly database", "unable to open database file", "database is
    locked" (busy timeout), or that the file is damaged; told by the result code, or by the
    message when the error carries none.
    """
    if not isinstance(exc, sqlite3.DatabaseError):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code is not None:
        if code & 0xFF not in _STORE_CODES:
            return None
    elif not any(t in text.lower() for t in _STORE_TEXTS):
        return None
    out = LedgerUnavailable(path, text or type(exc).__name__)
    out.__cause__ = exc
    return out


class WriterLock:
    """An exclusive ``flock`` on a side file, ``<ledger>-writer.lock``, that the writers of every
    process using the ledger take around ``BEGIN IMMEDIATE ... COMMIT`` (issue 14).

    Why: SQLite's busy handler waits for another process's write lock by SLEEPING (1, 2, 5, ...
    100 ms steps), so with two server processes a commit could wait up to ~1 s after the lock was
    free. A blocking ``flock`` waiter is woken by the kernel when the holder releases. The flock
    only orders the writers: SQLite's own lock still decides (``BEGIN IMMEDIATE`` runs inside it
    with the busy timeout), so a process that does not take it (an older server, the ``sqlite3``
    shell) stays correct and merely waits the old way. The lock is dropped by the kernel when a
    process dies, even by ``kill -9``.

    The wait is bounded like SQLite's (``timeout_s``): an uncontended lock is taken at once; a
    contended one by a helper thread blocking in ``flock``, which gives the lock straight back if
    the writer stopped waiting (a stopped holder then makes the writer fail with the busy timeout
    as before, not hang). One writer thread uses it at a time (the ledger's committer).

    Args:
        path: the lock file (created, mode 0600, beside the database; never removed).

    Raises:
        OSError: the file cannot be opened (see :meth:`open`, which returns None instead).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._cond = threading.Condition()
        self._held = self._wanted = self._waiting = False

    @classmethod
    def open(cls, db: Path) -> WriterLock | None:
        """The lock beside ``db``, or None if it cannot be created (e.g. a read-only directory:
        the writers then rely on SQLite's busy handler alone; logged)."""
        path = db.with_name(db.name + "-writer.lock")
        try:
            return cls(path)
        except OSError as exc:
            log.info("ledger %s: no writer lock file %s (%s); SQLite's busy handler alone orders writers",
                     db, path, exc.strerror or exc)  # fmt: skip
            return None

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, waiting at most ``timeout_s`` seconds; False on timeout (not held)."""
        with self._cond:
            if not self._waiting:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._waiting = True
                    threading.Thread(target=self._wait, name="ledger-writer-lock", daemon=True).start()
                else:
                    self._held = True
                    return True
            self._wanted = True
            if not self._cond.wait_for(lambda: self._held, timeout_s):
                self._wanted = False  # the helper gives the lock back when it gets it
                return False
            return True

    def _wait(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks until the holder releases (or dies)
        except OSError:  # closed meanwhile (the ledger is closing): nothing is held
            with self._cond:
                self._waiting = False
            return
        with self._cond:
            self._waiting = False
            if self._wanted:
                self._held = True
                self._cond.notify_all()
            elif self._fd >= 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self) -> None:
        """Drop the lock (no-op if not held)."""
        with self._cond:
            if self._held:
                self._held = self._wanted = False
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (drops the lock)."""
        with self._cond:
            self._held = self._wanted = False
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class SqliteWriter(Writer):
    """The writer's SQLite hooks: one connection, ``BEGIN IMMEDIATE`` (which serialises every
    process on the file, busy timeout) inside the :class:`WriterLock` of the file when it has one,
    and ``PRAGMA data_version``, which tells this process when another one committed, so its
    cached running curves are reloaded.

    Args:
        conn: the writer connection (WAL, ``synchronous=FULL``).
        group_commit, window_s, max_batch, path: as :class:`~dprdm.ledger.writer.Writer`.
        lock: the cross-process writer lock (None: SQLite's busy handler alone).
        lock_timeout_s: how long to wait for ``lock`` (the busy timeout).
    """

    # 64 KiB of fresh bytes (16 WAL frames: more than one charge writes, so space that lets the
    # probe commit lets a charge commit; unchanged bytes would write nothing at all).
    WRITE_CHECK_SQL = "INSERT OR REPLACE INTO meta VALUES ('write_check', hex(randomblob(32768)))"

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        group_commit: bool,
        window_s: float,
        max_batch: int,
        path: str = "",
        lock: WriterLock | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self._conn = conn
        self._data_version = -1
        self._file_lock, self._lock_timeout = lock, lock_timeout_s
        self._prelock: bool | None = None  # the committer's lock taken before its batch (None: not tried)
        super().__init__(group_commit=group_commit, window_s=window_s, max_batch=max_batch, path=path)

    def _before_batch(self) -> None:
        """Take the writer lock BEFORE the batch leaves the queue: while this process waits for the
        other processes' commits, its own callers keep queueing and all ride in this batch (issue 14
        profile: a process took its batch first, then waited ~1.8 ms per batch with it)."""
        if self._file_lock is not None:
            try:
                self._prelock = self._file_lock.acquire(self._lock_timeout)
            except OSError:  # e.g. closing: _begin tries again and reports the store's error
                self._prelock = None

    def _begin(self) -> sqlite3.Connection:
        held, self._prelock = self._prelock, None
        lock = self._file_lock
        if lock is not None:
            if held is None:  # not tried before this batch (a retry, or no group commit)
                held = lock.acquire(self._lock_timeout)
            if not held:  # False from _before_batch: it already waited the whole timeout
                raise LedgerUnavailable(self._path, f"database is locked (writer lock {lock.path})")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._finish(self._conn)
            raise
        return self._conn

    def _finish(self, conn: Any) -> None:
        if self._file_lock is not None:
            self._file_lock.release()

    def _refresh(self, tx: Tx, ops: list[WriteOp]) -> None:
        version = tx.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:  # another connection committed: reload
            self._cache.clear()
            self._data_version = version

    def _commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: Any) -> None:
        """After SQLITE_FULL or SQLITE_IOERR SQLite may already have rolled back (then
        ``in_transaction`` is False); a ROLLBACK that fails too leaves nothing committed either
        (the WAL index header was never advanced)."""
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("ledger %s: ROLLBACK after a failed transaction failed too", self._path)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable | None:
        return unavailable(exc, self._path)

    def _close_store(self) -> None:
        self._conn.close()
        if self._file_lock is not None:
            self._file_lock.close()


class SqliteLedger(SqlLedger):
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

    A file written with another Rényi order grid is migrated to the current one at open,
    conservatively and in one transaction (:mod:`dprdm.ledger.migration`; logged, and recorded
    in the file's ``meta`` table).

    A write the store cannot commit (disk full, I/O error, read-only file, busy past the
    timeout) raises :class:`~dprdm.ledger.api.LedgerUnavailable` naming the cause and the file;
    it was rolled back, so nothing was charged. :meth:`add_commit_observer` is told every
    write's outcome and :meth:`check_writable` probes whether the store can commit again.

    Raises:
        SchemaMismatch: the file holds another schema version, an order grid it cannot migrate
            from, or is not a dprdm ledger.
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
        conn = connect(self.path, self._timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        init_schema(conn, self.path)
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._readers_lock = threading.Lock()
        self._writer = SqliteWriter(
            conn,
            group_commit=group_commit,
            window_s=float(batch_window_s),
            max_batch=int(max_batch),
            path=str(self.path),
            lock=WriterLock.open(self.path),
            lock_timeout_s=self._timeout,
        )
        if check_on_open:
            try:
                check_counts(self._reader())
            except LedgerCorrupt:
                self.close()
                raise

    def _reader(self) -> sqlite3.Connection:
        if self._writer.closed:
            raise LedgerError("ledger is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._writer.closed:
                    raise LedgerError("ledger is closed")
                conn = connect(self.path, self._timeout)
                conn.execute("PRAGMA query_only=ON")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _reading(self) -> nullcontext[sqlite3.Connection]:
        return nullcontext(self._reader())

    def close(self) -> None:
        """Finish queued writes, stop the committer and close every connection (idempotent).

        Later calls raise :class:`~dprdm.ledger.api.LedgerError` ("ledger is closed").
        """
        self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> SqliteLedger:
        return self
