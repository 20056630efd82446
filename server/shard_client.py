"""The coordinator's side of a sharded index: a shard set searched in this process, or on shard
servers (:mod:`dprdm.server.shard_service`), as a :class:`~dprdm.server.catalog.RetrievalIndex`.

``[indexes.<name>] path`` naming a shard set directory (``shardset.json``) opens its shards here,
memory-mapped (:func:`dprdm.index.shardset.load_shard_set`: checksums through each shard's
verified-at-build stamp). With ``shards = ["host:port", ...]`` only ``shardset.json`` is read and
each address's ``Describe`` must name the corpus, the shard number and the manifest seal the set
lists for that position, else the server refuses to start.

One query (:meth:`RemoteShardedIndex.search_subsampled`) sends the public query to every shard
server at once, WAITS FOR EVERY ONE (no early exit: the time to answer does not depend on which
shard's rows win), checks each answer (:func:`dprdm.index.sharded.check_part`) and merges them
exactly (:func:`dprdm.index.sharded.merge_topk`). A shard that fails, times out or answers
malformed rows fails the whole query with :class:`~dprdm.server.errors.ShardUnavailable`; as the
search runs after the reservation, :mod:`dprdm.server.query` turns it into
``ChargedShardUnavailable`` (UNAVAILABLE, the charge kept, a replay answered RELEASE_MISSING).
Before the charge, :meth:`RemoteShardedIndex.check_available` refuses (nothing charged) while a
shard's channel is known to be failing.

Nothing per query is logged but a failing shard's address and status code (public facts).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from dprdm.index.format import SEAL_FIELD
from dprdm.index.sharded import ShardTopK, check_part, merge_topk
from dprdm.index.shardset import load_shard_set, read_shard_set
from dprdm.models.base import EncoderIdentity
from dprdm.proto.shard.v1 import shard_pb2, shard_pb2_grpc

from .adapters import IndexAdapter
from .config import IndexConfig
from .errors import ShardUnavailable
from .shard_service import MAX_K

__all__ = ["ShardSetAdapter", "RemoteShardedIndex", "open_shards"]

log = logging.getLogger("dprdm.server")
_MAX_MESSAGE = 64 * 1024 * 1024
_FAILING = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class ShardSetAdapter(IndexAdapter):
    """A local :class:`~dprdm.index.sharded.ShardedIndex` (shards memory-mapped in this process).

    The search runs on the host (numpy): a device backend per shard is not implemented, so a
    ``search_device`` of ``cuda`` is refused at start and ``auto`` means cpu.
    """

    use_search_device = None  # type: ignore[assignment]  # no device backend (see the catalog)


class _Shard:
    """One shard server: its channel, stub, public id range and last known connectivity."""

    def __init__(self, address: str, number: int, entry: dict[str, Any], channel: grpc.Channel) -> None:
        self.address, self.number, self.channel = address, number, channel
        self.first_id, self.last_id = int(entry["id_first"]), int(entry["id_last"])
        self.stub = shard_pb2_grpc.ShardStub(channel)
        self.state: grpc.ChannelConnectivity | None = None
        self._lock = threading.Lock()
        channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self.state = state

    def failing(self) -> bool:
        with self._lock:
            return self.state in _FAILING


class RemoteShardedIndex:
    """A shard set whose shards are served by ``dprdm serve-shard`` processes (see the module doc).

    Attributes are those of :class:`~dprdm.server.catalog.RetrievalIndex`, from ``shardset.json``
    (``exact_size`` is operator-only: admin ``GetCounts``).
    """

    def __init__(self, name: str, manifest: dict[str, Any], shards: Sequence[_Shard], token: str, timeout: float) -> None:
        self.name = name
        self.domain: str = str(manifest["corpus_id"])
        self.version: str = str(manifest["index_version"])
        self.dimension: int = int(manifest["dimension"])
        self.public_size: int = int(manifest["public_size"])
        self.exact_size: int = int(manifest["count"])
        self.private: bool = bool(manifest["private"])
        self.group_size: int = int(manifest["group_size"])
        self.encoder: EncoderIdentity = EncoderIdentity.from_dict(manifest["encoder"])
        self._shards = tuple(shards)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def check_available(self) -> None:
        """Refuse before the charge while a shard's channel is failing.

        Raises:
            ShardUnavailable: naming the index (the address is logged).
        """
        for s in self._shards:
            if s.failing():
                log.warning("index %s: shard %d at %s is unavailable (%s)", self.name, s.number, s.address,
                            s.state.name if s.state else "?")
                raise ShardUnavailable(self.name)

    def search_subsampled(
        self,
        query: npt.NDArray[np.float32],
        *,
        k: int,
        q: float,
        rng: np.random.Generator,
        nprobe: int | None = None,
    ) -> npt.NDArray[np.float64]:
        """The merged strict top ``k`` of every shard's fresh Poisson(q) subsample, as ``k`` rows.

        ``rng`` is not used: each shard draws its own coins from its OS-keyed CSPRNG.

        Raises:
            ShardUnavailable: a shard failed, timed out or answered malformed rows.
        """
        del rng
        request = shard_pb2.SearchRequest(query=np.asarray(query, dtype="<f8").tobytes(), k=int(k), q=float(q),
                                          nprobe=int(nprobe or 0))
        calls = [s.stub.Search.future(request, timeout=self._timeout, metadata=self._metadata) for s in self._shards]
        parts: list[ShardTopK] = []
        failed = False
        for s, call in zip(self._shards, calls, strict=True):  # every call is waited for
            try:
                parts.append(self._part(s, call.result(), k))
            except grpc.RpcError as exc:
                failed = True
                log.warning("index %s: shard %d at %s failed: %s", self.name, s.number, s.address, exc.code().name)
            except ValueError as exc:
                failed = True
                log.error("index %s: shard %d at %s answered malformed rows: %s", self.name, s.number, s.address, exc)
        if failed:
            raise ShardUnavailable(self.name)
        return np.asarray(merge_topk(parts, k).padded)

    def _part(self, shard: _Shard, resp: Any, k: int) -> ShardTopK:
        d = self.dimension
        if (len(resp.scores), len(resp.ids), len(resp.vectors)) != (8 * k, 8 * k, 8 * k * d):
            raise ValueError(f"expected {k} rows of dimension {d}")
        part = ShardTopK(scores=np.frombuffer(resp.scores, "<f8").astype(np.float64),
                         ids=np.frombuffer(resp.ids, "<i8").astype(np.int64),
                         vectors=np.frombuffer(resp.vectors, "<f8").astype(np.float64).reshape(k, d))
        check_part(part, k=k, dimension=d, first_id=shard.first_id, last_id=shard.last_id)
        return part

    def close(self) -> None:
        """Close the channels to the shard servers."""
        for s in self._shards:
            s.channel.close()


def _channel(cfg: IndexConfig, address: str) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
    if cfg.shard_tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(cfg.shard_tls_ca).read_bytes(),
            private_key=Path(cfg.shard_tls_key).read_bytes() if cfg.shard_tls_key else None,
            certificate_chain=Path(cfg.shard_tls_cert).read_bytes() if cfg.shard_tls_cert else None,
        )
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    return grpc.secure_channel(address, creds, options=options)


def _connect(cfg: IndexConfig, manifest: dict[str, Any], token: str) -> list[_Shard]:
    """A checked connection to each configured shard server (``Describe`` against the set)."""
    entries, addresses = manifest["shards"], cfg.shards or ()
    if len(addresses) != len(entries):
        raise ValueError(f"shards lists {len(addresses)} address(es), but the shard set has {len(entries)} shards")
    shards = []
    for i, (address, entry) in enumerate(zip(addresses, entries, strict=True)):
        channel = _channel(cfg, address)
        shards.append(_Shard(address, i, entry, channel))
        try:
            about = shards[-1].stub.Describe(shard_pb2.DescribeRequest(), timeout=cfg.shard_timeout,
                                             metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError as exc:
            for s in shards:
                s.channel.close()
            raise ValueError(f"shard server {address} (shard {i}) does not answer: {exc.code().name}: "
                             f"{exc.details()}") from None
        want = (manifest["corpus_id"], i, len(entries), entry[SEAL_FIELD], int(manifest["dimension"]))
        got = (about.corpus_id, about.shard_number, about.shard_count, about.manifest_sha256, about.dimension)
        if got != want:
            for s in shards:
                s.channel.close()
            raise ValueError(f"shard server {address} serves shard {about.shard_number} of {about.shard_count} of "
                             f"corpus {about.corpus_id!r} (seal {about.manifest_sha256[:16]}...), but position {i} "
                             f"of the shard set is {entry['name']} (seal {entry[SEAL_FIELD][:16]}...)")
    return shards


def open_shards(cfg: IndexConfig) -> Any:
    """Open the shard set of ``cfg``: in this process, or on its shard servers (``cfg.shards``).

    Raises:
        ValueError: the set or a shard does not verify, a shard server does not answer or serves
            another shard (names the address), or the shard token is not set.
    """
    if not cfg.shards:
        return ShardSetAdapter(load_shard_set(cfg.path))
    too_big = [p.name for p in cfg.profiles if p.profile.k > MAX_K]
    if too_big:
        raise ValueError(f"profile {too_big[0]!r}: a shard server answers k <= {MAX_K}")
    manifest = read_shard_set(cfg.path)
    token = os.environ.get(cfg.shard_token_env or "")
    if not token:
        raise ValueError(f"environment variable {cfg.shard_token_env} (shard_token_env) is not set")
    return RemoteShardedIndex(cfg.name, manifest, _connect(cfg, manifest, token), token, cfg.shard_timeout)
