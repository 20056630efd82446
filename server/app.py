"""App wiring: ledger, catalog, services, interceptors, health, reflection, TLS, metrics.

:func:`start_server` builds and starts a ``grpc.aio`` server from a :class:`ServerConfig`;
:func:`serve` runs one until SIGINT/SIGTERM. This module is the only place that creates the
production DP generator factory (through :class:`~dprdm.server.service.DprdmService`'s default).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dprdm.ledger.api import Ledger
from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc

from .admin import AdminService
from .auth import Authenticator, AuthInterceptor
from .catalog import Catalog, Loaders, build_catalog
from .config import ServerConfig
from .errors import StartupError
from .metrics import Metrics
from .service import DprdmService, ServiceOptions
from .servicer import AdminServicer, DprdmServicer

__all__ = ["RunningServer", "start_server", "serve", "open_ledger", "default_loaders", "SERVICE_NAMES"]

log = logging.getLogger("dprdm.server")
SERVICE_NAMES = (
    dprdm_pb2.DESCRIPTOR.services_by_name["Dprdm"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


def open_ledger(config: ServerConfig) -> Ledger:
    """The default durable ledger: SQLite in ``data_dir/ledger.sqlite3``."""
    from dprdm.ledger import SqliteLedger  # the store module; imported late so fakes need no SQLite file

    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteLedger(data_dir / "ledger.sqlite3", group_commit=config.group_commit)


def default_loaders() -> Loaders:
    """Loaders backed by ``dprdm.index.load`` and ``dprdm.models.registry.load_bundle``."""
    from .adapters import load_bundle, load_index

    return Loaders(index=load_index, bundle=load_bundle)


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

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish within ``grace``, close the ledger."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.service.close()
        self.ledger.close()


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
    ledger = ledger if ledger is not None else open_ledger(config)
    try:
        catalog = build_catalog(config, ledger, loaders or default_loaders())
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
    admin = AdminService(catalog, ledger, service._pool)
    for domain in catalog.budgets:
        metrics.budget_state(ledger.budget_state(domain))
    interceptor = AuthInterceptor(
        Authenticator(config.tokens), on_reject=lambda m, c: metrics.request(m, c.name)
    )
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    dprdm_pb2_grpc.add_DprdmServicer_to_server(DprdmServicer(service, metrics), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(admin, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    creds = _credentials(config)
    port = server.add_secure_port(config.listen, creds) if creds else server.add_insecure_port(config.listen)
    if port == 0:
        raise StartupError(f"server.listen: cannot bind {config.listen!r}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = metrics.serve(config.metrics_port, config.metrics_host)
    log.info("serving %d index(es) on port %d", len(catalog.indexes), port)
    return RunningServer(server, port, service, ledger, catalog, metrics, health_servicer, metrics_port)


async def serve(
    config: ServerConfig,
    *,
    ledger: Ledger | None = None,
    loaders: Loaders | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a server until SIGINT or SIGTERM, then stop gracefully."""
    running = await start_server(config, ledger=ledger, loaders=loaders)
    print(f"dprdm: listening on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    await running.stop(grace=5.0)
