"""Shard servers (issue 15): a 2-shard-server deployment serves Retrieve through the main server
with its budget charged and exhaustion refused; the shard service accepts only its own token; a
shard failing after the charge keeps the charge (UNAVAILABLE), one known down refuses before it."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from test_server_auth import pki  # noqa: F401 - the module's test PKI (openssl), as a fixture here

from dprdm.clients.client import Client, DprdmError
from dprdm.index import BuildConfig, build_from_vectors, load
from dprdm.index.sharded import merge_topk, shard_topk
from dprdm.index.shardset import ID_LIMIT, load_shard_set, split_index
from dprdm.index.testing import random_unit_vectors
from dprdm.ledger import MemoryLedger
from dprdm.models.fake import FakeEncoder
from dprdm.proto.shard.v1 import shard_pb2, shard_pb2_grpc
from dprdm.server.adapters import load_index
from dprdm.server.catalog import Loaders, build_catalog
from dprdm.server.config import ConfigError, IndexConfig, hash_token
from dprdm.server.errors import StartupError
from dprdm.server.shard_client import RemoteShardedIndex, open_shards
from dprdm.server.shard_service import ShardSearcher, ShardServerOptions, start_shard_server
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, ServerThread, fake_loaders, make_config

SHARD_TOKEN = "shard-token-internal-0042"
PROFILE = {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.5}}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    x = random_unit_vectors(120, 16, seed=11)
    rng = np.random.default_rng(12)
    ids = rng.permutation(np.unique(rng.integers(0, ID_LIMIT, size=240, dtype=np.int64)))[:120]  # hash-like
    cfg = BuildConfig(output=root / "src", corpus_id="corpus-sh", public_size=200, progress=False)
    build_from_vectors(x, FakeEncoder(16).identity, cfg, ids=ids)
    split_index(root / "src", root / "set", shards=2)
    return root / "set"


class _Shards:
    """Two in-process shard servers on loopback (a test may make one fail or stop it)."""

    def __init__(self, set_dir, rng_factories=None) -> None:
        self.fail = threading.Event()
        self.servers, self.addresses = [], []
        for i in range(2):
            kwargs = {}
            if rng_factories is not None:
                kwargs = {"rng_factory": rng_factories[i], "production": False}
            elif i == 1:  # production coins (OS-keyed ChaCha20); a test can make this shard fail
                kwargs = {"rng_factory": self._failing_factory}
            searcher = ShardSearcher(load(set_dir / f"shard-{i:04d}"), **kwargs)
            server, port = start_shard_server(
                searcher, ShardServerOptions(listen="127.0.0.1:0", token_sha256=hash_token(SHARD_TOKEN)))
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")

    def _failing_factory(self) -> np.random.Generator:
        from dprdm.privacy.rng import new_dp_generator

        if self.fail.is_set():
            raise RuntimeError("injected shard failure")
        return new_dp_generator()

    def stop(self) -> None:
        for s in self.servers:
            s.stop(None).wait()


@pytest.fixture()
def shards(shard_set):
    s = _Shards(shard_set)
    yield s
    s.stop()


def _config(shard_set, addresses, epsilon=50.0):
    return make_config(
        indexes={"faces": {"path": str(shard_set), "bundle": "hash-16", "profiles": PROFILE,
                           "shards": list(addresses), "shard_token_env": "DPRDM_TEST_SHARD_TOKEN"}},
        budgets={"corpus-sh": {"epsilon": epsilon}},
    )


def _loaders() -> Loaders:
    return Loaders(index=load_index, bundle=fake_loaders().bundle)


@pytest.fixture(autouse=True)
def _token_env(monkeypatch):
    monkeypatch.setenv("DPRDM_TEST_SHARD_TOKEN", SHARD_TOKEN)


def test_two_shard_servers_serve_retrieve_with_budget_charged_and_exhaustion(shard_set, shards):
    with ServerThread(_config(shard_set, shards.addresses, epsilon=8.0), ledger=MemoryLedger(),
                      loaders=_loaders()) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            (info,) = c.list_indexes()
            assert info.public_size == 200 and info.domain == "corpus-sh"
            first = c.retrieve("faces", "prompt 0")
            assert first.embedding.shape == (16,) and np.all(np.isfinite(first.embedding))
            eps1 = first.receipt.epsilon_charged
            assert eps1 > 0 and first.receipt.epsilon_spent == pytest.approx(eps1)
            admitted, refused = 1, None
            for i in range(1, 40):
                try:
                    c.retrieve("faces", f"prompt {i}")
                    admitted += 1
                except DprdmError as exc:
                    refused = exc
                    break
            assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.reason == "PRIVACY_BUDGET_EXHAUSTED"
            spent = c.budget("faces").epsilon_spent
            assert admitted >= 2 and spent <= 8.0  # never beyond the budget
            with pytest.raises(DprdmError) as again:
                c.retrieve("faces", "one more")
            assert again.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.budget("faces").epsilon_spent == spent  # a refusal charges nothing
        with Client(srv.address, ADMIN_TOKEN) as a:
            assert a.counts("corpus-sh").indexes[0].exact_size == 120  # operator-only, from shardset.json
        remote = srv.running.catalog.indexes["faces"].index
        assert isinstance(remote, RemoteShardedIndex)
    with pytest.raises(ValueError, match="Channel closed"):  # the stop closed the channels to the shards
        remote.search_subsampled(np.ones(16, np.float32), k=2, q=1.0, rng=np.random.default_rng(0))


def test_remote_merge_equals_the_local_merge_on_the_same_coins(shard_set):
    seeds = [lambda: np.random.default_rng(71), lambda: np.random.default_rng(72)]
    servers = _Shards(shard_set, rng_factories=seeds)
    try:
        cfg = IndexConfig(name="faces", path=str(shard_set), bundle="hash-16", profiles=(),
                          shards=tuple(servers.addresses), shard_token_env="DPRDM_TEST_SHARD_TOKEN")
        remote = open_shards(cfg)
        assert isinstance(remote, RemoteShardedIndex) and remote.public_size == 200
        local = load_shard_set(shard_set)
        for j in range(5):
            u = random_unit_vectors(1, 16, seed=90 + j)[0]
            parts = [shard_topk(local.shards[i], u, k=7, q=0.5, rng=seeds[i]()) for i in range(2)]
            want = merge_topk(parts, 7).padded
            got = remote.search_subsampled(u.astype(np.float32), k=7, q=0.5, rng=np.random.default_rng(0))
            assert got.tobytes() == want.tobytes()
        remote.close()
    finally:
        servers.stop()


def test_the_shard_service_accepts_only_its_own_token(shards):
    with grpc.insecure_channel(shards.addresses[0]) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        about = stub.Describe(shard_pb2.DescribeRequest(), metadata=(("authorization", f"Bearer {SHARD_TOKEN}"),))
        assert (about.corpus_id, about.shard_number, about.shard_count) == ("corpus-sh", 0, 2)
        for md in ((("authorization", f"Bearer {TENANT_TOKEN}"),), (("authorization", f"Bearer {ADMIN_TOKEN}"),), ()):
            for call, req in ((stub.Describe, shard_pb2.DescribeRequest()), (stub.Search, shard_pb2.SearchRequest())):
                with pytest.raises(grpc.RpcError) as err:
                    call(req, metadata=md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as bad:
            stub.Search(shard_pb2.SearchRequest(query=b"\0" * 8 * 15, k=3, q=0.5),
                        metadata=(("authorization", f"Bearer {SHARD_TOKEN}"),))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query must have shape (16,)" in bad.value.details()


def test_configuration_keeps_tenant_tokens_away_from_shards(shard_set, monkeypatch):
    monkeypatch.setenv("DPRDM_TEST_SHARD_TOKEN", TENANT_TOKEN)
    with pytest.raises(ConfigError, match="shard_token_env: the shard token equals a \\[\\[tokens\\]\\] token"):
        _config(shard_set, ["127.0.0.1:1"])
    monkeypatch.setenv("DPRDM_TEST_SHARD_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        _config(shard_set, ["127.0.0.1:1"])
    index = {"path": str(shard_set), "bundle": "hash-16", "profiles": PROFILE}
    for extra, match in (({"shards": ["127.0.0.1:1"]}, "shard_token_env: required with shards"),
                         ({"shard_token_env": "X"}, "shard_token_env: only with shards"),
                         ({"shards": ["nohost"], "shard_token_env": "X"}, r"shards\[0\]: must be HOST:PORT"),
                         ({"shards": ["h:1", "h:1"], "shard_token_env": "X"}, "listed twice"),
                         ({"shards": ["h:1"], "shard_token_env": "X", "shard_timeout": 0.0}, "shard_timeout")):
        with pytest.raises(ConfigError, match=match):
            make_config(indexes={"faces": {**index, **extra}})


def test_misrouted_or_missing_shard_servers_refuse_to_start(shard_set, shards):
    with pytest.raises(StartupError, match="serves shard 1 of 2 .* position 0 of the shard set is shard-0000"):
        build_catalog(_config(shard_set, shards.addresses[::-1]), MemoryLedger(), _loaders())
    with pytest.raises(StartupError, match="lists 1 address"):
        build_catalog(_config(shard_set, shards.addresses[:1]), MemoryLedger(), _loaders())
    shards.servers[1].stop(None).wait()
    with pytest.raises(StartupError, match=f"shard server {shards.addresses[1]} \\(shard 1\\) does not answer"):
        build_catalog(_config(shard_set, shards.addresses), MemoryLedger(), _loaders())


def test_a_local_shard_set_is_served_in_process(shard_set):
    cfg = make_config(indexes={"faces": {"path": str(shard_set), "bundle": "hash-16", "profiles": PROFILE}},
                      budgets={"corpus-sh": {"epsilon": 50.0}})
    with ServerThread(cfg, ledger=MemoryLedger(), loaders=_loaders()) as srv, Client(srv.address, TENANT_TOKEN) as c:
        res = c.retrieve("faces", "local")
        assert res.embedding.shape == (16,) and res.receipt.epsilon_charged > 0


def _retrieve_error(c: Client, request_id: str) -> DprdmError:
    with pytest.raises(DprdmError) as err:
        c.retrieve("faces", f"prompt {request_id}", request_id=request_id)
    return err.value


def test_shard_failure_after_the_charge_keeps_it_and_a_shard_known_down_refuses_before(shard_set, shards):
    with ServerThread(_config(shard_set, shards.addresses), ledger=MemoryLedger(), loaders=_loaders()) as srv, \
            Client(srv.address, TENANT_TOKEN) as c, Client(srv.address, ADMIN_TOKEN) as admin:

        def spends() -> int:
            return len(admin.audit_trail("corpus-sh", limit=1000))

        c.retrieve("faces", "ok")
        shards.fail.set()  # shard 1 fails inside Search: after the reservation
        err = _retrieve_error(c, "r-1")
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "CHARGED_SHARD_UNAVAILABLE"
        assert err.metadata["request_id"] == "r-1" and err.metadata["charged"] == "true"
        assert spends() == 2  # the charge is kept
        replay = _retrieve_error(c, "r-1")
        assert replay.code == grpc.StatusCode.FAILED_PRECONDITION and replay.reason == "RELEASE_MISSING"
        shards.fail.clear()
        c.retrieve("faces", "ok again")
        count = spends()
        assert count == 3
        shards.servers[1].stop(None).wait()
        deadline, reasons = time.monotonic() + 20, []
        while time.monotonic() < deadline and "SHARD_UNAVAILABLE" not in reasons:
            err = _retrieve_error(c, f"down-{len(reasons)}")
            assert err.code == grpc.StatusCode.UNAVAILABLE
            reasons.append(err.reason)
            count += 1 if err.reason == "CHARGED_SHARD_UNAVAILABLE" else 0
            assert spends() == count  # charged iff the reason says so
            time.sleep(0.05)
        assert reasons[-1] == "SHARD_UNAVAILABLE"  # known down: refused before the charge


def test_serve_shard_command_serves_until_sigterm(shard_set):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "DPRDM_TEST_SHARD_TOKEN": SHARD_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "dprdm", "serve-shard", str(shard_set / "shard-0001"),
                             "--listen", "127.0.0.1:0", "--token-env", "DPRDM_TEST_SHARD_TOKEN", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "shard 1 of 2 of corpus 'corpus-sh' listening on port" in line, proc.stderr.read()
        port = int(line.rsplit(" ", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            about = shard_pb2_grpc.ShardStub(ch).Describe(
                shard_pb2.DescribeRequest(), metadata=(("authorization", f"Bearer {SHARD_TOKEN}"),), timeout=10)
        assert about.shard_number == 1 and about.dimension == 16
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    short = subprocess.run([sys.executable, "-m", "dprdm", "serve-shard", str(shard_set / "shard-0001"), "--listen",
                            "127.0.0.1:0", "--token-env", "DPRDM_NO_SUCH_VAR"], capture_output=True, text=True)
    assert short.returncode == 2 and "DPRDM_NO_SUCH_VAR must hold a token" in short.stderr


def test_shard_servers_over_mtls(shard_set, pki):  # noqa: F811 - the imported fixture
    searchers = [ShardSearcher(load(shard_set / f"shard-{i:04d}")) for i in range(2)]
    opts = ShardServerOptions(listen="127.0.0.1:0", token_sha256=hash_token(SHARD_TOKEN), tls_cert=str(pki / "server.pem"),
                              tls_key=str(pki / "server.key"), client_ca=str(pki / "ca.pem"))
    started = [start_shard_server(s, opts) for s in searchers]
    try:
        base = {"name": "faces", "path": str(shard_set), "bundle": "hash-16", "profiles": (),
                "shards": tuple(f"localhost:{port}" for _srv, port in started), "shard_token_env": "DPRDM_TEST_SHARD_TOKEN",
                "shard_tls_ca": str(pki / "ca.pem"), "shard_timeout": 5.0}
        remote = open_shards(IndexConfig(**base, shard_tls_cert=str(pki / "client.pem"),
                                         shard_tls_key=str(pki / "client.key")))
        u = random_unit_vectors(1, 16, seed=3)[0]
        assert remote.search_subsampled(u, k=4, q=1.0, rng=np.random.default_rng(0)).shape == (4, 16)
        remote.close()
        with pytest.raises(ValueError, match="does not answer: UNAVAILABLE"):  # no client certificate
            open_shards(IndexConfig(**base))
    finally:
        for server, _port in started:
            server.stop(None).wait()
