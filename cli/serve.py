"""``dprdm serve``: run the gRPC server from a TOML configuration (see :mod:`dprdm.server.config`)."""

from __future__ import annotations

import argparse
import asyncio

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
    p.add_argument(
        "--check",
        action="store_true",
        help="open every index (manifest, checksums), resolve every bundle, check budgets against a copy "
        "of the ledger; bind no port",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=["text", "json"], help="text or JSON lines (overrides server.log_format)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ServerConfig:
    try:
        return _reload(args)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (``--check``: check and exit). Returns the exit status."""
    cfg = _config(args)
    from dprdm.ledger.api import LedgerError
    from dprdm.server import app  # grpc is imported only when serving or checking
    from dprdm.server.logs import setup_logging  # also keeps model-loading progress bars out of the logs

    setup_logging(args.log_level, args.log_format or cfg.log_format)

    if args.check:
        try:
            lines = app.check_server(cfg)
        except (StartupError, LedgerError) as exc:
            raise CliError(str(exc)) from None
        print("\n".join(lines))
        print(f"configuration OK: {len(cfg.indexes)} index(es), {len(cfg.tokens)} token(s) (no port bound)")
        return 0
    try:
        asyncio.run(app.serve(cfg, reload_config=lambda: _reload(args)))
    except (StartupError, LedgerError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return 0


def _reload(args: argparse.Namespace) -> ServerConfig:
    """The configuration file read again with the same overrides (SIGHUP).

    Raises:
        ConfigError: naming the bad key.
    """
    return load_config(args.config).with_overrides(
        listen=args.listen,
        data_dir=args.data_dir,
        metrics_port=args.metrics_port,
        reuse_releases=False if args.no_reuse else None,
    )
