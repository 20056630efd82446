"""The INTERNAL shard service (``dprdm serve-shard``): one shard of a shard set, searched for the
coordinator (``dprdm serve``), which merges every shard's answer (:mod:`dprdm.index.sharded`).

Who may call it: only the coordinator. The service listens on its own port (bind it to an
operator-only network, never the tenants' address), requires its own bearer token on every call
(``authorization: Bearer <token>``; the coordinator's configuration refuses a shard token equal
to any tenant or admin token, so no tenant token is ever accepted here) and optionally TLS or
mTLS (``--client-ca``: the coordinator must present a certificate that CA signed). It has no
health, reflection or admin surface.

What leaves the shard per query (:class:`~dprdm.index.sharded.ShardTopK`): its strict top-``k``
rows -- exact scores, record ids, clamped vectors -- always ``k`` rows, padding included, which
is what the coordinator's exact merge needs (the ids order score ties across shards and let the
coordinator check each row against the shard's public id range). No survivor count, timing,
statistic or log line per query. The coins are drawn HERE, from a fresh OS-keyed ChaCha20
generator per query (:func:`dprdm.privacy.rng.new_dp_generator`; a seeded generator is refused
unless a test injects one with ``production=False``).

Layout: :class:`ShardSearcher` is the transport-free service; :class:`ShardServicer` converts
protobuf to it and back; :func:`start_shard_server` wires the token check, TLS and the port.
"""

from __future__ import annotations

import hmac
import logging
import traceback
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from dprdm.index.format import SEAL_FIELD, PrivateIndex
from dprdm.index.sharded import ShardTopK, shard_topk
from dprdm.privacy.rng import check_dp_generator, new_dp_generator
from dprdm.proto.shard.v1 import shard_pb2, shard_pb2_grpc

from .config import hash_token

__all__ = ["MAX_K", "ShardSearcher", "ShardServicer", "ShardServerOptions", "start_shard_server"]

log = logging.getLogger("dprdm.shard")
MAX_K = 4096
"""Largest ``k`` a shard answers (a bound on the response: ``k * d`` float64)."""


class ShardSearcher:
    """One loaded shard and its per-query search (no gRPC types).

    Args:
        index: the shard, loaded and verified (its manifest has a ``shard`` block).
        rng_factory: a fresh DP generator per query (the OS-keyed CSPRNG in production).
        production: refuse a non-CSPRNG generator (tests pass False with a seeded factory).

    Raises:
        ValueError: ``index`` is not a shard of a shard set.
    """

    def __init__(
        self,
        index: PrivateIndex,
        *,
        rng_factory: Callable[[], np.random.Generator] = new_dp_generator,
        production: bool = True,
    ) -> None:
        block = index.manifest.get("shard")
        if not isinstance(block, dict):
            raise ValueError(f"{index.path} is not a shard of a shard set (its manifest has no 'shard' block; "
                             "make one with `dprdm index split`)")
        self.index, self._block = index, block
        self._rng_factory, self._production = rng_factory, production

    def describe(self) -> dict[str, Any]:
        """The shard's identity: corpus id, number, count, manifest seal, dimension (public facts)."""
        return {"corpus_id": self.index.corpus_id, "shard_number": int(self._block["number"]),
                "shard_count": int(self._block["count"]), "manifest_sha256": str(self.index.manifest[SEAL_FIELD]),
                "dimension": self.index.dimension}

    def search(self, query: np.ndarray, *, k: int, q: float, nprobe: int | None) -> ShardTopK:
        """This shard's part of one query, with fresh coins drawn here.

        Raises:
            ValueError: bad ``k`` (1..MAX_K), ``q``, ``nprobe`` or query (names the field).
        """
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be in [1, {MAX_K}]; found {k}")
        rng = self._rng_factory()
        check_dp_generator(rng, production=self._production)
        return shard_topk(self.index, query, k=k, q=q, rng=rng, nprobe=nprobe)


class ShardServicer(shard_pb2_grpc.ShardServicer):
    """The gRPC face of a :class:`ShardSearcher`: convert, call, convert."""

    def __init__(self, searcher: ShardSearcher) -> None:
        self._searcher = searcher

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC name
        return shard_pb2.DescribeResponse(**self._searcher.describe())

    def Search(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC name
        try:
            if len(request.query) % 8:
                raise ValueError("query must be float64 values (a multiple of 8 bytes)")
            u = np.frombuffer(request.query, dtype="<f8")
            part = self._searcher.search(u, k=int(request.k), q=float(request.q), nprobe=int(request.nprobe) or None)
        except ValueError as exc:  # a message naming a field and public values
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - opaque to the caller, stack logged (never its message)
            error_id = uuid.uuid4().hex[:16]
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("internal error %s in Search: %s\n%s", error_id, type(exc).__name__, frames)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})")
        return shard_pb2.SearchResponse(
            scores=part.scores.astype("<f8").tobytes(), ids=part.ids.astype("<i8").tobytes(),
            vectors=part.vectors.astype("<f8").tobytes(),
        )


class _TokenInterceptor(grpc.ServerInterceptor):
    """Every call needs ``authorization: Bearer <the shard token>``; anything else: UNAUTHENTICATED."""

    def __init__(self, token_sha256: str) -> None:
        self._digest = token_sha256

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this shard server accepts only its own token")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        values = [v for k, v in (details.invocation_metadata or ()) if k.lower() == "authorization"]
        scheme, _, token = (values[0] if len(values) == 1 else "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(hash_token(token.strip()), self._digest)
        if not ok:
            log.warning("refused a call to %s without the shard token", details.method)
            return self._refusal
        return continuation(details)


@dataclass(frozen=True)
class ShardServerOptions:
    """How a shard server listens (``dprdm serve-shard`` flags)."""

    listen: str
    """HOST:PORT (port 0: any free port): an operator-only address, never the tenants'."""
    token_sha256: str = field(repr=False)
    """SHA-256 of the shard token (:func:`dprdm.server.config.hash_token`)."""
    tls_cert: str | None = None
    """PEM certificate chain of the shard server (TLS)."""
    tls_key: str | None = None
    """Its PEM private key."""
    client_ca: str | None = None
    """PEM CA bundle: set, callers must present a certificate it signed (mTLS)."""
    threads: int = 4
    """Concurrent searches."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message sent or received."""


def start_shard_server(searcher: ShardSearcher, options: ShardServerOptions) -> tuple[grpc.Server, int]:
    """Build and start a shard server; returns it and its bound port.

    Raises:
        ValueError: unreadable TLS files, or the address cannot be bound (names it).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="dprdm-shard"),
        interceptors=[_TokenInterceptor(options.token_sha256)],
        options=[("grpc.max_send_message_length", options.max_message_bytes),
                 ("grpc.max_receive_message_length", options.max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(searcher), server)
    try:
        if options.tls_cert or options.tls_key:
            if not (options.tls_cert and options.tls_key):
                raise ValueError("TLS needs both a certificate and its key")
            ca = Path(options.client_ca).read_bytes() if options.client_ca else None
            creds = grpc.ssl_server_credentials([(Path(options.tls_key).read_bytes(),
                                                  Path(options.tls_cert).read_bytes())],
                                                root_certificates=ca, require_client_auth=ca is not None)
            port = server.add_secure_port(options.listen, creds)
        else:
            port = server.add_insecure_port(options.listen)
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    except RuntimeError:  # recent grpc raises instead of returning 0
        port = 0
    if port == 0:
        raise ValueError(f"cannot bind {options.listen}")
    server.start()
    return server, port
