"""The server over a real on-disk index (``dprdm.index``), through :mod:`dprdm.server.adapters`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dprdm.clients.client import Client
from dprdm.index import BuildConfig, build_from_vectors
from dprdm.ledger import MemoryLedger
from dprdm.models.fake import FakeEncoder
from dprdm.server.adapters import IndexAdapter, load_index
from dprdm.server.catalog import Loaders
from dprdm.server.errors import StartupError
from dprdm.server.testing import (
    ADMIN_TOKEN,
    TENANT_TOKEN,
    ServerThread,
    fake_loaders,
    make_config,
)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "faces"
    enc = FakeEncoder(16)
    vectors = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)
    build_from_vectors(
        vectors,
        enc.identity,
        BuildConfig(output=out, corpus_id="corpus-real", public_size=500, progress=False),
    )
    return out


def test_adapter_exposes_public_facts_and_selected_vectors(index_dir):
    idx = load_index(str(index_dir))
    assert isinstance(idx, IndexAdapter)
    assert (idx.domain, idx.dimension, idx.public_size, idx.exact_size, idx.private) == (
        "corpus-real",
        16,
        500,
        120,
        True,
    )
    u = FakeEncoder(16).encode_texts(["q"])[0]
    sel = idx.search_subsampled(u, k=5, q=1.0, rng=np.random.default_rng(0))
    assert sel.shape == (5, 16) and np.all(np.linalg.norm(sel, axis=1) <= 1 + 1e-9)


def _ints(obj: object) -> list[int]:
    """Every integer in a (nested) public response object."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, dict):
        return [i for v in obj.values() for i in _ints(v)]
    if isinstance(obj, (list, tuple)):
        return [i for v in obj for i in _ints(v)]
    if hasattr(obj, "__dict__") or hasattr(obj, "__dataclass_fields__"):
        return _ints(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else vars(obj))
    return []


def test_serving_a_real_index(index_dir):
    loaders = Loaders(index=load_index, bundle=fake_loaders().bundle)
    cfg = make_config(
        indexes={
            "faces": {
                "path": str(index_dir),
                "bundle": "hash-16-gen",
                "profiles": {"default": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.5}},
            }
        },
        budgets={"corpus-real": {"epsilon": 5.0}},
    )
    with ServerThread(cfg, ledger=MemoryLedger(), loaders=loaders) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            (info,) = c.list_indexes()
            assert info.public_size == 500 and info.domain == "corpus-real"
            assert 120 not in _ints(info)  # the exact count never reaches a client
            res = c.retrieve("faces", "hello")
            assert res.embedding.shape == (16,) and res.receipt.domain == "corpus-real"
            assert len(c.generate("faces", "hello", steps=1).images) == 1
        with Client(srv.address, ADMIN_TOKEN) as a:
            assert a.counts("corpus-real").indexes[0].exact_size == 120


def test_missing_or_corrupt_index_is_a_startup_error(tmp_path, index_dir):
    cfg = make_config(
        indexes={
            "faces": {
                "path": str(tmp_path / "nope"),
                "bundle": "hash-16",
                "profiles": {"default": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.5}},
            }
        }
    )
    loaders = Loaders(index=load_index, bundle=fake_loaders().bundle)
    from dprdm.server.catalog import build_catalog

    with pytest.raises(StartupError, match="indexes.faces: cannot load index"):
        build_catalog(cfg, MemoryLedger(), loaders)
