"""Concurrency exactness across processes on one file, and kill -9 safety, of the SQLite ledger.

SPEC §6: N concurrent requests against a budget admitting exactly M < N get exactly M admissions.
SPEC §11: kill -9 at any point loses no committed reservation and corrupts nothing.
Threads within one process, for every store, are in ``test_ledger_conformance.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dprdm.ledger import SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
BUDGET = Budget.single(1.0, 1e-7, PROFILE)


def expected_admissions(budget: Budget, charge: np.ndarray) -> int:
    """The oracle: how many identical charges ``Budget.admits`` accepts one after another."""
    spent, n = np.zeros(len(DEFAULT_ORDERS)), 0
    while budget.admits(spent, charge):
        spent, n = spent + charge, n + 1
    return n


WORKER = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    from dprdm.privacy import DEFAULT_ORDERS
    from dprdm.ledger import SqliteLedger
    from dprdm.ledger.api import BudgetExhausted

    path, name, group, attempts = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    charge = np.full(len(DEFAULT_ORDERS), float(sys.argv[5]))
    led = SqliteLedger(path, group_commit=group, busy_timeout_s=60)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    counts = {"admitted": 0, "refused": 0}
    lock = threading.Lock()

    def work(t):
        for i in range(attempts):
            try:
                led.reserve(domain="c", tenant=name, request_id=f"{t}-{i}", binding_hash="h",
                            profile={"p": 1}, charge_rdp=charge)
                key = "admitted"
            except BudgetExhausted:
                key = "refused"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led.close()
    print(json.dumps(counts), flush=True)
    """
)


PROC_CHARGE_VALUE = 0.0095  # M ~ 100: admissions span many transactions of every process
PROC_M = expected_admissions(BUDGET, np.full(len(DEFAULT_ORDERS), PROC_CHARGE_VALUE))


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
def test_processes_on_one_file_get_exactly_m_admissions(tmp_path, group_commit):
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.create_budget("c", BUDGET)
    n_procs, attempts = 4, 12  # 4 processes x 3 threads x 12 attempts = 144 > PROC_M
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), f"p{k}", "1" if group_commit else "0", str(attempts),
             repr(PROC_CHARGE_VALUE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for k in range(n_procs)
    ]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    counts = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(c["admitted"] for c in counts) == PROC_M
    assert sum(c["refused"] for c in counts) == n_procs * 3 * attempts - PROC_M
    assert sum(c["admitted"] > 0 for c in counts) >= 2  # the processes did interleave
    with SqliteLedger(path) as led:
        assert led.budget_state("c").spends == PROC_M
        led.verify()


CRASH_CHILD = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    from dprdm.privacy import DEFAULT_ORDERS
    from dprdm.ledger import SqliteLedger

    path, start = sys.argv[1], int(sys.argv[2])
    led = SqliteLedger(path, group_commit=True)
    charge = np.full(len(DEFAULT_ORDERS), 1e-5)
    out = threading.Lock()

    def work(t):
        i = 0
        while True:
            rid = f"{start}-{t}-{i}"
            res = led.reserve(domain="c", tenant="t", request_id=rid, binding_hash=rid,
                              profile={"p": 1}, charge_rdp=charge)
            with out:
                sys.stdout.write(f"R {res.spend_id}\\n")
                sys.stdout.flush()
            if i % 2 == 0:
                led.store_release(res.spend_id, np.full(4, float(i)))
                with out:
                    sys.stdout.write(f"S {res.spend_id}\\n")
                    sys.stdout.flush()
            i += 1

    for t in range(3):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


def _kill_rounds(path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)  # test scheduling only
    with SqliteLedger(path) as led:
        led.create_budget("c", Budget.single(50.0, 1e-7, PROFILE))
    reserved: set[str] = set()
    released: set[str] = set()
    last_spends, last_curve = 0, np.zeros(len(DEFAULT_ORDERS))
    for r in range(rounds):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), str(r)], stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(child.stdout,), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not lines and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.005)
        assert lines, "crash child never reserved"
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        reader.join()
        complete = [ln.split() for ln in lines if ln.endswith("\n")]
        reserved |= {sid for kind, sid in complete if kind == "R"}
        released |= {sid for kind, sid in complete if kind == "S"}
        with SqliteLedger(path) as led:
            led.verify()
            state = led.budget_state("c")
            trail = {s.spend_id: s.status for s in led.audit_trail("c", limit=100_000)}
        assert reserved <= trail.keys(), "a reservation reported as committed was lost"
        assert all(trail[sid] == "released" for sid in released)
        assert state.spends >= last_spends and (state.spent_rdp >= last_curve).all()
        assert state.spends == len(trail)
        last_spends, last_curve = state.spends, state.spent_rdp
    assert released, "the crash child never stored a release (is its store_release call current?)"


def test_kill_9_loses_no_committed_reservation(tmp_path):
    _kill_rounds(tmp_path / "l.db", rounds=4, seed=1)


@pytest.mark.slow
def test_kill_9_many_rounds(tmp_path):
    _kill_rounds(tmp_path / "l.db", rounds=25, seed=2)
