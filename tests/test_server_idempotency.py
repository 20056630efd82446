"""Idempotent replay keyed by (tenant, request id), bound to (index version, profile, prompt)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.server.api_types import Caller, QueryArgs
from dprdm.server.query import plan_query
from dprdm.server.testing import OTHER_TOKEN, TENANT_TOKEN, ServerThread, make_config


def _config(version: str = "v1", reuse: bool = False):
    return make_config(
        indexes={
            "faces": {
                "path": f"fake:domain=corpus-a,n=200,dim=16,public=400,version={version}",
                "bundle": "hash-16-gen",
                "profiles": {
                    "default": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.5},
                    "other": {"k": 6, "q": 0.5, "sigma": 0.5, "lambda": 0.5},
                },
            }
        },
        server={"reuse_releases": reuse},
    )


@pytest.fixture()
def ledger_path(tmp_path):
    return tmp_path / "ledger.sqlite3"


@pytest.fixture()
def server(ledger_path):
    with ServerThread(_config(), ledger=SqliteLedger(ledger_path)) as srv:
        yield srv


def _spends(srv) -> int:
    return srv.running.ledger.budget_state("corpus-a").spends


def test_replay_returns_the_stored_release_without_a_charge(server):
    with Client(server.address, TENANT_TOKEN) as c:
        first = c.retrieve("faces", "replay me", request_id="id-1")
        again = c.retrieve("faces", "replay me", request_id="id-1")
    assert again.receipt.replayed and not first.receipt.replayed
    np.testing.assert_array_equal(first.embedding, again.embedding)
    assert again.receipt.spend_id == first.receipt.spend_id
    assert again.receipt.epsilon_charged == first.receipt.epsilon_charged
    assert _spends(server) == 1


@pytest.mark.parametrize("change", [{"prompt": "another prompt"}, {"profile": "other"}])
def test_mismatch_is_an_error_and_charges_nothing(server, change):
    with Client(server.address, TENANT_TOKEN) as c:
        c.retrieve("faces", "bound", request_id="id-2")
        kwargs = {"prompt": "bound", "profile": "default", **change}
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", kwargs["prompt"], profile=kwargs["profile"], request_id="id-2")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == "REQUEST_ID_REUSED"
    assert _spends(server) == 1


def test_request_ids_are_per_tenant(server):
    with Client(server.address, TENANT_TOKEN) as a, Client(server.address, OTHER_TOKEN) as b:
        ra = a.retrieve("faces", "same id", request_id="shared")
        rb = b.retrieve("faces", "same id", request_id="shared")
    assert ra.receipt.spend_id != rb.receipt.spend_id and not rb.receipt.replayed
    assert _spends(server) == 2


def test_concurrent_duplicates_are_charged_once(server):
    results, errors = [], []
    barrier = threading.Barrier(16)

    def call() -> None:
        with Client(server.address, TENANT_TOKEN) as c:
            c.list_indexes()
            barrier.wait()
            try:
                results.append(c.retrieve("faces", "dup", request_id="dup-1"))
            except DprdmError as err:
                errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 16
    assert len({r.receipt.spend_id for r in results}) == 1
    assert sum(not r.receipt.replayed for r in results) == 1
    for r in results:
        np.testing.assert_array_equal(r.embedding, results[0].embedding)
    assert _spends(server) == 1


def test_reservation_without_release_is_an_error_never_a_fresh_draw(server):
    catalog = server.running.catalog
    plan = plan_query(catalog, Caller("alice", "tenant"), QueryArgs("faces", "default", "crashed", "id-crash"))
    ledger = server.running.ledger
    ledger.reserve(
        domain="corpus-a",
        tenant="alice",
        request_id="id-crash",
        binding_hash=plan.binding,
        profile={"name": "default"},
        charge_rdp=plan.profile.charge,
    )
    with Client(server.address, TENANT_TOKEN) as c:
        for _ in range(2):
            with pytest.raises(DprdmError) as err:
                c.retrieve("faces", "crashed", request_id="id-crash")
            assert (
                err.value.code == grpc.StatusCode.FAILED_PRECONDITION
                and err.value.reason == "RELEASE_MISSING"
            )
    assert _spends(server) == 1


def test_replay_survives_a_restart_and_is_bound_to_the_index_version(ledger_path):
    with (
        ServerThread(_config(), ledger=SqliteLedger(ledger_path)) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        first = c.retrieve("faces", "durable", request_id="id-3")
    with (
        ServerThread(_config(), ledger=SqliteLedger(ledger_path)) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        again = c.retrieve("faces", "durable", request_id="id-3")
        assert again.receipt.replayed and _spends(srv) == 1
        np.testing.assert_array_equal(first.embedding, again.embedding)
    with (
        ServerThread(_config("v2"), ledger=SqliteLedger(ledger_path)) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "durable", request_id="id-3")
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert _spends(srv) == 1


def test_generate_replays_the_release_of_a_retrieve(server):
    with Client(server.address, TENANT_TOKEN) as c:
        first = c.retrieve("faces", "then draw it", request_id="id-4")
        gen = c.generate("faces", "then draw it", request_id="id-4", steps=1)
    assert gen.receipt.replayed and gen.receipt.spend_id == first.receipt.spend_id
    assert _spends(server) == 1


def test_server_generated_request_ids_are_not_replayable(server):
    import dprdm.proto.v1.dprdm_pb2 as pb
    import dprdm.proto.v1.dprdm_pb2_grpc as pbg

    with grpc.insecure_channel(server.address) as ch:
        stub = pbg.DprdmStub(ch)
        meta = (("authorization", f"Bearer {TENANT_TOKEN}"),)
        req = pb.RetrieveRequest(index="faces", profile="default", prompt="no id")
        a, b = stub.Retrieve(req, metadata=meta), stub.Retrieve(req, metadata=meta)
    assert a.receipt.request_id.startswith("srv-") and a.receipt.request_id != b.receipt.request_id
    assert _spends(server) == 2


def test_reused_request_id_is_refused_even_when_its_new_input_has_a_stored_release(server):
    """Release reuse must not mask a request-id mismatch: (tenant, id) stays bound to its input."""
    with Client(server.address, TENANT_TOKEN) as c:
        c.retrieve("faces", "prompt A", request_id="id-A")
        c.retrieve("faces", "prompt B", request_id="id-B")  # a stored release of prompt B exists
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "prompt B", request_id="id-A")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == "REQUEST_ID_REUSED"
    assert _spends(server) == 2
