"""``dprdm serve``: run the gRPC server from a TOML configuration (see :mod:`dprdm.server.config`).

``--workers N`` (or ``[server] workers``) > 1 runs a supervisor (:mod:`dprdm.server.supervisor`)
that starts N worker processes on one port; each worker is this command again, started the way
this process was (:func:`worker_command`), ``serve`` with the hidden ``--worker-of`` flags,
serving as a single ``dprdm serve`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dprdm.server.config import ConfigError, ServerConfig, load_config
from dprdm.server.errors import StartupError

from .args import CliError, int_at_least, positive_int

if TYPE_CHECKING:
    from dprdm.server.supervisor import WorkerPlace

__all__ = ["register", "run", "worker_command"]


def worker_command() -> list[str]:
    """How a supervisor runs ``dprdm`` again for its workers: the script this process was started
    as (the ``dprdm`` entry point, or a wrapper such as the tests' fake-loader runner), else
    ``python -m dprdm``."""
    script = sys.argv[0] if sys.argv else ""
    if script and os.path.isfile(script) and os.path.basename(script) != "__main__.py":
        return [sys.executable, os.path.abspath(script)]
    return [sys.executable, "-m", "dprdm"]


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
    p.add_argument(
        "--workers",
        type=positive_int("--workers"),
        help="server processes on one port (overrides server.workers; default 1: this process serves)",
    )
    p.add_argument("--worker-of", type=int_at_least("--worker-of", 1), help=argparse.SUPPRESS)  # supervisor pid
    p.add_argument("--worker-index", type=int_at_least("--worker-index", 0), default=0, help=argparse.SUPPRESS)
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

    handler = setup_logging(args.log_level, args.log_format or cfg.log_format)

    if args.check:
        try:
            lines = app.check_server(cfg)
        except (StartupError, LedgerError) as exc:
            raise CliError(str(exc)) from None
        print("\n".join(lines))
        print(f"configuration OK: {len(cfg.indexes)} index(es), {len(cfg.tokens)} token(s) (no port bound)")
        return 0
    if args.worker_of is not None:  # one of a supervisor's workers: serve as below, tagged, watching it
        from dprdm.server.supervisor import tag_worker_logs, watch_parent

        tag_worker_logs(handler, args.worker_index)
        watch_parent(args.worker_of)
    elif cfg.workers > 1:
        return _supervise(args, cfg)
    try:
        asyncio.run(app.serve(cfg, reload_config=lambda: _reload(args)))
    except (StartupError, LedgerError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return 0


def _supervise(args: argparse.Namespace, cfg: ServerConfig) -> int:
    """Run ``cfg.workers`` worker processes under a supervisor until SIGTERM/SIGINT."""
    from dprdm.server.supervisor import Supervisor

    def command(place: WorkerPlace) -> Sequence[str]:
        return _worker_argv(args, cfg, place)

    try:
        return int(Supervisor(cfg, command).run())
    except StartupError as exc:
        raise CliError(str(exc)) from None


def _worker_argv(args: argparse.Namespace, cfg: ServerConfig, place: WorkerPlace) -> list[str]:
    """The command line of one worker: this command's flags, the supervisor's port and the worker's
    metrics port, ``--worker-of`` this process."""
    argv = [*worker_command(), "serve", "--config", os.path.abspath(args.config), "--listen", place.listen,
            "--workers", str(cfg.workers), "--worker-of", str(os.getpid()), "--worker-index", str(place.index),
            "--log-level", args.log_level]  # fmt: skip
    if args.log_format:
        argv += ["--log-format", args.log_format]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.no_reuse:
        argv.append("--no-reuse")
    if place.metrics_port is not None:
        argv += ["--metrics-port", str(place.metrics_port)]
    return argv


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
        workers=args.workers,
    )
