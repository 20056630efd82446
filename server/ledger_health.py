"""Health follows the ledger: NOT_SERVING while it cannot commit, SERVING once it commits again.

A server whose ledger cannot commit (disk full, I/O error, read-only file) refuses every charge
with UNAVAILABLE; it tells load balancers so through the standard health service. The ledger
reports every write transaction's outcome (``SqliteLedger.add_commit_observer``); on the first
failure :class:`LedgerHealth` logs one line naming the file and the cause, sets every service
NOT_SERVING and probes the store (``check_writable``: a commit that changes nothing) every
``probe_seconds`` until a commit succeeds (a probe or a real write), then logs one line and sets
SERVING again. A ledger without these methods (the in-memory one) is always SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from grpc_health.v1 import health, health_pb2

from dprdm.ledger.api import Ledger, LedgerError, LedgerUnavailable

__all__ = ["LedgerHealth", "PROBE_SECONDS"]

log = logging.getLogger("dprdm.server")
PROBE_SECONDS = 1.0
"""How often a failing ledger is probed (one small commit each time)."""


class LedgerHealth:
    """Keeps the health servicer's status of ``names`` in step with the ledger's commits.

    Args:
        servicer: the gRPC health servicer.
        names: the service names to set ("" for the server as a whole, and each service).
        ledger: the ledger to follow.
        probe_seconds: how often to probe while the ledger cannot commit.
    """

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        names: Sequence[str],
        ledger: Ledger,
        *,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        self._servicer, self._names, self._ledger = servicer, tuple(names), ledger
        self.probe_seconds = probe_seconds
        self._lock = threading.Lock()
        self._failing: LedgerUnavailable | None = None  # updated on the committing thread, in commit order
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._apply_lock: asyncio.Lock | None = None
        self._probe: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._path = str(getattr(ledger, "path", "(in memory)"))

    @property
    def failing(self) -> bool:
        """Whether the ledger's last write transaction failed to commit."""
        return self._failing is not None

    async def start(self) -> None:
        """Follow the ledger and set the current status (SERVING unless a commit already failed)."""
        self._loop = asyncio.get_running_loop()
        self._apply_lock = asyncio.Lock()
        add: Callable[[Any], None] | None = getattr(self._ledger, "add_commit_observer", None)
        if add is not None:
            add(self.report)
        await self._apply()

    def report(self, error: LedgerUnavailable | None) -> None:
        """The ledger's report of one write transaction (any thread; quick when nothing changes)."""
        with self._lock:
            if self._closed or (error is None) == (self._failing is None):
                if error is not None:
                    self._failing = error
                return
            self._failing = error
            if error is not None:
                log.error("ledger %s cannot commit: %s; health NOT_SERVING until it commits again",
                          error.path, error.cause)  # fmt: skip
            else:
                log.warning("ledger %s commits again; health SERVING", self._path)
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._changed)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

    def _changed(self) -> None:
        task = asyncio.ensure_future(self._apply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.failing and (self._probe is None or self._probe.done()):
            self._probe = asyncio.ensure_future(self._probe_until_committed())

    async def _apply(self) -> None:
        """Set every name to the CURRENT status (so concurrent applications end in the latest)."""
        assert self._apply_lock is not None
        async with self._apply_lock:
            if self._closed:
                return
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if self.failing
                else health_pb2.HealthCheckResponse.SERVING
            )
            for name in self._names:
                await self._servicer.set(name, status)

    async def _probe_until_committed(self) -> None:
        check: Callable[[], None] | None = getattr(self._ledger, "check_writable", None)
        if check is None:
            return
        loop = asyncio.get_running_loop()
        while self.failing and not self._closed:
            await asyncio.sleep(self.probe_seconds)
            if self._closed:
                return
            try:
                await loop.run_in_executor(None, check)  # its outcome reaches report()
            except LedgerError:
                pass  # still failing (reported), or the ledger closed (the server is stopping)

    async def close(self) -> None:
        """Stop following the ledger (before the server sets NOT_SERVING and closes it)."""
        with self._lock:
            self._closed = True
        remove: Callable[[Any], None] | None = getattr(self._ledger, "remove_commit_observer", None)
        if remove is not None:
            remove(self.report)
        for task in [self._probe, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._probe, *self._tasks] if t is not None), return_exceptions=True
        )
