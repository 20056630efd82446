"""``dprdm serve-shard``: serve ONE shard of a shard set to the coordinator (INTERNAL service).

The coordinator is a ``dprdm serve`` whose index lists this server in ``shards``; tenants never
call it (see :mod:`dprdm.server.shard_service` for the token, TLS and what leaves the shard)::

    DPRDM_SHARD_TOKEN=... dprdm serve-shard /srv/faces-set/shard-0001 --listen 10.0.0.6:50061 \\
        --token-env DPRDM_SHARD_TOKEN --tls-cert shard.pem --tls-key shard.key --client-ca ca.pem
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from .args import CliError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``serve-shard`` sub-command."""
    p = subparsers.add_parser(
        "serve-shard",
        help="serve one shard of a shard set to the main server (internal; never to tenants)",
        description="Serve one shard (a directory of `dprdm index split`) over the internal shard service. "
        "Bind an operator-only address: it accepts only its own token (--token-env), never a tenant's.",
    )
    p.add_argument("shard", type=Path, help="the shard directory (e.g. SET/shard-0001)")
    p.add_argument("--listen", required=True, help="HOST:PORT to bind (an operator-only network)")
    p.add_argument("--token-env", required=True, help="environment variable holding the shard token (>= 16 chars)")
    p.add_argument("--tls-cert", help="PEM certificate chain (TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--client-ca", help="PEM CA bundle: callers must present a certificate it signed (mTLS)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every data file at start (default: only files whose stat changed since the "
                        "verified-at-build stamp in the shard directory)")
    p.add_argument("--threads", type=int, default=4, help="concurrent searches (default 4)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the shard, serve it until SIGINT/SIGTERM. Returns the exit status."""
    from dprdm.index.errors import IndexFormatError
    from dprdm.index.format import load
    from dprdm.server.config import hash_token
    from dprdm.server.shard_service import ShardSearcher, ShardServerOptions, start_shard_server

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(args.token_env, "")
    if len(token) < 16:
        raise CliError(f"--token-env: environment variable {args.token_env} must hold a token of at least 16 characters")
    if args.threads < 1:
        raise CliError(f"--threads must be >= 1; found {args.threads}")
    try:
        index = load(args.shard, checksum_cache=None if args.verify else args.shard)
        searcher = ShardSearcher(index)
        options = ShardServerOptions(listen=args.listen, token_sha256=hash_token(token), tls_cert=args.tls_cert,
                                     tls_key=args.tls_key, client_ca=args.client_ca, threads=args.threads)
        server, port = start_shard_server(searcher, options)
    except (IndexFormatError, ValueError) as exc:
        raise CliError(str(exc)) from None
    about = searcher.describe()
    print(f"dprdm: shard {about['shard_number']} of {about['shard_count']} of corpus {about['corpus_id']!r} "
          f"listening on port {port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5.0).wait()
    return 0
