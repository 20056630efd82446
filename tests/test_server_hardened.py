"""The floating-point-safe release is the default for private indexes (issue 8, SPEC §6)."""

from __future__ import annotations

import numpy as np
import pytest

import dprdm.server.query as query_module
from dprdm.clients.client import Client
from dprdm.ledger import MemoryLedger
from dprdm.privacy import DEFAULT_ORDERS, Profile, profile_rdp
from dprdm.privacy.discrete import hardened_rdp, round_to_lattice
from dprdm.server.config import ConfigError, parse_config
from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config

LAM1 = {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}


def _config(noise: str | None = None, profiles: dict | None = None) -> object:
    index = {
        "path": "fake:domain=corpus-a,n=200,dim=16,public=400",
        "bundle": "hash-16-gen",
        "profiles": profiles or {"default": LAM1},
    }
    if noise is not None:
        index["noise"] = noise
    if noise == "float":
        index["allow_float_noise"] = True
    return make_config(indexes={"faces": index})


def test_private_index_defaults_to_discrete_noise_and_its_charge() -> None:
    with ServerThread(_config(), ledger=MemoryLedger()) as srv:
        served = srv.running.catalog.indexes["faces"].profiles["default"]
        assert served.hardened_dimension == 16
        prof = Profile(k=5, q=0.5, sigma=0.5, lam=1.0)
        np.testing.assert_array_equal(served.charge, hardened_rdp(prof, 16, DEFAULT_ORDERS))
        assert np.all(served.charge >= profile_rdp(prof))


def test_hardened_release_is_on_the_lattice_and_float_noise_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("the float-noise release was called for a hardened profile")

    monkeypatch.setattr(query_module, "release", forbidden)
    with ServerThread(_config(), ledger=MemoryLedger()) as srv, Client(srv.address, TENANT_TOKEN) as c:
        for i in range(5):
            emb = c.retrieve("faces", f"prompt {i}").embedding.astype(np.float64)
            assert np.array_equal(round_to_lattice(emb), emb)  # lambda = 1: the release is the noisy aggregate


def test_float_noise_is_an_explicit_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="dprdm.server"), ServerThread(_config(noise="float"), ledger=MemoryLedger()) as srv:
        served = srv.running.catalog.indexes["faces"].profiles["default"]
        assert served.hardened_dimension is None
        np.testing.assert_array_equal(served.charge, profile_rdp(Profile(k=5, q=0.5, sigma=0.5, lam=1.0)))
    assert any("indexes.faces: private index served with FLOAT noise" in r.getMessage() for r in caplog.records)


def test_float_noise_on_a_private_index_needs_the_opt_in() -> None:
    """Issue 12 item 6: ``noise = "float"`` alone is refused on a private index, naming the key."""
    doc = {
        "tokens": [{"tenant": "a", "role": "tenant", "token": "t" * 32}],
        "indexes": {"x": {"path": "p", "bundle": "b", "noise": "float", "profiles": {"d": LAM1}}},
    }
    with pytest.raises(ConfigError, match=r"indexes\.x\.noise: float noise on a private index .*allow_float_noise"):
        parse_config(doc)
    doc["indexes"]["x"]["private"] = False  # a public index may use float noise without it
    assert parse_config(doc).indexes[0].noise == "float"


def test_bad_noise_settings_are_named() -> None:
    doc = {
        "tokens": [{"tenant": "a", "role": "tenant", "token": "t" * 32}],
        "indexes": {"x": {"path": "p", "bundle": "b", "noise": "laplace", "profiles": {"d": LAM1}}},
    }
    with pytest.raises(ConfigError, match="noise"):
        parse_config(doc)
    doc["indexes"]["x"].update(noise="discrete", private=False, profiles={"d": {**LAM1, "sigma": 0.0}})
    with pytest.raises(ConfigError, match="sigma = 0"):
        parse_config(doc)
