"""Refusal semantics: exhausted budget and quota, overload, short deadlines, cancellation after the
charge, and internal errors (opaque id, no traceback, charge kept)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2

from dprdm.clients.client import BudgetExhaustedError, Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.privacy import Budget, Profile
from dprdm.proto.v1 import dprdm_pb2, dprdm_pb2_grpc
from dprdm.server.testing import (
    OTHER_TOKEN,
    TENANT_TOKEN,
    ServerThread,
    epsilon_admitting,
    make_config,
    quota_admitting,
)

HARDENED_DIM = 16  # the fake index's dimension: private indexes default to the discrete Gaussian

PROFILE = Profile(k=5, q=0.5, sigma=0.5, lam=0.5)
DELTA = 1 / 4000


def _serve(tmp_path, **kw):
    return ServerThread(make_config(**kw), ledger=SqliteLedger(tmp_path / "ledger.sqlite3"))


def _spends(srv) -> int:
    return srv.running.ledger.budget_state("corpus-a").spends


def _wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_exhausted_budget_is_resource_exhausted_with_details(tmp_path):
    eps = epsilon_admitting(PROFILE, 2, DELTA, HARDENED_DIM)
    with (
        _serve(tmp_path, budgets={"corpus-a": {"epsilon": eps}}) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        c.retrieve("faces", "one")
        c.retrieve("faces", "two")
        for call in (lambda: c.retrieve("faces", "three"), lambda: c.generate("faces", "four", steps=1)):
            with pytest.raises(BudgetExhaustedError) as err:
                call()
            e = err.value
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "PRIVACY_BUDGET_EXHAUSTED"
            assert e.metadata["privacy_domain"] == "corpus-a" and float(e.metadata["epsilon_budget"]) == eps
            (qf,) = [d for d in e.details if isinstance(d, error_details_pb2.QuotaFailure)]
            assert qf.violations[0].subject == "privacy_domain:corpus-a"
        assert _spends(srv) == 2
        assert (
            c.retrieve("faces", "public", profile="public").receipt.epsilon_charged == 0.0
        )  # lambda = 0 still served
        assert c.budget("faces").epsilon_spent <= eps


def test_tenant_quota(tmp_path):
    domain_eps = epsilon_admitting(PROFILE, 40, DELTA, HARDENED_DIM)
    budget = Budget.single(domain_eps, DELTA, PROFILE, hardened_dimension=HARDENED_DIM, accountant="pld")
    quota = quota_admitting(budget, 1)  # quotas compare the PLD budget's receipts table
    budgets = {"corpus-a": {"epsilon": domain_eps, "delta": DELTA, "quotas": {"alice": quota}}}
    with (
        _serve(tmp_path, budgets=budgets) as srv,
        Client(srv.address, TENANT_TOKEN) as alice,
        Client(srv.address, OTHER_TOKEN) as bob,
    ):
        alice.retrieve("faces", "a1")
        with pytest.raises(BudgetExhaustedError) as err:
            alice.retrieve("faces", "a2")
        assert err.value.reason == "TENANT_QUOTA_EXHAUSTED" and err.value.metadata["tenant"] == "alice"
        bob.retrieve("faces", "b1")
        bob.retrieve("faces", "b2")
        assert _spends(srv) == 3


def test_overload_is_unavailable_and_charges_nothing(tmp_path):
    with _serve(tmp_path, server={"generation_workers": 1, "generation_queue": 0}) as srv:
        gen = srv.running.catalog.indexes["faces"].bundle.generator
        gen.gate = threading.Event()
        events: list = []
        with Client(srv.address, TENANT_TOKEN) as c:
            t = threading.Thread(target=lambda: events.extend(c.generate_events("faces", "busy", steps=2)))
            t.start()
            _wait_for(lambda: _spends(srv) == 1)
            with Client(srv.address, OTHER_TOKEN) as other, pytest.raises(DprdmError) as err:
                other.generate("faces", "refused", steps=1)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "OVERLOADED"
            assert any(isinstance(d, error_details_pb2.RetryInfo) for d in err.value.details)
            assert _spends(srv) == 1
            gen.gate.set()
            t.join(timeout=30)
        assert events[-1].HasField("done")


def test_deadline_too_short_charges_nothing(tmp_path):
    with (
        _serve(tmp_path, server={"min_deadline_seconds": 2.0}) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        for call in (
            lambda: c.retrieve("faces", "hurry", timeout=1.0),
            lambda: c.generate("faces", "hurry", steps=1, timeout=1.0),
        ):
            with pytest.raises(DprdmError) as err:
                call()
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)
        assert _spends(srv) == 0
        c.retrieve("faces", "relaxed", timeout=30)
        assert _spends(srv) == 1


def test_cancelled_retrieve_after_the_charge_keeps_charge_and_release(tmp_path):
    with _serve(tmp_path) as srv:
        index = srv.running.catalog.indexes["faces"].index
        index.gate = threading.Event()
        with grpc.insecure_channel(srv.address) as ch:
            stub = dprdm_pb2_grpc.DprdmStub(ch)
            req = dprdm_pb2.RetrieveRequest(
                index="faces", profile="default", prompt="cancel me", request_id="c-1"
            )
            future = stub.Retrieve.future(req, metadata=(("authorization", f"Bearer {TENANT_TOKEN}"),))
            _wait_for(lambda: _spends(srv) == 1)  # reserved; the search is blocked on the gate
            future.cancel()
            time.sleep(0.2)  # let the server see the cancellation while the query is past its charge
            index.gate.set()
        trail = srv.running.ledger.audit_trail("corpus-a")
        _wait_for(lambda: srv.running.ledger.audit_trail("corpus-a")[0].status == "released")
        with Client(srv.address, TENANT_TOKEN) as c:
            again = c.retrieve("faces", "cancel me", request_id="c-1")
        assert again.receipt.replayed and again.receipt.spend_id == trail[0].spend_id
        assert _spends(srv) == 1


def test_cancelled_generate_after_the_charge_keeps_it(tmp_path):
    with _serve(tmp_path) as srv:
        gen = srv.running.catalog.indexes["faces"].bundle.generator
        gen.gate = threading.Event()
        with Client(srv.address, TENANT_TOKEN) as c:
            stream = c._stub.Generate(
                dprdm_pb2.GenerateRequest(
                    index="faces", profile="default", prompt="g", request_id="c-2", steps=3
                ),
                metadata=c.settings.metadata(),
            )
            kinds = [next(stream).WhichOneof("event") for _ in range(2)]
            assert kinds == ["queued", "retrieved"]
            stream.cancel()
            gen.gate.set()
            _wait_for(lambda: srv.running.service.generation.inside == 0)
            again = c.generate("faces", "g", request_id="c-2", steps=1)
        assert again.receipt.replayed and len(again.images) == 1
        assert _spends(srv) == 1


def test_internal_error_before_the_charge_is_opaque_and_free(tmp_path, monkeypatch, caplog):
    with _serve(tmp_path) as srv, Client(srv.address, TENANT_TOKEN) as c:
        enc = srv.running.catalog.indexes["faces"].bundle.encoder

        def boom(texts):
            raise ValueError("secret value 0.123456")

        monkeypatch.setattr(enc, "encode_texts", boom)
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "x")
        e = err.value
        assert e.code == grpc.StatusCode.INTERNAL and e.reason == "INTERNAL"
        assert (
            "secret" not in e.message and "Traceback" not in e.message and e.metadata["error_id"] in e.message
        )
        assert _spends(srv) == 0


def test_internal_error_after_the_charge_keeps_it_and_never_redraws(tmp_path, monkeypatch):
    with _serve(tmp_path) as srv, Client(srv.address, TENANT_TOKEN) as c:
        index = srv.running.catalog.indexes["faces"].index

        def boom(*args, **kwargs):
            raise RuntimeError("survivors: 3")

        monkeypatch.setattr(index, "search_subsampled", boom)
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "after", request_id="i-1")
        assert err.value.code == grpc.StatusCode.INTERNAL and "survivors" not in err.value.message
        monkeypatch.undo()
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "after", request_id="i-1")
        assert err.value.reason == "RELEASE_MISSING"
        assert _spends(srv) == 1
