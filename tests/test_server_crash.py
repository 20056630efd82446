"""Crash safety (SPEC §11): a server process SIGKILLed at random moments under load.

After every kill, with the real SQLite ledger: no committed reservation is lost, none is double
counted (the running curve equals the sum of the spends, ids are unique), spent epsilon never
decreases and never exceeds the budget, every release a client received has its reservation (and
its stored release) in the ledger, and replays after the restart return the stored release or
``RELEASE_MISSING``, never a fresh draw for a committed reservation.

Servers are forked from a "zygote" process that imported everything once
(``tests/crash_server.py``), so a restart takes ~0.1 s and the default suite affords 20 kills;
the slow-marked test does 100.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.privacy import Profile
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, epsilon_admitting

HARDENED_DIM = 16  # the fake index's dimension: private indexes default to the discrete Gaussian

PROFILE = Profile(k=5, q=0.2, sigma=1.0, lam=0.5)
DELTA = 1e-5
CLIENTS = 8


def _toml(tmp_path, max_queries: int) -> str:
    eps = epsilon_admitting(PROFILE, max_queries, DELTA, HARDENED_DIM)
    return f"""
[server]
listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
query_threads = 4

[[tokens]]
tenant = "alice"
role = "tenant"
token = "{TENANT_TOKEN}"

[[tokens]]
tenant = "root"
role = "admin"
token = "{ADMIN_TOKEN}"

[indexes.faces]
path = "fake:domain=corpus-a,n=300,dim=16,public=1000,sleep=0.003"
bundle = "hash-16"

[indexes.faces.profiles.default]
k = {PROFILE.k}
q = {PROFILE.q}
sigma = {PROFILE.sigma}
lambda = {PROFILE.lam}

[budgets.corpus-a]
epsilon = {eps!r}
delta = {DELTA!r}
"""


class Zygote:
    """Forks server processes on demand; each one can be SIGKILLed."""

    def __init__(self, config_path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "crash_server.py"), "--config", config_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline().split()[1])
        line = self.proc.stdout.readline()
        assert "listening on port" in line, line
        return pid, f"127.0.0.1:{int(line.split()[-1])}"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class Observed:
    """What clients saw, across all rounds."""

    received: dict[str, tuple[str, np.ndarray, float]] = field(
        default_factory=dict
    )  # rid -> (spend, release, spent)
    in_flight: set[str] = field(default_factory=set)  # sent, answer unknown (the server died)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(address: str, round_no: int, observed: Observed, stop: threading.Event) -> list[threading.Thread]:
    def client(tid: int) -> None:
        with Client(address, TENANT_TOKEN, timeout=10) as c:
            n = 0
            while not stop.is_set():
                rid = f"r{round_no}-c{tid}-{n}"
                n += 1
                try:
                    res = c.retrieve("faces", f"prompt {rid}", request_id=rid)
                except DprdmError as err:
                    with observed.lock:
                        if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            observed.refused += 1
                            continue
                        observed.in_flight.add(rid)
                    return
                with observed.lock:
                    observed.received[rid] = (res.receipt.spend_id, res.embedding, res.receipt.epsilon_spent)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def _check_ledger(path, observed: Observed, last_spent: float, max_queries: int) -> tuple[float, dict]:
    """Invariants on the ledger file of a killed server. Returns (spent epsilon, rid -> spend row)."""
    with SqliteLedger(path, group_commit=False) as ledger:
        ledger.verify("corpus-a")  # running curve == sum of the spends, counts match
        state = ledger.budget_state("corpus-a")
        trail = ledger.audit_trail("corpus-a", limit=100_000)
    rows = {s.request_id: s for s in trail}
    assert len(trail) == state.spends == len(rows) == len({s.spend_id for s in trail})
    assert state.spends <= max_queries
    if observed.refused:
        assert state.spends == max_queries  # refusals happen only when the budget is full
    assert state.epsilon_spent >= last_spent
    with observed.lock:
        for rid, (spend_id, _release, spent) in observed.received.items():
            row = rows.get(rid)
            assert row is not None, f"client got a release for {rid} whose reservation is not in the ledger"
            assert row.spend_id == spend_id and row.status == "released"
            assert spent <= state.epsilon_spent * (1 + 1e-12)
    return state.epsilon_spent, rows


def _check_replays(address: str, observed: Observed, rows: dict, rng: random.Random) -> None:
    with observed.lock:
        received = rng.sample(sorted(observed.received), min(3, len(observed.received)))
        in_flight = sorted(observed.in_flight)
        observed.in_flight.clear()
    with Client(address, TENANT_TOKEN, timeout=10) as c:
        for rid in received:
            spend_id, release, _ = observed.received[rid]
            res = c.retrieve("faces", f"prompt {rid}", request_id=rid)
            assert res.receipt.replayed and res.receipt.spend_id == spend_id
            np.testing.assert_array_equal(res.embedding, release)
        for rid in in_flight:
            row = rows.get(rid)
            try:
                res = c.retrieve("faces", f"prompt {rid}", request_id=rid)
            except DprdmError as err:
                if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert row is None
                    continue
                assert err.reason == "RELEASE_MISSING" and row is not None and row.status == "reserved"
                continue
            if row is not None:  # committed before the kill: must be the stored release
                assert (
                    row.status == "released" and res.receipt.replayed and res.receipt.spend_id == row.spend_id
                )
            else:  # never committed: a new query, charged now
                assert not res.receipt.replayed
            with observed.lock:
                observed.received[rid] = (res.receipt.spend_id, res.embedding, res.receipt.epsilon_spent)


def _crash_loop(tmp_path, kills: int, max_queries: int, seed: int) -> Observed:
    rng = random.Random(seed)
    cfg = tmp_path / "server.toml"
    cfg.write_text(_toml(tmp_path, max_queries))
    zygote = Zygote(str(cfg))
    observed, last_spent, rows = Observed(), 0.0, {}
    ledger_path = tmp_path / "data" / "ledger.sqlite3"
    try:
        for round_no in range(kills):
            pid, address = zygote.start()
            try:
                _check_replays(address, observed, rows, rng)
                stop = threading.Event()
                threads = _load(address, round_no, observed, stop)
                time.sleep(rng.uniform(0.02, 0.35))
            finally:
                os.kill(pid, signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            last_spent, rows = _check_ledger(ledger_path, observed, last_spent, max_queries)
        pid, address = zygote.start()
        try:
            _check_replays(address, observed, rows, rng)
            with Client(address, TENANT_TOKEN) as c:
                assert c.budget("faces").epsilon_spent == pytest.approx(last_spent, rel=1e-12) or rows
        finally:
            os.kill(pid, signal.SIGKILL)
        _check_ledger(ledger_path, observed, last_spent, max_queries)
    finally:
        zygote.close()
    return observed


def test_sigkill_under_load(tmp_path):
    observed = _crash_loop(tmp_path, kills=12, max_queries=10_000, seed=1)
    assert len(observed.received) > 0


def test_sigkill_until_the_budget_is_exhausted(tmp_path):
    observed = _crash_loop(tmp_path, kills=10, max_queries=60, seed=2)
    assert observed.refused > 0  # the budget ran out across crashes, and was never exceeded


@pytest.mark.slow
def test_sigkill_many_times(tmp_path):
    _crash_loop(tmp_path, kills=100, max_queries=1500, seed=3)
