"""Auth on every RPC (UNAUTHENTICATED / PERMISSION_DENIED), open health and reflection, TLS and mTLS."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import MemoryLedger
from dprdm.proto.v1 import admin_pb2, admin_pb2_grpc, dprdm_pb2, dprdm_pb2_grpc
from dprdm.server.config import TlsConfig
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, ServerThread, make_config

UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED

TENANT_CALLS = [
    ("Retrieve", dprdm_pb2.RetrieveRequest(index="faces", profile="default", prompt="x")),
    ("Generate", dprdm_pb2.GenerateRequest(index="faces", profile="default", prompt="x")),
    ("GetBudget", dprdm_pb2.GetBudgetRequest(index="faces")),
    ("ListIndexes", dprdm_pb2.ListIndexesRequest()),
]
ADMIN_CALLS = [
    ("CreateBudget", admin_pb2.CreateBudgetRequest(domain="d")),
    ("GetAuditTrail", admin_pb2.GetAuditTrailRequest(domain="corpus-a")),
    ("GetCounts", admin_pb2.GetCountsRequest(domain="corpus-a")),
    ("ListQuotas", admin_pb2.ListQuotasRequest(domain="corpus-a")),
]


def _code(method, request, metadata):
    try:
        result = method(request, metadata=metadata, timeout=30)
        if not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _spent(server):
    return server.running.ledger.budget_state("corpus-a").epsilon_spent


BAD_METADATA = [
    (),
    (("authorization", "Bearer not-a-known-token-000"),),
    (("authorization", f"Basic {TENANT_TOKEN}"),),
    (("authorization", "Bearer "),),
    (("authorization", TENANT_TOKEN),),
]


@pytest.mark.parametrize("metadata", BAD_METADATA)
@pytest.mark.parametrize(("name", "request_"), TENANT_CALLS + ADMIN_CALLS)
def test_unauthenticated(server, channel, name, request_, metadata):
    stub = (
        dprdm_pb2_grpc.DprdmStub(channel)
        if (name, request_) in TENANT_CALLS
        else admin_pb2_grpc.AdminStub(channel)
    )
    before = _spent(server)
    assert _code(getattr(stub, name), request_, metadata) == UNAUTH
    assert _spent(server) == before


@pytest.mark.parametrize(("name", "request_"), ADMIN_CALLS)
def test_tenant_may_not_call_admin(channel, name, request_):
    meta = (("authorization", f"Bearer {TENANT_TOKEN}"),)
    assert _code(getattr(admin_pb2_grpc.AdminStub(channel), name), request_, meta) == DENIED


def test_admin_may_call_everything(channel):
    meta = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    assert (
        _code(dprdm_pb2_grpc.DprdmStub(channel).ListIndexes, dprdm_pb2.ListIndexesRequest(), meta)
        == grpc.StatusCode.OK
    )
    assert (
        _code(
            admin_pb2_grpc.AdminStub(channel).GetCounts, admin_pb2.GetCountsRequest(domain="corpus-a"), meta
        )
        == grpc.StatusCode.OK
    )


def test_client_error_carries_reason(server):
    with Client(server.address, "wrong-token-wrong-token") as c, pytest.raises(DprdmError) as err:
        c.list_indexes()
    assert err.value.code == UNAUTH and err.value.reason == "UNAUTHENTICATED"
    assert "wrong-token" not in err.value.message


def test_health_is_open_and_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dprdm.v1.Dprdm", "dprdm.v1.Admin"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"dprdm.v1.Dprdm", "dprdm.v1.Admin", "grpc.health.v1.Health"} <= services
    desc = db.FindFileContainingSymbol("dprdm.v1.Dprdm")
    assert desc.name == "dprdm/v1/dprdm.proto"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dprdm-test-ca",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'client'}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            cwd=d,
        )
    return d


def _tls_config(pki, mutual):
    tls = {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")}
    if mutual:
        tls["client_ca"] = str(pki / "ca.pem")
    return dataclasses.replace(make_config(), tls=TlsConfig(**tls))


def test_tls(pki):
    with ServerThread(_tls_config(pki, mutual=False), ledger=MemoryLedger()) as srv:
        with Client(f"localhost:{srv.port}", TENANT_TOKEN, ca_cert=str(pki / "ca.pem")) as c:
            assert c.list_indexes()[0].name == "faces"
        with Client(srv.address, TENANT_TOKEN, timeout=3) as plain, pytest.raises(DprdmError) as err:
            plain.list_indexes()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate(pki):
    with ServerThread(_tls_config(pki, mutual=True), ledger=MemoryLedger()) as srv:
        with Client(
            f"localhost:{srv.port}",
            TENANT_TOKEN,
            ca_cert=str(pki / "ca.pem"),
            client_cert=str(pki / "client.pem"),
            client_key=str(pki / "client.key"),
        ) as c:
            assert c.list_indexes()[0].name == "faces"
        with (
            Client(f"localhost:{srv.port}", TENANT_TOKEN, ca_cert=str(pki / "ca.pem"), timeout=3) as c,
            pytest.raises(DprdmError) as err,
        ):
            c.list_indexes()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def _scoped_config():
    """Two indexes in two domains; carol's token may use only `faces`, dave's only domain corpus-b."""
    idx = {
        "faces": {"path": "fake:domain=corpus-a,n=200,dim=16,public=400", "bundle": "hash-16-gen",
                  "profiles": {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}},
        "cars": {"path": "fake:domain=corpus-b,n=100,dim=16,public=200", "bundle": "hash-16-gen",
                 "profiles": {"default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 1.0}}},
    }  # fmt: skip
    tokens = [
        {"tenant": "carol", "role": "tenant", "token": "carol-token-0000000001", "indexes": ["faces"]},
        {"tenant": "dave", "role": "tenant", "token": "dave-token-00000000002", "domains": ["corpus-b"]},
        {"tenant": "root", "role": "admin", "token": ADMIN_TOKEN},
    ]
    budgets = {"corpus-a": {"epsilon": 50.0}, "corpus-b": {"epsilon": 50.0}}
    return make_config(indexes=idx, tokens=tokens, budgets=budgets)


def test_tokens_limited_to_indexes_or_domains():
    """Issue 12 item 12: outside its indexes/domains a tenant token gets PERMISSION_DENIED and spends nothing."""
    with ServerThread(_scoped_config(), ledger=MemoryLedger()) as srv:
        ledger = srv.running.ledger
        with Client(srv.address, "carol-token-0000000001") as carol:
            assert carol.retrieve("faces", "x").receipt.epsilon_charged > 0
            assert [i.name for i in carol.list_indexes()] == ["faces"]
            for call in (lambda: carol.retrieve("cars", "x"), lambda: carol.budget("cars"),
                         lambda: list(carol.generate("cars", "x", steps=1))):  # fmt: skip
                with pytest.raises(DprdmError) as err:
                    call()
                assert err.value.code == DENIED and "may not use index 'cars'" in err.value.message
        with Client(srv.address, "dave-token-00000000002") as dave:
            assert dave.retrieve("cars", "y").receipt.domain == "corpus-b"
            with pytest.raises(DprdmError) as err:
                dave.retrieve("faces", "y")
            assert err.value.code == DENIED
        assert ledger.budget_state("corpus-a").spends == 1 and ledger.budget_state("corpus-b").spends == 1


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ({"indexes": ["nope"]}, r"tokens\[0\]\.indexes: no index named 'nope'"),
        ({"indexes": []}, r"tokens\[0\]\.indexes: must name at least one"),
        ({"domains": "corpus-a"}, r"tokens\[0\]\.domains"),
        ({"role": "admin", "domains": ["corpus-a"]}, r"only tenant tokens are limited"),
    ],
)
def test_bad_token_scopes_are_named(token, message):
    from dprdm.server.config import ConfigError

    base = {"tenant": "carol", "role": "tenant", "token": "carol-token-0000000001"}
    with pytest.raises(ConfigError, match=message):
        make_config(tokens=[{**base, **token}])
