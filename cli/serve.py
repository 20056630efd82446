"""``dprdm serve``: run the gRPC server from a TOML configuration (see :mod:`dprdm.server.config`)."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dprdm.server.config import ConfigError, ServerConfig, load_config
from dprdm.server.errors import StartupError

from .args import CliError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve`` sub-command."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC server",
        description="Serve private indexes over gRPC with a durable privacy ledger.",
    )
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--listen", help="HOST:PORT to bind (overrides server.listen)")
    p.add_argument("--data-dir", help="directory of the ledger (overrides server.data_dir)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (overrides server.metrics_port)")
    p.add_argument(
        "--no-reuse", action="store_true", help="never answer from a stored release of the same input"
    )
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ServerConfig:
    try:
        cfg = load_config(args.config)
        return cfg.with_overrides(
            listen=args.listen,
            data_dir=args.data_dir,
            metrics_port=args.metrics_port,
            reuse_releases=False if args.no_reuse else None,
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the exit status."""
    cfg = _config(args)
    if args.check:
        print(f"configuration OK: {len(cfg.indexes)} index(es), {len(cfg.tokens)} token(s)")
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dprdm.ledger.api import LedgerError
    from dprdm.server.app import serve  # grpc is imported only when serving

    try:
        asyncio.run(serve(cfg))
    except (StartupError, LedgerError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return 0
