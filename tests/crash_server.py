"""The crash test's server "zygote": forks a fresh server per ``start`` line on stdin.

Run by ``tests/test_server_crash.py`` as ``python tests/crash_server.py --config server.toml``.
It imports everything and builds the configuration's catalog once (warming the per-profile RDP
cache) before forking, so a restart after a SIGKILL takes ~0.1 s. Each child serves the
configuration with the fake loaders of :mod:`dprdm.server.testing` and the real SQLite ledger.

Protocol: for each ``start`` line it prints ``pid N``; the child then prints
``dprdm: listening on port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from dprdm.ledger import MemoryLedger
from dprdm.server.app import serve
from dprdm.server.catalog import build_catalog
from dprdm.server.config import ServerConfig, load_config
from dprdm.server.testing import fake_loaders


def _reap() -> None:
    """Collect the children that have exited (killed servers)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def zygote(config: ServerConfig) -> None:
    """Fork a server per ``start`` line on stdin until stdin closes."""
    build_catalog(config, MemoryLedger(), fake_loaders())  # warm caches before forking
    for line in sys.stdin:
        _reap()
        if line.strip() != "start":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(serve(config, loaders=fake_loaders()))
            finally:
                os._exit(0)
        print(f"pid {pid}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crash_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="server TOML (fake index paths and bundles)")
    zygote(load_config(parser.parse_args(argv).config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
