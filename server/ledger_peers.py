"""Which other live servers use the same ledger file (several servers may share one budget).

Sharing a ledger is allowed: SQLite serialises the writers and every charge is checked against
the committed state, so the budget holds exactly across processes (SPEC §6). It should not be
silent, though: each server registers itself in ``<ledger>.servers/`` with a small JSON record
(pid, port, host) on a file it holds an exclusive ``flock`` on for its whole life; a starting
server lists the records whose lock is held by someone else (live servers: the kernel drops the
lock when a process dies, even by ``kill -9``), removes the stale ones, and logs one line
``ledger <path> is shared with another server (pid ..., port ...)``.

``flock`` locks belong to an open file, so two servers in one process (tests) see each other too.

The workers of one ``dprdm serve --workers N`` share the ledger by design, so they do not warn
about each other: the supervisor puts its pid in :data:`SUPERVISOR_ENV` of each worker it starts,
a worker records it (only if it is really its parent's pid, so a variable inherited by some other
process means nothing), and siblings (same host, same supervisor) are left out of the warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

__all__ = ["ServerRecord", "register_server", "SUPERVISOR_ENV", "supervisor_pid"]

log = logging.getLogger("dprdm.server")

SUPERVISOR_ENV = "DPRDM_SUPERVISOR_PID"
"""Set by :mod:`dprdm.server.supervisor` for its workers: the supervisor's pid."""


def supervisor_pid() -> int | None:
    """The pid of the supervisor that started this process (:data:`SUPERVISOR_ENV`), or None if
    it is unset, malformed, or not this process's parent."""
    try:
        pid = int(os.environ.get(SUPERVISOR_ENV, ""))
    except ValueError:
        return None
    return pid if pid == os.getppid() else None


class ServerRecord:
    """This server's locked record next to the ledger; :meth:`close` removes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def peers(self) -> list[dict[str, Any]]:
        """The records of the OTHER live servers on this ledger (stale ones are removed)."""
        out = []
        for entry in sorted(self.path.parent.glob("*.json")):
            if entry == self.path:
                continue
            try:
                fd = os.open(entry, os.O_RDONLY)
            except OSError:
                continue  # removed meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held: a live server (or another scanner removing a stale one)
                    doc = _read(entry)
                    if _alive(doc):
                        out.append(doc)
                else:  # nobody holds it: left by a server that died
                    entry.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return out

    def close(self) -> None:
        """Remove the record and drop the lock (idempotent)."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def _alive(doc: dict[str, Any]) -> bool:
    """False only for a record of this host whose process is gone."""
    pid = doc.get("pid")
    if doc.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sibling(doc: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a peer's record is another worker of this server's own supervisor."""
    mine = record.get("supervisor")
    return mine is not None and doc.get("supervisor") == mine and doc.get("host") == record["host"]


def _read(entry: Path) -> dict[str, Any]:
    try:
        doc = json.loads(entry.read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def register_server(ledger_path: Path, port: int) -> ServerRecord | None:
    """Register this server (on ``port``) as a user of the ledger at ``ledger_path`` and log one
    line if other live servers use it too. Returns the record to close at shutdown, or None if
    the directory cannot be written (logged; sharing then goes unreported, nothing else changes).
    """
    folder = Path(f"{ledger_path}.servers")
    record: dict[str, Any] = {"pid": os.getpid(), "port": port, "host": socket.gethostname()}
    supervisor = supervisor_pid()
    if supervisor is not None:
        record["supervisor"] = supervisor
    tmp = folder / f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    fd = -1
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # before the record is visible: a scanner never sees it unlocked
        os.write(fd, json.dumps(record).encode("utf-8"))
        final = tmp.with_name(tmp.name[1:].removesuffix(".tmp") + ".json")
        os.rename(tmp, final)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        log.warning("ledger %s: cannot register this server in %s (%s); sharing goes unreported",
                    ledger_path, folder, exc.strerror or exc)  # fmt: skip
        return None
    out = ServerRecord(final, fd)
    peers = [p for p in out.peers() if not _sibling(p, record)]
    if peers:
        who = "; ".join(f"pid {p.get('pid', '?')}, port {p.get('port', '?')}" for p in peers)
        host = {str(p.get("host")) for p in peers} - {record["host"]}
        where = f" on {', '.join(sorted(host))}" if host else ""
        noun = "another server" if len(peers) == 1 else f"{len(peers)} other servers"
        log.warning("ledger %s is shared with %s (%s)%s", ledger_path, noun, who, where)
    return out
