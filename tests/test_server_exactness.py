"""Concurrency exactness (SPEC §6): a budget admitting exactly M queries, 4M requests from 32
concurrent clients, exactly M admitted, the rest refused with RESOURCE_EXHAUSTED; the ledger and
GetBudget agree. Real server, real stubs, the SQLite ledger (group commit)."""

from __future__ import annotations

import math
import queue
import threading

import grpc
import numpy as np
import pytest

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Profile, filter_capacity, retrieval_rdp
from dprdm.server.testing import (
    ADMIN_TOKEN,
    OTHER_TOKEN,
    TENANT_TOKEN,
    ServerThread,
    epsilon_admitting,
    make_config,
)

HARDENED_DIM = 16  # the fake index's dimension: private indexes default to the discrete Gaussian

CLIENTS = 32
DELTA = 1e-5
A_STAR = 8.0


def _profile_doc(p: Profile) -> dict:
    return {"k": p.k, "q": p.q, "sigma": p.sigma, "lambda": p.lam}


def _single_epsilon(p: Profile, m: int) -> float:
    """Admits exactly m queries under the default accountant (PLD: one mechanism, discrete noise)."""
    return epsilon_admitting(p, m, DELTA, HARDENED_DIM)


def _filter_epsilon(capacity: float) -> float:
    """The epsilon whose filter capacity at A_STAR is ``capacity``."""
    return capacity - filter_capacity(0.0, DELTA, A_STAR)


def _r(p: Profile) -> float:
    return float(retrieval_rdp(p, orders=[A_STAR], hardened_dimension=HARDENED_DIM)[0])


def _hammer(address: str, jobs: list[tuple[str, str]]) -> tuple[list, list, list]:
    """Run (profile, prompt) jobs from CLIENTS threads, each with its own channel."""
    work: queue.Queue = queue.Queue()
    for job in jobs:
        work.put(job)
    ok, refused, other = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        token = TENANT_TOKEN if i % 2 else OTHER_TOKEN
        with Client(address, token, timeout=120) as c:
            c.list_indexes()  # connect before the race
            start.wait()
            while True:
                try:
                    profile, prompt = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    res = c.retrieve("faces", prompt, profile=profile)
                    with lock:
                        ok.append((profile, res))
                except DprdmError as err:
                    with lock:
                        (refused if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else other).append(
                            (profile, err)
                        )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok, refused, other


def _serve(tmp_path, profiles: dict[str, Profile], budget: dict):
    cfg = make_config(
        indexes={
            "faces": {
                "path": "fake:domain=corpus-x,n=300,dim=16,public=1000",
                "bundle": "hash-16",
                "profiles": {n: _profile_doc(p) for n, p in profiles.items()},
            }
        },
        budgets={"corpus-x": {"delta": DELTA, **budget}},
        server={"query_threads": 8},
    )
    return ServerThread(cfg, ledger=SqliteLedger(tmp_path / "ledger.sqlite3"))


def _check_agreement(srv, admitted: int) -> None:
    state = srv.running.ledger.budget_state("corpus-x")
    assert state.spends == admitted
    with Client(srv.address, TENANT_TOKEN) as c:
        assert c.budget("faces").epsilon_spent == pytest.approx(state.epsilon_spent, rel=1e-12, abs=0)
    with Client(srv.address, ADMIN_TOKEN) as a:
        trail = a.audit_trail("corpus-x", limit=10_000)
        assert len(trail) == admitted and all(s.status == "released" for s in trail)
        assert len({s.spend_id for s in trail}) == admitted
        assert a.counts("corpus-x").spends == admitted


CASES = [
    (1, Profile(k=5, q=0.5, sigma=0.8, lam=0.5), "single"),
    (6, Profile(k=5, q=0.5, sigma=0.8, lam=0.5), "single"),
    (13, Profile(k=10, q=0.2, sigma=0.5, lam=0.7), "single"),
    (4, Profile(k=5, q=0.5, sigma=0.8, lam=0.5), "filter"),
    (17, Profile(k=8, q=0.1, sigma=0.6, lam=1.0), "filter"),
]


@pytest.mark.parametrize(("m", "profile", "rule"), CASES)
def test_exactly_m_admitted(tmp_path, m, profile, rule):
    if rule == "single":
        budget = {"epsilon": _single_epsilon(profile, m), "rule": "single"}
    else:
        budget = {
            "epsilon": _filter_epsilon((m + 0.5) * _r(profile)),
            "rule": "filter",
            "filter_order": A_STAR,
        }
    with _serve(tmp_path, {"default": profile}, budget) as srv:
        ok, refused, other = _hammer(srv.address, [("default", f"prompt {i}") for i in range(4 * m)])
        assert other == []
        assert len(ok) == m and len(refused) == 3 * m
        assert all(e.reason == "PRIVACY_BUDGET_EXHAUSTED" for _p, e in refused)
        _check_agreement(srv, m)
        expected = retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=HARDENED_DIM) * m
        np.testing.assert_allclose(
            srv.running.ledger.budget_state("corpus-x").spent_rdp, expected, rtol=1e-12
        )
        assert max(r.receipt.epsilon_spent for _p, r in ok) <= budget["epsilon"] or rule == "filter"


def test_filter_with_several_profiles_never_overspends(tmp_path):
    small, large = Profile(k=5, q=0.2, sigma=0.8, lam=0.5), Profile(k=5, q=0.5, sigma=0.6, lam=0.5)
    capacity = 9.5 * _r(large)
    budget = {"epsilon": _filter_epsilon(capacity), "rule": "filter", "filter_order": A_STAR}
    with _serve(tmp_path, {"small": small, "large": large}, budget) as srv:
        jobs = [("small" if i % 3 else "large", f"p{i}") for i in range(120)]
        ok, refused, other = _hammer(srv.address, jobs)
        assert other == [] and len(ok) + len(refused) == 120
        charged = sum(_r(small if p == "small" else large) for p, _r_ in ok)
        assert charged <= capacity * (1 + 1e-12)
        _check_agreement(srv, len(ok))
        state = srv.running.ledger.budget_state("corpus-x")
        idx = DEFAULT_ORDERS.index(A_STAR)
        assert state.spent_rdp[idx] == pytest.approx(charged, rel=1e-12)
        with Client(srv.address, TENANT_TOKEN) as c:  # whatever is refused now really does not fit
            for name, prof in (("small", small), ("large", large)):
                try:
                    c.retrieve("faces", f"last {name}", profile=name)
                    state = srv.running.ledger.budget_state("corpus-x")
                    assert state.spent_rdp[idx] <= capacity * (1 + 1e-12)
                except DprdmError as err:
                    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    spent = srv.running.ledger.budget_state("corpus-x").spent_rdp[idx]
                    assert spent + _r(prof) > capacity
        assert not math.isnan(state.epsilon_spent)
