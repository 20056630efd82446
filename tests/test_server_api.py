"""The public API end to end: real in-process server (port 0), real stubs, the SQLite ledger."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Profile, epsilon_from_rdp, retrieval_rdp
from dprdm.privacy.pld import epsilon_pld
from dprdm.server.testing import ADMIN_TOKEN, OTHER_TOKEN, TENANT_TOKEN, ServerThread, make_config

HARDENED_DIM = 16  # the fake index's dimension: private indexes default to the discrete Gaussian

PROFILE = Profile(k=5, q=0.5, sigma=0.5, lam=0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ledger = SqliteLedger(tmp_path_factory.mktemp("api") / "ledger.sqlite3")
    with ServerThread(make_config(), ledger=ledger) as srv:
        yield srv


@pytest.fixture()
def alice(server):
    with Client(server.address, TENANT_TOKEN) as c:
        yield c


@pytest.fixture()
def admin(server):
    with Client(server.address, ADMIN_TOKEN) as c:
        yield c


def test_list_indexes_shows_public_facts_only(alice):
    (info,) = alice.list_indexes()
    assert (info.name, info.domain, info.dimension, info.public_size) == ("faces", "corpus-a", 16, 400)
    assert info.encoder.name == "fake" and info.private and info.generation
    assert {p.name for p in info.profiles} == {"default", "public"}
    prof = next(p for p in info.profiles if p.name == "default")
    # one mechanism (discrete noise): a PLD budget; one query costs its receipts table at T = 1, an upper
    # bound (rounded up) of the fine-grid PLD epsilon, below the RDP one
    rdp = epsilon_from_rdp(
        retrieval_rdp(PROFILE, orders=DEFAULT_ORDERS, hardened_dimension=HARDENED_DIM),
        DEFAULT_ORDERS,
        info.budget.delta,
    ).epsilon
    pld = epsilon_pld(profile=PROFILE, queries=1, delta=info.budget.delta, hardened_dimension=HARDENED_DIM)
    assert pld <= prof.epsilon_per_query < rdp
    assert prof.epsilon_per_query == pytest.approx(pld, rel=1e-3)
    assert info.budget.delta == pytest.approx(1 / (10 * 400))
    assert "200" not in str(info)  # the exact count N never reaches a tenant


def test_retrieve_returns_release_and_receipt(alice):
    before = alice.budget("faces").epsilon_spent
    res = alice.retrieve("faces", "a red square", request_id="api-retrieve-1")
    assert res.embedding.shape == (16,) and np.isfinite(res.embedding).all()
    r = res.receipt
    assert (
        r.spend_id and r.request_id == "api-retrieve-1" and r.profile == "default" and r.domain == "corpus-a"
    )
    assert r.epsilon_charged > 0 and not r.replayed and not r.reused
    after = alice.budget("faces")
    assert r.epsilon_spent == pytest.approx(after.epsilon_spent) and after.epsilon_spent > before
    assert r.epsilon_left == pytest.approx(after.epsilon - after.epsilon_spent)


def test_release_is_noisy_and_fresh_per_query(alice):
    a = alice.retrieve("faces", "fresh noise please", request_id="api-noise-1")
    b = alice.retrieve("faces", "fresh noise please (2)", request_id="api-noise-2")
    assert not np.allclose(a.embedding, b.embedding)


def test_lambda_zero_is_charged_zero_and_returns_the_query_embedding(alice, server):
    before = alice.budget("faces").epsilon_spent
    res = alice.retrieve("faces", "public only", profile="public")
    assert res.receipt.spend_id == "" and res.receipt.epsilon_charged == 0.0
    enc = server.running.catalog.indexes["faces"].bundle.encoder
    np.testing.assert_allclose(res.embedding, enc.encode_texts(["public only"])[0], rtol=1e-6)
    assert alice.budget("faces").epsilon_spent == before


def test_release_reuse_per_tenant(alice, server):
    first = alice.retrieve("faces", "reuse me", request_id="api-reuse-1")
    spent = alice.budget("faces").epsilon_spent
    again = alice.retrieve("faces", "reuse me", request_id="api-reuse-2")
    assert again.receipt.reused and again.receipt.epsilon_charged == 0.0
    assert again.receipt.spend_id == first.receipt.spend_id
    np.testing.assert_array_equal(again.embedding, first.embedding)
    assert alice.budget("faces").epsilon_spent == spent
    with Client(server.address, OTHER_TOKEN) as bob:  # never across tenants
        other = bob.retrieve("faces", "reuse me", request_id="api-reuse-3")
    assert not other.receipt.reused and other.receipt.spend_id != first.receipt.spend_id
    later = alice.retrieve("faces", "reuse me", request_id="api-reuse-4")  # after bob's spend
    now = alice.budget("faces")
    assert later.receipt.reused and later.receipt.epsilon_spent == pytest.approx(now.epsilon_spent)
    assert later.receipt.epsilon_spent > first.receipt.epsilon_spent  # current figures, not stale ones


def test_reuse_can_be_disabled(tmp_path):
    cfg = make_config(server={"reuse_releases": False})
    with (
        ServerThread(cfg, ledger=SqliteLedger(tmp_path / "l.sqlite3")) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        a = c.retrieve("faces", "same prompt")
        b = c.retrieve("faces", "same prompt")
        assert not b.receipt.reused and a.receipt.spend_id != b.receipt.spend_id


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_generate_streams_progress_images_and_receipt(alice):
    events = list(
        alice.generate_events("faces", "a blue circle", num_images=2, steps=4, seed=7, request_id="api-gen-1")
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued", "retrieved", *["progress"] * 4, "image", "image", "done"]
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3, 4]
    done = events[-1].done
    assert (
        done.seed == 7
        and done.num_images == 2
        and done.receipt.spend_id == events[1].retrieved.receipt.spend_id
    )
    img = _decode(events[6].image.png)
    assert img.shape == (8, 8, 3) and events[6].image.width == 8


def test_generate_regenerates_from_the_stored_release_for_free(alice):
    first = alice.generate("faces", "a green star", num_images=1, steps=2, seed=1, request_id="api-gen-2")
    spent = alice.budget("faces").epsilon_spent
    same = alice.generate("faces", "a green star", num_images=1, steps=2, seed=1, request_id="api-gen-2")
    assert same.receipt.replayed and alice.budget("faces").epsilon_spent == spent
    np.testing.assert_array_equal(_decode(first.images[0]), _decode(same.images[0]))
    other_seed = alice.generate(
        "faces", "a green star", num_images=1, steps=2, seed=2, request_id="api-gen-2"
    )
    assert not np.array_equal(_decode(first.images[0]), _decode(other_seed.images[0]))
    assert alice.budget("faces").epsilon_spent == spent


def test_generate_without_seed_reports_the_seed_used(alice):
    res = alice.generate("faces", "seedless", steps=1)
    assert res.seed > 0 and len(res.images) == 1


def test_generate_on_index_without_generator_is_failed_precondition(tmp_path):
    cfg = make_config(
        indexes={
            "vecs": {
                "path": "fake:domain=corpus-a",
                "bundle": "hash-16",
                "profiles": {"default": {"k": 3, "q": 0.5, "sigma": 1.0, "lambda": 0.5}},
            }
        }
    )
    with (
        ServerThread(cfg, ledger=SqliteLedger(tmp_path / "l.sqlite3")) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        spent = c.budget("vecs").epsilon_spent
        with pytest.raises(DprdmError) as err:
            c.generate("vecs", "x")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert c.budget("vecs").epsilon_spent == spent
        assert c.retrieve("vecs", "x").embedding.shape == (16,)


def test_get_budget_by_domain_and_quota(tmp_path):
    cfg = make_config(budgets={"corpus-a": {"epsilon": 20.0, "quotas": {"alice": 5.0}}})
    with (
        ServerThread(cfg, ledger=SqliteLedger(tmp_path / "l.sqlite3")) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        c.retrieve("faces", "quota")
        b = c.budget(domain="corpus-a")
        assert b.quota.tenant == "alice" and b.quota.epsilon_quota == 5.0 and b.quota.epsilon_spent > 0
        assert b.rule == "single_profile" and "add/remove" in b.neighbouring
        with Client(srv.address, OTHER_TOKEN) as bob:
            assert not bob.budget("faces").HasField("quota")


def test_admin_counts_audit_and_quotas(alice, admin):
    alice.retrieve("faces", "audited", request_id="api-audit-1")
    counts = admin.counts("corpus-a")
    assert counts.indexes[0].exact_size == 200 and counts.indexes[0].public_size == 400
    trail = admin.audit_trail("corpus-a", limit=10_000)
    assert len(trail) == counts.spends
    row = next(s for s in trail if s.request_id == "api-audit-1")
    assert row.tenant == "alice" and row.status == "released" and row.profile.k == 5
    assert getattr(row.profile, "lambda") == 0.5
    assert admin.quotas("corpus-a") == []


def test_admin_create_budget(admin):
    b = admin.create_budget(
        "corpus-new", 3.0, 1e-6, [{"k": 4, "q": 0.1, "sigma": 1.0, "lambda": 0.5}], quotas={"alice": 1.0}
    )
    assert b.rule == "single_profile" and b.epsilon == 3.0 and b.epsilon_spent == 0.0
    f = admin.create_budget(
        "corpus-filter",
        3.0,
        1e-6,
        [{"k": 4, "q": 0.1, "sigma": 1.0, "lambda": 0.5}, {"k": 8, "q": 0.2, "sigma": 1.0, "lambda": 0.5}],
    )
    assert f.rule == "renyi_filter" and f.filter_order > 1
    with pytest.raises(DprdmError) as err:
        admin.create_budget("corpus-new", 3.0, 1e-6, [{"k": 4, "q": 0.1, "sigma": 1.0, "lambda": 0.5}])
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert [q.tenant for q in admin.quotas("corpus-new")] == ["alice"]
    with pytest.raises(DprdmError) as err:
        admin.counts("no-such-domain")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_fixed_response_time(tmp_path):
    import time

    cfg = make_config(server={"fixed_response_seconds": 0.3})
    with (
        ServerThread(cfg, ledger=SqliteLedger(tmp_path / "l.sqlite3")) as srv,
        Client(srv.address, TENANT_TOKEN) as c,
    ):
        for prompt in ("fixed a", "fixed b"):
            t = time.monotonic()
            c.retrieve("faces", prompt)
            assert time.monotonic() - t >= 0.3


def test_admin_calls_are_answered_while_every_query_thread_is_busy(server, admin):
    """Admin calls run on their own threads: with the query pool saturated, Counts still answers
    (it used to queue behind the queries), and Retrieve waits until a query thread is free."""
    import threading

    release = threading.Event()
    pool = server.running.service._pool
    busy = [pool.submit(release.wait, 60) for _ in range(pool._max_workers)]
    try:
        with Client(server.address, ADMIN_TOKEN, timeout=10.0) as a:
            assert a.counts("corpus-a").indexes[0].exact_size == 200
    finally:
        release.set()
        for f in busy:
            f.result(timeout=60)
    assert server.running.admin is not None and server.running.admin._executor is not pool
