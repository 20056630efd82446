"""App wiring: ledger, catalog, services, interceptors, health, reflection, TLS, metrics.

:func:`start_server` builds and starts a ``grpc.aio`` server from a :class:`ServerConfig`;
:func:`serve` runs one until SIGINT/SIGTERM. This module is the only place that creates the
production DP generator factory (through :class:`~dprdm.server.service.DprdmService`'s default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dprdm.ledger.api import Ledger, LedgerError
from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc

from .access import AccessInterceptor
from .admin import AdminService
from .auth import Authenticator, AuthInterceptor
from .catalog import Catalog, Loaders, build_catalog
from .config import ConfigError, ServerConfig
from .errors import StartupError
from .ledger_health import LedgerHealth
from .ledger_peers import ServerRecord, register_server
from .logs import event, startup_fields
from .metrics import Metrics
from .service import DprdmService, ServiceOptions
from .servicer import AdminServicer, DprdmServicer

__all__ = [
    "RunningServer",
    "start_server",
    "serve",
    "check_server",
    "open_ledger",
    "default_loaders",
    "SERVICE_NAMES",
    "CUT_SECONDS",
]

log = logging.getLogger("dprdm.server")
SERVICE_NAMES = (
    dprdm_pb2.DESCRIPTOR.services_by_name["Dprdm"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)
CUT_SECONDS = 2.0
"""After the drain's grace: how long cut calls (and any other call) get to send their status
before gRPC cancels what is left."""


def open_ledger(config: ServerConfig) -> Ledger:
    """The configured durable ledger (``dprdm.ledger.open_ledger``): ``[ledger] url`` (PostgreSQL
    or a SQLite file), else the default, SQLite in ``data_dir/ledger.sqlite3``."""
    from dprdm.ledger import open_ledger as open_store  # imported late so fakes need no store

    if config.ledger.url is not None:
        return open_store(config.ledger.url, group_commit=config.group_commit)
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return open_store(data_dir / "ledger.sqlite3", group_commit=config.group_commit)


def _ledger_place(config: ServerConfig) -> tuple[str, str, Path | None]:
    """(TOML key, the ledger as named in messages, its SQLite file or None for PostgreSQL)."""
    from dprdm.ledger import parse_ledger_url, redact_url

    if config.ledger.url is None:
        path = Path(config.data_dir) / "ledger.sqlite3"
        return "server.data_dir", str(path), path
    kind, where = parse_ledger_url(config.ledger.url)
    return "ledger.url", redact_url(config.ledger.url), (Path(where) if kind == "sqlite" else None)


def default_loaders(checksum_cache: str | None = None, *, background: bool = False) -> Loaders:
    """Loaders backed by ``dprdm.index.load`` and ``dprdm.models.registry.load_bundle``.

    ``checksum_cache``: a directory (the server's data dir) where verified data-file checksums are
    kept, so a restart re-hashes only files whose stat changed (:mod:`dprdm.index.checksum_cache`);
    None re-hashes every file (``serve --check`` and ``dprdm index verify`` always do).

    ``background``: load each bundle's generator on a background thread after the encoder
    (:func:`dprdm.server.adapters.load_bundle`); ``serve`` does, ``serve --check`` loads everything now.
    """
    from .adapters import load_bundle, load_index

    def index(path: str) -> Any:
        return load_index(path, checksum_cache=checksum_cache)

    def bundle(name: str) -> Any:
        return load_bundle(name, background=background)

    return Loaders(index=index, bundle=bundle)


@dataclass
class RunningServer:
    """A started server and what it owns."""

    server: grpc.aio.Server
    port: int
    service: DprdmService
    ledger: Ledger
    catalog: Catalog
    metrics: Metrics
    health: health.aio.HealthServicer
    metrics_port: int | None = None
    authenticator: Authenticator | None = None
    ledger_health: LedgerHealth | None = None
    record: ServerRecord | None = None
    admin: AdminService | None = None

    async def stop(self, grace: float | None = 1.0) -> None:
        """Drain: refuse new calls, let admitted ones finish within ``grace`` seconds, cut the rest.

        Health turns NOT_SERVING and the gRPC server refuses new calls at once. A Retrieve or
        Generate still running when ``grace`` expires is cut with ``UNAVAILABLE``/
        ``SHUTTING_DOWN`` naming its request id (one log line each); its query still runs to
        completion in the pool, so a charged one stores its release before the ledger closes
        and a retry with that id returns it. Other calls get :data:`CUT_SECONDS` more.
        """
        grace = max(0.0, grace or 0.0)
        log.info("shutting down: draining %d call(s) (grace %g s)", self.service.admitted, grace)
        if self.ledger_health is not None:  # a late commit must not set SERVING again
            await self.ledger_health.close()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.begin_drain()
        stopping = asyncio.ensure_future(self.server.stop(grace + CUT_SECONDS))
        if not await self.service.drain(grace):
            log.warning("shutting down: grace of %g s expired; cutting %d call(s)", grace, self.service.admitted)
            self.service.cut()
        await stopping
        await asyncio.to_thread(self.service.close)  # charged queries finish and store their release
        if self.admin is not None:
            await asyncio.to_thread(self.admin.close)
        await asyncio.to_thread(self.metrics.close)  # the exporter's port is released with the server
        self.ledger.close()
        if self.record is not None:
            self.record.close()
        log.info("stopped")


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if tls is None:
        return None
    try:
        key, cert = Path(tls.key).read_bytes(), Path(tls.cert).read_bytes()
        ca = Path(tls.client_ca).read_bytes() if tls.client_ca else None
    except OSError as exc:
        raise StartupError(f"tls: cannot read {exc.filename!r}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def start_server(
    config: ServerConfig, *, ledger: Ledger | None = None, loaders: Loaders | None = None
) -> RunningServer:
    """Build, check and start a server (the port in ``config.listen`` may be 0).

    Raises:
        StartupError: an index, bundle, budget, token or TLS problem (named).
    """
    if not config.tokens:
        raise StartupError("tokens: no token is configured; every call would be refused")
    ledger = ledger if ledger is not None else _open_ledger_or_say_why(config)
    try:
        catalog = build_catalog(config, ledger, loaders or default_loaders(checksum_cache=config.data_dir, background=True))
    except BaseException:
        ledger.close()
        raise
    metrics = Metrics()
    options = ServiceOptions(
        limits=config.limits,
        reuse_releases=config.reuse_releases,
        query_threads=config.query_threads,
        generation_workers=config.generation_workers,
        generation_queue=config.generation_queue,
        min_deadline_seconds=config.min_deadline_seconds,
        fixed_response_seconds=config.fixed_response_seconds,
        noise_pool_size=config.noise_pool_size,
        noise_pool_threads=config.noise_pool_threads,
    )
    try:  # the noise pool fills before serving and may refuse a profile's sigma (StartupError)
        service = DprdmService(catalog, ledger, options, metrics=metrics)
    except BaseException:
        ledger.close()
        raise
    admin = AdminService(catalog, ledger)  # its own threads: answered while every query thread is busy
    for domain in catalog.budgets:
        metrics.budget_state(ledger.budget_state(domain))
    authenticator = Authenticator(config.tokens)
    interceptor = AuthInterceptor(authenticator, on_reject=lambda m, c: metrics.request(m, c.name))
    server = grpc.aio.server(
        interceptors=[interceptor, AccessInterceptor(metrics)],  # auth first: it refuses before decoding
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),  # workers share the port (supervisor)
        ],
    )
    dprdm_pb2_grpc.add_DprdmServicer_to_server(DprdmServicer(service, metrics), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(admin, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port, metrics_port = await _bind_and_start(config, server, metrics)
    except BaseException:
        await server.stop(None)
        service.close()
        admin.close()
        ledger.close()
        raise
    ledger_health = LedgerHealth(health_servicer, ("", *SERVICE_NAMES), ledger)
    await ledger_health.start()  # SERVING; NOT_SERVING while the ledger cannot commit
    for served in catalog.indexes.values():  # generators load once SERVING (Generate says so till then)
        start_loading = getattr(served.bundle.generator, "start", None)
        if start_loading is not None:
            start_loading()
    ledger_path = getattr(ledger, "path", None)  # a shared ledger file is logged (one line)
    record = register_server(ledger_path, port) if isinstance(ledger_path, Path) else None
    event(log, logging.INFO, f"serving {len(catalog.indexes)} index(es) on port {port}",
          **startup_fields(config, catalog, ledger, port, metrics_port))  # fmt: skip
    return RunningServer(
        server, port, service, ledger, catalog, metrics, health_servicer, metrics_port, authenticator,
        ledger_health=ledger_health, record=record, admin=admin,
    )  # fmt: skip


def check_server(config: ServerConfig, *, loaders: Loaders | None = None) -> list[str]:
    """``dprdm serve --check``: what :func:`start_server` checks before it binds, binding nothing.

    Opens every index with the real loaders (manifest and checksums), resolves every bundle, reads
    the TLS files and checks every domain's budget against a throw-away copy of the ledger (the
    ledger file is only read; a budget the configuration would create is created in the copy).

    Returns:
        One line per thing checked.

    Raises:
        StartupError: the first problem, named as ``serve`` would name it.
    """
    if not config.tokens:
        raise StartupError("tokens: no token is configured; every call would be refused")
    _credentials(config)
    with tempfile.TemporaryDirectory(prefix="dprdm-check-") as tmp:
        ledger, ledger_line = _ledger_copy(config, Path(tmp))
        try:
            catalog = build_catalog(config, ledger, loaders or default_loaders(background=False))
        finally:
            ledger.close()
    lines = [
        f"index {s.name}: {s.config.path} (domain {s.domain}, version {s.index.version}, "
        f"dimension {s.index.dimension}, bundle {s.bundle.name}, profiles {', '.join(s.profiles)})"
        for s in catalog.indexes.values()
    ]
    lines += [f"budget {d}: epsilon {b.epsilon:g} at delta {b.delta:g}" for d, b in sorted(catalog.budgets.items())]
    lines.append(ledger_line)
    lines.append(f"tls: {'mTLS' if config.tls and config.tls.client_ca else 'on' if config.tls else 'off'}")
    lines.append(f"tokens: {len(config.tokens)}")
    return lines


def _ledger_copy(config: ServerConfig, tmp: Path) -> tuple[Ledger, str]:
    """A throw-away copy of the ledger (read through SQLite's backup API; PostgreSQL: its budgets
    copied into an in-memory ledger, the database only read), or an empty in-memory ledger if
    there is none yet; and a line saying which."""
    from dprdm.ledger import MemoryLedger, SqliteLedger

    key, name, path = _ledger_place(config)
    if path is None:
        return _postgres_copy(config, name)
    if not path.exists():
        parent = next(p for p in path.resolve().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            why = "not a directory" if not parent.is_dir() else "not writable"
            raise StartupError(f"{key}: cannot create the ledger {path}: {parent} is {why}")
        return MemoryLedger(), f"ledger: {path} (new: the configured budgets will be created)"
    copy = tmp / "ledger.sqlite3"
    # Without a WAL file (no server has it open) the file is read as immutable, which creates no
    # -wal/-shm beside it; with one (a running server) SQLite's read-only mode joins its WAL.
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    try:
        src, dst = sqlite3.connect(uri, uri=True), sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        ledger = SqliteLedger(copy, group_commit=False)
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"{key}: cannot read the ledger {path}: {exc}") from None
    except LedgerError as exc:
        raise StartupError(f"{key}: the ledger {path}: {exc}") from None
    return ledger, f"ledger: {path} ({len(ledger.domains())} domain(s))"


def _postgres_copy(config: ServerConfig, name: str) -> tuple[Ledger, str]:
    """``serve --check`` on PostgreSQL: the schema checked and the budgets (with their quotas) read
    into an in-memory ledger; nothing is written to the database (an empty one is not created)."""
    from dprdm.ledger import MemoryLedger
    from dprdm.ledger.factory import open_ledger as open_store

    assert config.ledger.url is not None
    copy = MemoryLedger()
    try:
        source = open_store(config.ledger.url, group_commit=False, create=False)
    except LedgerError as exc:
        if getattr(exc, "empty", False):  # no tables yet: `serve` would create them
            return copy, f"ledger: {name} (new: the tables and the configured budgets will be created)"
        raise StartupError(f"ledger.url: cannot open the ledger {name}: {exc}") from None
    try:
        for domain in source.domains():
            quotas = {t: q for t, (q, _spent) in source.tenant_quotas(domain).items()}
            copy.create_budget(domain, source.budget_state(domain).budget, tenant_quotas=quotas)
    except LedgerError as exc:
        raise StartupError(f"ledger.url: cannot read the ledger {name}: {exc}") from None
    finally:
        source.close()
    return copy, f"ledger: {name} ({len(copy.domains())} domain(s))"


def _open_ledger_or_say_why(config: ServerConfig) -> Ledger:
    """:func:`open_ledger`, its OS, SQLite or database failure turned into one line naming the
    ledger (a PostgreSQL URL without its password).

    Raises:
        StartupError: e.g. ``server.data_dir: cannot open the ledger /srv/x/ledger.sqlite3: ...``
            or ``ledger.url: cannot open the ledger postgresql://dprdm@db/dprdm: ...``.
    """
    from dprdm.ledger import LedgerUnavailable

    key, name, path = _ledger_place(config)
    try:
        return open_ledger(config)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else name
        raise StartupError(f"{key}: cannot open the ledger {where}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        reason = _sqlite_reason(path, exc) if path is not None else str(exc)
        raise StartupError(f"{key}: cannot open the ledger {name}: {reason}") from None
    except LedgerUnavailable as exc:
        raise StartupError(f"{key}: cannot open the ledger {name}: {exc.cause}") from None
    except ValueError as exc:  # a URL the database driver refuses
        raise StartupError(f"{key}: {exc}") from None


def _sqlite_reason(path: Path, exc: sqlite3.Error) -> str:
    """SQLite's message, with the OS reason when a probe of the file or directory finds one."""
    try:
        if path.exists():
            os.close(os.open(path, os.O_RDWR))
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            return f"{exc} (directory {path.parent} is not writable)"
    except OSError as err:
        return f"{exc} ({err.strerror})"
    return str(exc)


async def _bind_and_start(config: ServerConfig, server: grpc.aio.Server, metrics: Metrics) -> tuple[int, int | None]:
    """Bind the gRPC port and the metrics port, then start serving; returns both ports.

    Raises:
        StartupError: naming the address that cannot be bound (or the unreadable TLS file).
    """
    creds = _credentials(config)
    reason = _bind_reason(config.listen, reuse_port=config.workers > 1)  # gRPC's own failure is many lines
    if reason is None:
        try:
            port = server.add_secure_port(config.listen, creds) if creds else server.add_insecure_port(config.listen)
        except RuntimeError:  # recent grpc raises instead of returning 0
            port = 0
        reason = "gRPC refused the address" if port == 0 else None
    if reason is not None:
        raise StartupError(f"server.listen: cannot bind {config.listen}: {reason}")
    metrics_port = None
    if config.metrics_port is not None:
        address = f"{config.metrics_host}:{config.metrics_port}"
        try:
            metrics_port = metrics.serve(config.metrics_port, config.metrics_host)
        except OSError as exc:
            raise StartupError(f"server.metrics_port: cannot bind {address}: {_os_reason(exc)}") from None
    await server.start()
    return port, metrics_port


def _os_reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _bind_reason(listen: str, *, reuse_port: bool = False) -> str | None:
    """Why ``listen`` cannot be bound (None: it can), from a probe bind with gRPC's socket options
    (``SO_REUSEADDR``; ``SO_REUSEPORT`` only for a worker of ``[server] workers > 1``, whose
    siblings and supervisor hold the port): gRPC's own failure says it in many lines, not why."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return None
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(addr)
    except OSError as exc:
        return _os_reason(exc)
    return None


async def serve(
    config: ServerConfig,
    *,
    ledger: Ledger | None = None,
    loaders: Loaders | None = None,
    ready: asyncio.Event | None = None,
    reload_config: Callable[[], ServerConfig] | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM, then drain it (:meth:`RunningServer.stop`) within
    ``config.shutdown_grace``.

    SIGHUP reloads the ``[[tokens]]`` from ``reload_config()`` (the configuration file read
    again); a bad file keeps the current tokens (one log line). Without ``reload_config`` SIGHUP
    is ignored with a log line.
    """
    running = await start_server(config, ledger=ledger, loaders=loaders)
    print(f"dprdm: listening on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_stop, stop, sig)
    loop.add_signal_handler(signal.SIGHUP, _reload_tokens, running, config, reload_config)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    await running.stop(grace=config.shutdown_grace)


def _on_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("received %s", sig.name)
    stop.set()


def _reload_tokens(
    running: RunningServer, current: ServerConfig, reload_config: Callable[[], ServerConfig] | None
) -> None:
    """SIGHUP: swap in the configuration file's token list; on any error keep the current one."""
    if reload_config is None or running.authenticator is None:
        log.warning("received SIGHUP: ignored (no configuration file to reload tokens from)")
        return
    try:
        fresh = reload_config()
        running.authenticator.replace(fresh.tokens)
    except (ConfigError, ValueError) as exc:
        log.error("received SIGHUP: tokens not reloaded, keeping the %d current one(s): %s",
                  len(running.authenticator), exc)
        return
    log.info("received SIGHUP: reloaded %d token(s)", len(fresh.tokens))
    if replace(fresh, tokens=current.tokens) != current:
        log.warning("received SIGHUP: only [[tokens]] are reloaded; other changes need a restart")
