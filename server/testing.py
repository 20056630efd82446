"""Test doubles and a server harness: tiny fakes for the index, the bundle and the generator.

Used by the server and client tests and by the load benchmark; not for production.

* ``fake:`` index paths (``fake:domain=corpus-a,n=200,dim=16,public=400,version=v1,seed=0,sleep=0,group=1``)
  build an :class:`ArrayIndex` of random unit vectors whose search is the exact top-k of a
  Poisson subsample (the oracle the real index is tested against).
* bundle names ``hash-<dim>`` (encoder only) and ``hash-<dim>-gen`` (with :class:`TinyGenerator`);
  the encoder is :class:`dprdm.models.fake.FakeEncoder` of that dimension, whose identity the
  fake indexes also carry (an index built with ``FakeEncoder(dim).identity`` serves with them).
* :class:`ServerThread` runs a real server (port 0) on its own event loop thread.
* :func:`epsilon_admitting` / :func:`quota_admitting`: the budget or tenant-quota epsilon that admits
  exactly M queries of one mechanism under the server's default accountant.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from dprdm.models.base import EncoderIdentity, ProgressCallback
from dprdm.models.fake import FakeEncoder
from dprdm.privacy import Budget, Profile, epsilon_for
from dprdm.privacy.pld import epsilon_pld, pld_dominating_pair

from .catalog import Bundle, Loaders
from .config import ServerConfig

__all__ = [
    "TinyGenerator",
    "ArrayIndex",
    "fake_loaders",
    "ServerThread",
    "make_config",
    "epsilon_admitting",
    "quota_admitting",
    "TENANT_TOKEN",
    "OTHER_TOKEN",
    "ADMIN_TOKEN",
]

TENANT_TOKEN = "tenant-token-alice-0001"
OTHER_TOKEN = "tenant-token-bob-000002"
ADMIN_TOKEN = "admin-token-root-000003"
DEFAULT_PROFILES = {
    "default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.5},
    "public": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.0},
}


def epsilon_admitting(profile: Profile, queries: int, delta: float, hardened_dimension: int | None) -> float:
    """A single-profile budget epsilon admitting exactly ``queries`` queries of ``profile`` under
    the server's default accountant (PLD where the mechanism has a pair, else RDP): halfway between
    the epsilons of ``queries`` and ``queries + 1`` (the ones admission certifies against)."""
    if pld_dominating_pair(profile, hardened_dimension) is not None:
        def eps(t: int) -> float:
            return epsilon_pld(profile=profile, queries=t, delta=delta, hardened_dimension=hardened_dimension)
    else:
        def eps(t: int) -> float:
            return epsilon_for(profile, queries=t, delta=delta, hardened_dimension=hardened_dimension)
    return _halfway(eps, queries, "epsilon")


def quota_admitting(budget: Budget, queries: int) -> float:
    """A tenant quota admitting exactly ``queries`` of ``budget``'s mechanism: quotas compare the
    budget's reported spent epsilon (a PLD budget's receipts table, else the RDP epsilon)."""
    profile = budget.profile
    if profile is None:
        raise ValueError("quota_admitting needs a single-profile budget")
    if budget.accountant == "pld":
        return _halfway(budget.pld.epsilon_after, queries, "the reported epsilon")

    def eps(t: int) -> float:
        return epsilon_for(profile, queries=t, delta=budget.delta, hardened_dimension=budget.hardened_dimension)

    return _halfway(eps, queries, "the reported epsilon")


def _halfway(eps: Callable[[int], float], queries: int, what: str) -> float:
    """Halfway between ``eps(queries)`` and ``eps(queries + 1)`` (``what`` names it in the error)."""
    lo, hi = eps(queries), eps(queries + 1)
    if not hi > lo:
        raise ValueError(f"{what} does not grow between {queries} and {queries + 1} queries")
    return 0.5 * (lo + hi)


def make_config(
    *,
    indexes: dict[str, Any] | None = None,
    budgets: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    tokens: list[dict[str, Any]] | None = None,
) -> ServerConfig:
    """A test configuration: index ``faces`` (fake, domain ``corpus-a``, d = 16, N = 200, N̄ = 400,
    bundle with a generator), profiles ``default`` and ``public`` (lambda = 0), a budget of
    epsilon 50, and three tokens (tenants alice and bob, admin root)."""
    from .config import parse_config

    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", **(server or {})},
        "limits": limits or {},
        "tokens": tokens
        if tokens is not None
        else [
            {"tenant": "alice", "role": "tenant", "token": TENANT_TOKEN},
            {"tenant": "bob", "role": "tenant", "token": OTHER_TOKEN},
            {"tenant": "root", "role": "admin", "token": ADMIN_TOKEN},
        ],
        "indexes": indexes
        if indexes is not None
        else {
            "faces": {
                "path": "fake:domain=corpus-a,n=200,dim=16,public=400",
                "bundle": "hash-16-gen",
                "profiles": DEFAULT_PROFILES,
            },
        },
        "budgets": budgets if budgets is not None else {"corpus-a": {"epsilon": 50.0}},
    }
    return parse_config(doc)


def _unit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class TinyGenerator:
    """Small RGB images whose pixels depend on the conditioning and the seed.

    ``gate`` (tests): when set to an Event, every step waits for it.
    """

    def __init__(self, dimension: int = 16, size: int = 8) -> None:
        self._dimension, self.size = dimension, size
        self.gate: threading.Event | None = None

    @property
    def conditioning_dimension(self) -> int:
        return self._dimension

    def generate(
        self,
        conditioning: npt.NDArray[np.float32],
        prompt: str,
        n: int,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        c = np.asarray(conditioning, dtype=np.float64).reshape(-1)
        rng = np.random.default_rng(seed)
        for step in range(1, steps + 1):
            if self.gate is not None:
                self.gate.wait(timeout=60)
            if progress is not None:
                progress(step, steps)
        base = np.resize(np.tanh(c) * 100 + 128, (self.size, self.size, 3))
        return [
            Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
            for _ in range(n)
        ]


class ArrayIndex:
    """An in-memory index: exact top-k (score desc, id asc) of a Poisson(q) subsample of N̄ slots.

    ``gate`` (tests): when set to an Event, every search waits for it.
    """

    def __init__(
        self,
        vectors: npt.ArrayLike,
        *,
        domain: str,
        version: str = "v1",
        public_size: int | None = None,
        encoder: EncoderIdentity | None = None,
        private: bool = True,
    ) -> None:
        self.vectors = np.asarray(vectors, dtype=np.float64)
        self.domain, self.version, self.private = domain, version, private
        self.exact_size, self.dimension = self.vectors.shape
        self.public_size = int(public_size or self.exact_size)
        self.encoder = encoder or FakeEncoder(self.dimension).identity
        self.gate: threading.Event | None = None
        self.sleep = 0.0  # seconds per search (widens the reserve -> store window in crash tests)
        self.group_size = 1  # 2 mimics an IVF index whose capacity-limited lists may overflow

    def search_subsampled(
        self,
        query: npt.NDArray[np.float32],
        *,
        k: int,
        q: float,
        rng: np.random.Generator,
        nprobe: int | None = None,
    ) -> npt.NDArray[np.float64]:
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if self.sleep:
            time.sleep(self.sleep)
        keep = np.flatnonzero(rng.random(self.public_size) < q)
        keep = keep[keep < self.exact_size]  # padded slots score -inf
        scores = self.vectors[keep] @ np.asarray(query, dtype=np.float64)
        order = np.lexsort((keep, -scores))[:k]
        return self.vectors[keep[order]]


def _fake_index(spec: str) -> ArrayIndex:
    params = dict(item.split("=", 1) for item in spec.removeprefix("fake:").split(",") if item)
    n, dim = int(params.get("n", 200)), int(params.get("dim", 16))
    rng = np.random.default_rng(int(params.get("seed", 0)))
    index = ArrayIndex(
        _unit(rng.normal(size=(n, dim))),
        domain=params.get("domain", "corpus-a"),
        version=params.get("version", "v1"),
        public_size=int(params.get("public", n)),
        private=params.get("private", "1") != "0",
    )
    index.sleep = float(params.get("sleep", 0.0))
    index.group_size = int(params.get("group", 1))
    return index


def _fake_bundle(name: str) -> Bundle:
    parts = name.split("-")
    if parts[0] != "hash" or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"unknown fake bundle {name!r}; use hash-<dim> or hash-<dim>-gen")
    dim = int(parts[1])
    return Bundle(
        name=name,
        encoder=FakeEncoder(dim),
        generator=TinyGenerator(dim) if name.endswith("-gen") else None,
    )


def fake_loaders() -> Loaders:
    """Loaders for ``fake:`` index paths and ``hash-<dim>[-gen]`` bundles."""
    return Loaders(index=_fake_index, bundle=_fake_bundle)


class ServerThread:
    """A real server on port 0, on its own event loop in a daemon thread (for sync tests)."""

    def __init__(self, config: ServerConfig, *, ledger: Any = None, loaders: Loaders | None = None) -> None:
        from .app import start_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dprdm-test-server", daemon=True)
        self._thread.start()
        cfg = replace(config, listen=config.listen.rsplit(":", 1)[0] + ":0")
        fut = asyncio.run_coroutine_threadsafe(
            start_server(cfg, ledger=ledger, loaders=loaders or fake_loaders()), self.loop
        )
        try:
            self.running = fut.result(timeout=60)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.port = self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop the server and its loop."""
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
