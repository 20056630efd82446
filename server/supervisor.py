"""``dprdm serve --workers N``: one supervisor, N server processes on one port (``[server] workers``).

Each worker is a complete ``dprdm serve`` process (its own gRPC server, service, noise pool and
ledger connection), started with ``subprocess`` (fork + exec of a fresh interpreter: nothing of
the supervisor's threads or gRPC state crosses, so gRPC's fork caveats do not apply). They bind
the same ``listen`` address with ``SO_REUSEPORT`` (``grpc.so_reuseport`` = 1 in
:func:`dprdm.server.app.start_server` when ``workers > 1``) and the kernel spreads new
connections over them. What they share:

* the indexes: each worker maps the vector file read-only (``dprdm.index.format.load``,
  ``mmap_mode="r"``), so the OS page cache holds ONE copy for all workers (format-1 indexes are
  padded into private memory at load: one copy per worker);
* the ledger: one SQLite file (``BEGIN IMMEDIATE`` serialises the writers of every process, so
  admission stays exact across workers, SPEC §6) or one PostgreSQL database (``[ledger] url``);
* the start-up caches in ``data_dir`` (verified checksums, RDP curves: atomic replaces).

The supervisor (this module):

* checks the configuration (the caller parsed it: a bad key is one line, exit status 2), then
  reserves the port: a probe bind WITHOUT ``SO_REUSEPORT`` fails if anyone else holds it (so two
  servers never silently share a port), then a socket bound WITH it is held, never listening,
  for the supervisor's life (a ``listen`` port 0 is chosen here, once, for every worker);
* starts worker 0 alone: its start-up is the full check (indexes, checksums, bundles, budgets
  against the ledger, TLS, noise pool); if it fails, its own one-line error is the output and
  the supervisor exits with status 2 without starting the others. Worker 0 also warms the
  checksum and curve caches and the page cache, so the other workers, started next in
  parallel, start faster. ``dprdm serve --check`` is not run first: it loads every model and
  re-hashes every index file, doubling the start-up time for no check the worker skips;
* prints ``dprdm: listening on port P`` once every worker is serving;
* kills a worker that is not serving ``worker_start_timeout`` seconds after its start (a start-up
  hung on a model file, a network mount or a stuck database): at start-up that ends the
  supervisor with a one-line error and exit status 2, later the worker is restarted as below;
* restarts a worker that exits (or is killed) with exponential backoff (:class:`Backoff`),
  logging each exit and restart; a worker that exits during start-up keeps being retried with
  the same backoff (e.g. a database that is down), the others keep serving;
* SIGTERM/SIGINT: forwards SIGTERM to every worker (each drains as ``dprdm serve`` does, within
  ``shutdown_grace``), waits for them, SIGKILLs a worker still alive ``shutdown_grace`` +
  ``CUT_SECONDS`` + :data:`STOP_MARGIN` seconds later, and exits 0; SIGHUP is forwarded (each
  worker reloads its tokens from the configuration file).

Metrics: one endpoint per worker (Prometheus scrapes each; counters are per process): with
``metrics_port`` P > 0 worker i serves on P + i; with P = 0 each picks a free port (in its
start-up log line). The supervisor itself serves no gRPC and no metrics.

Each worker gets the supervisor's pid in ``DPRDM_SUPERVISOR_PID`` (:mod:`dprdm.server.ledger_peers`:
workers of one supervisor do not log "ledger shared with another server" about each other).

Workers watch the supervisor (:func:`watch_parent`): if it dies (even by SIGKILL), they drain
and exit instead of holding the port as orphans. Their log lines carry ``worker=<i>``
(:func:`tag_worker_logs`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from .app import CUT_SECONDS
from .config import ServerConfig
from .errors import StartupError
from .ledger_peers import SUPERVISOR_ENV

__all__ = [
    "Backoff",
    "WorkerPlace",
    "Supervisor",
    "reserve_port",
    "watch_parent",
    "tag_worker_logs",
    "worker_metrics_port",
    "STOP_MARGIN",
    "READY_PREFIX",
]

log = logging.getLogger("dprdm.server.supervisor")

READY_PREFIX = "dprdm: listening on port "
"""The line a server prints on stdout once it serves (the supervisor's readiness signal)."""
STOP_MARGIN = 10.0
"""Seconds a worker gets after its drain (``shutdown_grace`` + ``CUT_SECONDS``) before SIGKILL."""


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker that exited: ``initial * factor**(n - 1)`` seconds for its
    n-th exit in a row, at most ``maximum``; a worker that served ``reset_after`` seconds before
    exiting starts again at ``initial``."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th exit in a row (>= 1)."""
        return float(min(self.maximum, self.initial * self.factor ** max(0, failures - 1)))


@dataclass(frozen=True)
class WorkerPlace:
    """Where worker ``index`` serves: ``listen`` (the supervisor's port) and its metrics port."""

    index: int
    listen: str
    metrics_port: int | None


def worker_metrics_port(base: int | None, index: int) -> int | None:
    """Worker ``index``'s metrics port: ``base + index`` (``base`` 0: 0, any free port; None: off)."""
    if base is None:
        return None
    return base + index if base > 0 else 0


def reserve_port(listen: str) -> tuple[socket.socket, int]:
    """Reserve ``listen`` (HOST:PORT, port 0: any free port) for a group of workers.

    A probe bind without ``SO_REUSEPORT`` first: it fails if any other socket holds the port
    (another server, also one of ``--workers``), so two servers never share a port by accident.
    Then a socket with ``SO_REUSEPORT`` only is bound (never listening: it takes no connections)
    and returned; while it is open, the workers (``SO_REUSEPORT``, same user) can bind the port
    and no server without ``SO_REUSEPORT`` (nor the probe of another supervisor) can. If
    connections of an earlier server without ``SO_REUSEPORT`` linger in TIME_WAIT on the port,
    the socket is bound with ``SO_REUSEADDR`` too (as gRPC binds), which such a probe passes.

    Returns:
        (the held socket, the port number).

    Raises:
        StartupError: ``server.listen: cannot bind HOST:PORT: <reason>``.
    """
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        if port != 0:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
        try:
            held = _bound(family, kind, proto, addr, reuse_addr=False)
        except OSError as exc:  # TIME_WAIT connections of an earlier server without SO_REUSEPORT
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            held = _bound(family, kind, proto, addr, reuse_addr=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"server.listen: cannot bind {listen}: {reason[:1].lower() + reason[1:]}") from None
    return held, int(held.getsockname()[1])


def _bound(family: int, kind: int, proto: int, addr: Any, *, reuse_addr: bool) -> socket.socket:
    """A socket bound to ``addr`` with ``SO_REUSEPORT`` (and ``SO_REUSEADDR`` if asked), not listening."""
    sock = socket.socket(family, kind, proto)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def watch_parent(parent_pid: int, *, period: float = 1.0) -> threading.Thread:
    """In a worker: when the supervisor ``parent_pid`` is gone (this process was re-parented),
    send this process SIGTERM, which drains it as ``dprdm serve`` drains on SIGTERM.

    Returns:
        The started daemon thread.
    """

    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period)
        log.error("the supervisor (pid %d) is gone: shutting this worker down", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="dprdm-watch-supervisor", daemon=True)
    thread.start()
    return thread


class _WorkerTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {"worker": self.index, **(fields if isinstance(fields, dict) else {})}
        return True


def tag_worker_logs(handler: logging.Handler, index: int) -> None:
    """Add ``worker=<index>`` to every record ``handler`` writes (text and JSON formats)."""
    handler.addFilter(_WorkerTag(index))


@dataclass
class _Slot:
    """One worker position: its current process and restart state."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready_at: float | None = None
    failures: int = 0
    restart_at: float | None = None
    port: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    """Run N worker processes of one configuration on one port (see the module docstring).

    Args:
        config: the validated configuration (``workers`` >= 1 processes are run).
        command: the argv of worker ``place.index`` (a ``dprdm serve`` that prints
            :data:`READY_PREFIX` + port on stdout once serving, with ``listen`` and the metrics
            port of ``place``, exit status 2 on a start-up error).
        backoff: the restart policy.
        out: where the ready line goes (default ``sys.stdout``).
        poll: seconds between checks of the workers.
    """

    def __init__(
        self,
        config: ServerConfig,
        command: Callable[[WorkerPlace], Sequence[str]],
        *,
        backoff: Backoff = Backoff(),
        out: IO[str] | None = None,
        poll: float = 0.05,
    ) -> None:
        self.config, self._command, self.backoff = config, command, backoff
        self._out = out
        self._poll = poll
        self._slots = [_Slot(i) for i in range(config.workers)]
        self._stop: int | None = None
        self._hup = False
        self.port = 0
        self._listen = config.listen

    # -- signals -------------------------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop = self._stop or signum  # handlers only set flags; the loop acts on them

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._hup = True

    def _forward_hup(self) -> None:
        if not self._hup:
            return
        self._hup = False
        live = self._live()
        log.info("received SIGHUP: forwarded to %d worker(s) (each reloads its tokens)", len(live))
        for slot in live:
            self._send(slot, signal.SIGHUP)

    # -- workers -------------------------------------------------------------------------------

    def _live(self) -> list[_Slot]:
        return [s for s in self._slots if s.proc is not None and s.proc.poll() is None]

    @staticmethod
    def _send(slot: _Slot, sig: signal.Signals) -> None:
        if slot.proc is not None and slot.proc.poll() is None:
            try:
                slot.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _start(self, slot: _Slot) -> None:
        place = WorkerPlace(
            slot.index,
            f"{self._listen.rpartition(':')[0]}:{self.port}",
            worker_metrics_port(self.config.metrics_port, slot.index),
        )
        slot.ready = threading.Event()
        slot.ready_at, slot.restart_at, slot.port = None, None, None
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}  # siblings do not warn of each other
        slot.proc = subprocess.Popen(
            list(self._command(place)), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        slot.started = time.monotonic()
        threading.Thread(
            target=self._read_stdout, args=(slot, slot.proc), name=f"dprdm-worker-{slot.index}-stdout", daemon=True
        ).start()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _read_stdout(self, slot: _Slot, proc: subprocess.Popen[bytes]) -> None:
        """Watch a worker's stdout for its ready line; pass anything else through."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith(READY_PREFIX) and slot.proc is proc:
                slot.port = int(line[len(READY_PREFIX) :].split()[0])
                slot.ready.set()
            else:
                out = self._out or sys.stdout
                out.write(line)
                out.flush()
        proc.stdout.close()

    @staticmethod
    def _how(code: int) -> str:
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"

    def _check_ready(self, slot: _Slot) -> None:
        if slot.ready_at is None and slot.ready.is_set():
            slot.ready_at = time.monotonic()
            if slot.port != self.port:  # never: the worker was told this port
                log.error("worker %d serves port %s, not %d: stopping it", slot.index, slot.port, self.port)
                self._send(slot, signal.SIGTERM)
            elif slot.failures:
                log.info("worker %d (pid %d) serving again", slot.index, slot.proc.pid if slot.proc else -1)

    def _start_overdue(self, slot: _Slot) -> bool:
        """Whether ``slot``'s worker is alive, not serving, and past ``worker_start_timeout``; if so it
        is SIGKILLed (logged) and reaped by the caller's next poll."""
        if slot.proc is None or slot.ready_at is not None or slot.proc.poll() is not None:
            return False
        if time.monotonic() - slot.started <= self.config.worker_start_timeout:
            return False
        log.error("worker %d (pid %d) is not serving %.0f s after its start (server.worker_start_timeout): "
                  "killing it", slot.index, slot.proc.pid, self.config.worker_start_timeout)  # fmt: skip
        self._send(slot, signal.SIGKILL)
        slot.proc.wait()
        return True

    def _reap(self, slot: _Slot) -> None:
        """A worker that exited (serving or starting): schedule its restart with backoff (logged)."""
        assert slot.proc is not None
        code = slot.proc.returncode
        served = 0.0 if slot.ready_at is None else time.monotonic() - slot.ready_at
        slot.failures = 1 if served >= self.backoff.reset_after else slot.failures + 1
        delay = self.backoff.delay(slot.failures)
        when = "during start-up" if slot.ready_at is None else f"after serving {served:.1f} s"
        log.warning("worker %d (pid %d) %s %s; restarting it in %.1f s (exit %d in a row)",
                    slot.index, slot.proc.pid, self._how(code), when, delay, slot.failures)  # fmt: skip
        slot.proc, slot.restart_at = None, time.monotonic() + delay

    # -- life ----------------------------------------------------------------------------------

    def _wait_started(self, slots: list[_Slot]) -> int | None:
        """Wait until every slot serves. Returns None, or the exit status if one failed or a stop came."""
        while True:
            self._forward_hup()
            if self._stop is not None:
                return 0
            for slot in slots:
                self._check_ready(slot)
                if self._start_overdue(slot):
                    print(f"dprdm: error: worker {slot.index} was not serving {self.config.worker_start_timeout:g} s "
                          "after its start (server.worker_start_timeout); it was killed", file=sys.stderr, flush=True)
                    return 2
                if slot.proc is not None and slot.proc.poll() is not None and slot.ready_at is None:
                    code = slot.proc.returncode
                    if code != 2:  # status 2: the worker printed its one-line start-up error itself
                        print(f"dprdm: error: worker {slot.index} {self._how(code)} before it was serving",
                              file=sys.stderr, flush=True)  # fmt: skip
                    return 2
            if all(s.ready_at is not None for s in slots):
                return None
            time.sleep(self._poll)

    def _serve_loop(self) -> None:
        while self._stop is None:
            self._forward_hup()
            now = time.monotonic()
            for slot in self._slots:
                if slot.proc is None:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._start(slot)
                    continue
                self._check_ready(slot)
                self._start_overdue(slot)  # killed: reaped and restarted with backoff just below
                if slot.proc.poll() is not None:
                    self._reap(slot)
            time.sleep(self._poll)

    def _shutdown(self) -> None:
        """SIGTERM every worker, wait for the drains, SIGKILL any worker still alive after the bound."""
        live = self._live()
        if self._stop is not None:
            log.info("received %s: stopping %d worker(s)", signal.Signals(self._stop).name, len(live))
        for slot in live:
            self._send(slot, signal.SIGTERM)
        bound = self.config.shutdown_grace + CUT_SECONDS + STOP_MARGIN
        deadline = time.monotonic() + bound
        while self._live() and time.monotonic() < deadline:
            time.sleep(self._poll)
        for slot in self._live():
            log.error("worker %d (pid %d) did not stop within %.0f s: killing it", slot.index,
                      slot.proc.pid if slot.proc else -1, bound)  # fmt: skip
            self._send(slot, signal.SIGKILL)
        for slot in self._slots:
            if slot.proc is not None:
                slot.proc.wait()
                failed_start = slot.ready_at is None and slot.proc.returncode == 2  # it said why itself
                if slot.proc.returncode not in (0, -signal.SIGTERM) and not failed_start:
                    log.warning("worker %d (pid %d) %s", slot.index, slot.proc.pid, self._how(slot.proc.returncode))

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT. Must run in the main thread (it installs signal handlers).

        Returns:
            0 after a stop, 2 when a worker failed to start (its error was printed).

        Raises:
            StartupError: the port cannot be reserved (one line naming ``server.listen``).
        """
        held, self.port = reserve_port(self._listen)
        old = {sig: signal.signal(sig, self._on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self._start(self._slots[0])  # the full start-up check, once, before the others
            status = self._wait_started(self._slots[:1])
            if status is None:
                for slot in self._slots[1:]:
                    self._start(slot)
                status = self._wait_started(self._slots)
            if status is None:
                log.info("%d workers serving on port %d (pids %s)", len(self._slots), self.port,
                         ", ".join(str(s.proc.pid) for s in self._slots if s.proc))  # fmt: skip
                out = self._out or sys.stdout
                out.write(f"{READY_PREFIX}{self.port}\n")
                out.flush()
                self._serve_loop()
                status = 0
            self._shutdown()
            if status == 0:
                log.info("all workers stopped")
            return status
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            held.close()
