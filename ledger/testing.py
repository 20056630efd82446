"""A throw-away PostgreSQL server for tests and benchmarks of the PostgreSQL ledger (a REAL server,
no fake); not for production.

:class:`PgServer` runs ``initdb`` and ``pg_ctl start`` in a temporary directory, listening on a
free loopback port (its unix socket in the same directory; ``fsync`` on, as a real server), and
:meth:`PgServer.new_url` hands out a fresh, empty schema per ledger (``CREATE SCHEMA`` is instant;
a database per test is not), as a ``postgresql://`` URL whose ``options=-csearch_path=...`` puts
the ledger's tables there.

The binaries are found through ``pg_config --bindir``, ``PATH`` or ``/usr/lib/postgresql/*/bin``
(Debian's ``postgresql`` package). ``initdb`` refuses to run as root: as root the cluster is
created and run as the unprivileged ``postgres`` user (``runuser``), which owns the directory.

Standard library only (psycopg is imported by :meth:`PgServer.new_url`).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

__all__ = ["PgServer", "PgUnavailable", "find_bindir", "INSTALL_HINT"]

INSTALL_HINT = "no PostgreSQL server binaries (install them: apt-get install postgresql)"
"""Why no server can start when :func:`find_bindir` finds nothing."""


class PgUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the message says why)."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()])
    candidates += [Path(p) for p in reversed(versions)]
    for d in candidates:
        if all((d / name).is_file() and os.access(d / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temporary directory (see the module docstring).

    Args:
        bindir: the server binaries (default: :func:`find_bindir`).

    Raises:
        PgUnavailable: no binaries, or the cluster cannot be created or started (with its log's tail).
    """

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PgUnavailable(INSTALL_HINT)
        self.bindir = found
        self.root = Path(tempfile.mkdtemp(prefix="dprdm-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the unprivileged postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PgUnavailable("running as root and there is no 'postgres' user to run initdb as") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._user = "postgres"
        self.port = 0
        self._schemas = itertools.count()
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                      "--locale=C.UTF-8")  # fmt: skip
            self.start()
        except PgUnavailable:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        argv = [str(self.bindir / tool), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        except (OSError, subprocess.SubprocessError) as exc:
            raise PgUnavailable(f"{tool} failed: {exc}") from None
        if out.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise PgUnavailable(f"{tool} failed ({out.returncode}): {out.stderr.strip()[-2000:]} {tail}")
        return out.stdout

    def start(self) -> None:
        """Start (or start again, on the same port once one was chosen) and wait until it accepts connections."""
        for attempt in range(5):
            port = self.port or _free_port()
            opts = (f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                    "-c shared_buffers=32MB -c max_wal_size=256MB")  # fmt: skip
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
            except PgUnavailable:
                if self.port or attempt == 4:
                    raise
                continue  # the free port was taken meanwhile
            self.port = port
            return

    def stop(self) -> None:
        """Stop the server (fast shutdown); idempotent."""
        if self.data.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except PgUnavailable:
                pass

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every client connection is cut, the server comes back on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", schema: str | None = None) -> str:
        """A ``postgresql://`` URL of this server (as the ``postgres`` superuser), optionally with a search path."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        if schema is not None:
            url += "?options=" + quote(f"-csearch_path={schema}")
        return url

    def new_url(self) -> str:
        """The URL of a fresh, empty schema (one per ledger, so ledgers never see each other's tables)."""
        import psycopg

        schema = f"t{os.getpid()}_{next(self._schemas)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return self.url(schema=schema)
