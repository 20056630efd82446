"""The PostgreSQL ledger on a REAL PostgreSQL server (``pg_server`` in ``conftest.py``): what the
conformance suite cannot state for one process (SPEC §6, issue 14).

* Exact admission from 3 OS processes x 4 threads: a budget for exactly M reservations, 4M
  attempts, exactly M granted; two ledgers in one process see each other's spends.
* A concurrent insert of one (tenant, request id) by two ledgers is retried inside the ledger and
  answered as a replay or a mismatch, never as an error.
* The database stopped under load (``pg_ctl stop -m fast``, down for longer than a call waits,
  then started): calls fail with LedgerUnavailable while it is down, the pools reconnect, every
  receipt a caller got is in the ledger, nothing is granted twice, the budget ends with exactly
  M spends (never more), and the running curves still add up (``verify``).
* The schema: created once by concurrent openers, its version and grid checked at open, foreign
  tables refused; bad URLs and an unreachable server named in one line (no password).

Nothing here asserts a wall-clock time: waits are bounded polls of a condition.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import psycopg
import pytest
from test_ledger_conformance import expected_admissions  # the oracle

from dprdm.ledger import LedgerUnavailable, SchemaMismatch, open_ledger, parse_ledger_url
from dprdm.ledger.api import BudgetExhausted, LedgerCorrupt, ReleaseMissing, ReplayMismatch
from dprdm.ledger.postgres import PostgresLedger
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
BUDGET = Budget.single(1.0, 1e-7, PROFILE)


CHARGE_VALUE = 0.0095  # M ~ 100: admissions span many transactions of every process
CHARGE = np.full(len(DEFAULT_ORDERS), CHARGE_VALUE)
M = expected_admissions(BUDGET, CHARGE)
LARGE = Budget.single(3.0, 1e-7, PROFILE)  # ~300 admissions: not exhausted before the restart
M_LARGE = expected_admissions(LARGE, CHARGE)


def _reserve(led, rid: str, *, tenant: str = "t", domain: str = "c", binding: str = "h"):
    return led.reserve(domain=domain, tenant=tenant, request_id=rid, binding_hash=binding, profile={"p": 1},
                       charge_rdp=CHARGE)  # fmt: skip


def _wait_for(cond: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------ exact admission

WORKER = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    from dprdm.privacy import DEFAULT_ORDERS
    from dprdm.ledger import open_ledger
    from dprdm.ledger.api import BudgetExhausted

    url, name, group, attempts = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    charge = np.full(len(DEFAULT_ORDERS), float(sys.argv[5]))
    led = open_ledger(url, group_commit=group)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    admitted, refused = [], [0]
    lock = threading.Lock()

    def work(t):
        for i in range(attempts):
            try:
                res = led.reserve(domain="c", tenant=name, request_id=f"{t}-{i}", binding_hash="h",
                                  profile={"p": 1}, charge_rdp=charge)
                with lock:
                    admitted.append(res.spend_id)
            except BudgetExhausted:
                with lock:
                    refused[0] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = led.stats()
    led.close()
    print(json.dumps({"admitted": admitted, "refused": refused[0], "retries": stats["retries"]}), flush=True)
    """
)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
def test_three_processes_get_exactly_m_admissions(pg_server, group_commit):
    url = pg_server.new_url()
    with open_ledger(url) as led:
        led.create_budget("c", BUDGET)
    attempts = (4 * M) // 12 + 1  # 3 processes x 4 threads x attempts >= 4M
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, f"p{i}", "1" if group_commit else "0", str(attempts), str(CHARGE_VALUE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    granted = [s for r in results for s in r["admitted"]]
    assert len(granted) == M and len(set(granted)) == M
    assert sum(r["refused"] for r in results) == 12 * attempts - M >= 3 * M
    assert sum(1 for r in results if r["admitted"]) >= 2  # the processes really raced for the budget
    with open_ledger(url) as led:
        state = led.budget_state("c")
        assert state.spends == M and state.epsilon_spent <= BUDGET.epsilon
        assert {s.spend_id for s in led.audit_trail("c", limit=10_000)} == set(granted)
        np.testing.assert_array_equal(state.spent_rdp, sum((CHARGE for _ in range(M)), np.zeros_like(CHARGE)))
        led.verify()


def test_two_ledgers_in_one_process_see_each_others_spends(pg_server):
    url = pg_server.new_url()
    a, b = open_ledger(url), open_ledger(url, group_commit=False)
    try:
        a.create_budget("c", BUDGET)
        granted = 0
        for i in range(2 * M):
            try:
                _reserve(a if i % 2 else b, f"r{i}")
                granted += 1
            except BudgetExhausted:
                pass
        assert granted == M
        assert a.budget_state("c").spends == b.budget_state("c").spends == M
        a.verify()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("same_domain", [True, False], ids=["same-domain", "other-domain"])
def test_one_request_id_from_two_ledgers_at_once_is_charged_once(pg_server, same_domain):
    url = pg_server.new_url()
    a, b = open_ledger(url), open_ledger(url)
    try:
        a.create_budget("c", BUDGET)
        a.create_budget("d", BUDGET)
        def go(led, domain: str, rid: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            try:
                _reserve(led, rid, domain=domain)
                outcomes.append("admitted")
            except (ReleaseMissing, ReplayMismatch) as exc:
                outcomes.append(type(exc).__name__)

        for round_ in range(6):
            barrier, outcomes = threading.Barrier(2), []
            threads = [threading.Thread(target=go, args=(led, domain, f"same-{round_}", barrier, outcomes))
                       for led, domain in ((a, "c"), (b, "c" if same_domain else "d"))]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            other = "ReleaseMissing" if same_domain else "ReplayMismatch"
            assert sorted(outcomes) == sorted(["admitted", other])
        spends = a.budget_state("c").spends + a.budget_state("d").spends
        assert spends == 6
        a.verify()
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- database restart


def test_database_down_under_load_loses_nothing_and_grants_nothing_twice(pg_server):
    url = pg_server.new_url()
    leds = [open_ledger(url, connect_timeout_s=0.5), open_ledger(url, group_commit=False, connect_timeout_s=0.5)]
    observed: list[LedgerUnavailable | None] = []
    leds[0].add_commit_observer(observed.append)
    leds[0].create_budget("c", LARGE)
    receipts: dict[str, tuple[str, str]] = {}  # spend id -> (tenant, request id) of every receipt a caller got
    unavailable: list[str] = []
    other: list[BaseException] = []
    exhausted: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def worker(t: int) -> None:
        led, tenant, i = leds[t % 2], f"w{t}", 0
        while not stop.is_set():
            rid = f"r{i}"
            try:
                res = _reserve(led, rid, tenant=tenant)
                with lock:  # a replay (its release committed, the caller was told it might not have) is that spend
                    assert receipts.get(res.spend_id) == (tenant, rid) if res.replay else res.spend_id not in receipts
                    receipts[res.spend_id] = (tenant, rid)
                if not res.replay:
                    led.store_release(res.spend_id, np.array([float(t), float(i)]))
                i += 1
                time.sleep(0.01)  # the budget lasts across the restart
            except LedgerUnavailable as exc:
                with lock:
                    unavailable.append(exc.cause)
                time.sleep(0.02)  # retry the same request id (nothing charged, or ReleaseMissing)
            except (BudgetExhausted, ReleaseMissing) as exc:
                if isinstance(exc, BudgetExhausted):
                    with lock:
                        exhausted.add(t)
                i += 1
                time.sleep(0.01)
            except BaseException as exc:  # noqa: BLE001  (anything else fails the test below)
                with lock:
                    other.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(receipts) >= 5, "the first reservations")
        pg_server.stop()  # pg_ctl stop -m fast: every connection is cut
        _wait_for(lambda: len(unavailable) >= 2, "calls refused while the database is down")
        assert observed and observed[-1] is not None  # the commit observers (health) were told
        pg_server.start()
        before = len(receipts)
        _wait_for(lambda: len(exhausted) == 6, "every worker refused at exhaustion")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert other == []
    assert observed[-1] is None  # commits again
    check = open_ledger(url)
    try:
        trail = {s.spend_id: (s.tenant, s.request_id) for s in check.audit_trail("c", limit=10_000)}
        assert receipts.items() <= trail.items()  # every receipt a caller got is in the ledger
        state = check.budget_state("c")
        assert state.spends == len(trail) == M_LARGE and state.epsilon_spent <= LARGE.epsilon  # exactly M
        check.verify()
        assert len(receipts) > before  # the pools reconnected: new charges committed after the restart
    finally:
        check.close()
        for led in leds:
            led.close()


# ------------------------------------------------------------------------------------ schema


def test_concurrent_openers_create_the_schema_once(pg_server):
    url = pg_server.new_url()
    opened: list[PostgresLedger] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(open_ledger(url))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    opened[0].create_budget("c", BUDGET)
    assert all(led.domains() == ["c"] for led in opened)
    for led in opened:
        led.close()


def _sql(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


def test_schema_version_and_grid_are_checked_at_open(pg_server):
    url = pg_server.new_url()
    open_ledger(url).close()
    _sql(url, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match="schema version '99'; this code reads 1"):
        open_ledger(url)
    _sql(url, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    _sql(url, "UPDATE meta SET value = '[2.0, 4.0]' WHERE key = 'orders'")
    with pytest.raises(SchemaMismatch, match="another Rényi order grid"):
        open_ledger(url)


def test_foreign_tables_and_an_empty_schema_without_create(pg_server):
    url = pg_server.new_url()
    with pytest.raises(SchemaMismatch, match="no dprdm ledger tables") as info:
        open_ledger(url, create=False)
    assert getattr(info.value, "empty", False)
    _sql(url, "CREATE TABLE accounts (id int)")
    with pytest.raises(SchemaMismatch, match="not a dprdm ledger"):
        open_ledger(url)


def test_a_corrupt_count_is_found_at_open(pg_server):
    url = pg_server.new_url()
    with open_ledger(url) as led:
        led.create_budget("c", BUDGET)
        _reserve(led, "r0")
    _sql(url, "UPDATE budgets SET spends = 5")
    with pytest.raises(LedgerCorrupt, match="records 5 spends but has 1"):
        open_ledger(url)


# ---------------------------------------------------------------------------------- bad URLs


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("mysql://u@h/db", "unknown scheme 'mysql'"),
        ("sqlite://", "has no file"),
        ("postgresql://u:secret@h:notaport/db", "is malformed"),
        ("postgresql://", "names no host and no database"),
        ("postgresql:db", "is not postgresql://"),
        ("", "non-empty string"),
    ],
)
def test_bad_urls_are_named_in_one_line(url, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_ledger_url(url)
    text = str(info.value)
    assert "\n" not in text and "secret" not in text


def test_a_bad_parameter_and_an_unreachable_server_are_named(pg_server):
    with pytest.raises(ValueError, match='invalid URI query parameter: "nope"'):
        open_ledger(pg_server.url() + "?nope=1")
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LedgerUnavailable, match="refused") as info:
        open_ledger(f"postgresql://u:secret@127.0.0.1:{port}/db", connect_timeout_s=2)
    assert "secret" not in str(info.value) and f"postgresql://u:***@127.0.0.1:{port}/db" in str(info.value)


def test_sqlite_urls_open_the_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_ledger_url("sqlite:///rel/ledger.db") == ("sqlite", "rel/ledger.db")
    assert parse_ledger_url(f"sqlite:///{tmp_path}/abs.db") == ("sqlite", str(tmp_path / "abs.db"))
    with open_ledger("sqlite:///here.db") as led:
        led.create_budget("c", BUDGET)
    assert (tmp_path / "here.db").is_file()
    with open_ledger(tmp_path / "here.db") as led:
        assert led.domains() == ["c"]


# ------------------------------------------------------------------------------ a live server


def test_a_server_on_postgres_answers_follows_the_database_and_refuses_at_exhaustion(pg_server):
    import grpc
    from google.rpc import error_details_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from test_server_exactness import DELTA, _check_agreement, _hammer, _profile_doc, _single_epsilon

    from dprdm.clients.client import Client, DprdmError
    from dprdm.server.config import parse_config
    from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config

    profile, m = Profile(k=5, q=0.5, sigma=0.8, lam=0.5), 6
    url = pg_server.new_url()
    base = make_config(
        indexes={"faces": {"path": "fake:domain=corpus-x,n=300,dim=16,public=1000", "bundle": "hash-16",
                           "profiles": {"default": _profile_doc(profile)}}},
        budgets={"corpus-x": {"delta": DELTA, "epsilon": _single_epsilon(profile, m), "rule": "single"}},
    )  # fmt: skip
    cfg = replace(base, ledger=parse_config({"ledger": {"url": url}}).ledger)  # as `[ledger] url = "..."`

    def health(srv: ServerThread) -> int:
        with grpc.insecure_channel(srv.address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status

    with ServerThread(cfg) as srv:
        assert isinstance(srv.running.ledger, PostgresLedger)
        srv.running.ledger_health.probe_seconds = 0.05
        with Client(srv.address, TENANT_TOKEN, timeout=60) as c:
            assert c.retrieve("faces", "before").receipt.epsilon_charged > 0
            pg_server.stop()
            with pytest.raises(DprdmError) as info:
                c.retrieve("faces", "while down", request_id="down-1")
            err = info.value
            assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "LEDGER_UNAVAILABLE"
            assert any(isinstance(d, error_details_pb2.RetryInfo) for d in err.details)
            assert "127.0.0.1" not in err.message and str(pg_server.port) not in err.message
            _wait_for(lambda: health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
            pg_server.start()
            _wait_for(lambda: health(srv) == health_pb2.HealthCheckResponse.SERVING, "health SERVING again")
            again = c.retrieve("faces", "while down", request_id="down-1")  # the refused id was never charged
            assert not again.receipt.replayed
        ok, refused, other = _hammer(srv.address, [("default", f"prompt {i}") for i in range(4 * m)])
        assert other == [] and len(ok) == m - 2 and len(refused) == 4 * m - (m - 2)
        assert all(e.reason == "PRIVACY_BUDGET_EXHAUSTED" for _p, e in refused)
        _check_agreement(srv, m)
        srv.running.ledger.verify()


def test_ledger_section_of_the_server_configuration(tmp_path):
    from dprdm.server.config import ConfigError, parse_config

    assert parse_config({}).ledger.url is None  # default: SQLite in data_dir
    url = "postgresql://dprdm@db.internal:5432/dprdm?sslmode=require"
    assert parse_config({"ledger": {"url": url}}).ledger.url == url
    rel = parse_config({"ledger": {"url": "sqlite:///ledgers/a.db"}}, base_dir=tmp_path).ledger.url
    assert rel == f"sqlite:///{tmp_path}/ledgers/a.db"  # relative to the configuration file
    for doc, match in (
        ({"ledger": {"url": "mysql://u:pw@h/db"}}, r"^ledger\.url: ledger URL 'mysql://u:\*\*\*@h/db': unknown scheme"),
        ({"ledger": {"url": 5}}, r"^ledger\.url: must be str"),
        ({"ledger": {"path": "x"}}, r"^ledger\.path: unknown key"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config(doc)


def test_serve_check_on_postgres_only_reads(pg_server):
    from dprdm.server.app import check_server
    from dprdm.server.config import LedgerConfig
    from dprdm.server.errors import StartupError
    from dprdm.server.testing import fake_loaders, make_config

    url = pg_server.new_url()
    cfg = replace(make_config(), ledger=LedgerConfig(url=url))
    lines = check_server(cfg, loaders=fake_loaders())
    assert any(line.startswith("ledger: postgresql://") and "(new:" in line for line in lines)
    with psycopg.connect(url) as conn:  # nothing was created
        assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
                            ).fetchone() == (0,)  # fmt: skip
    with open_ledger(url) as led:
        led.create_budget("corpus-a", BUDGET)
        _reserve(led, "r0", domain="corpus-a")
    with pytest.raises(StartupError, match="budgets.corpus-a: the ledger already holds a different budget"):
        check_server(cfg, loaders=fake_loaders())  # the database's budget was read (and is authoritative)
    with open_ledger(url) as led:
        assert led.budget_state("corpus-a").budget == BUDGET and led.budget_state("corpus-a").spends == 1


def test_the_benchmarks_postgres_part_runs_end_to_end(pg_server, tmp_path):
    from dprdm.benchmarks import ledger as bench
    from dprdm.benchmarks.ledger_pg import splits

    assert splits(1) == [1] and splits(4) == [2, 1, 1] and splits(64) == [22, 21, 21]
    bench.main(["--seconds", "0.2", "--threads", "1", "--postgres", pg_server.url(), "--skip-sqlite",
                "--out", str(tmp_path)])  # fmt: skip
    (result,) = tmp_path.glob("ledger-*.json")
    runs = json.loads(result.read_text())["postgres"]["runs"]
    assert [(r["kind"], r["writers"], r["processes"]) for r in runs] == [
        ("raw-insert", 1, 1), ("raw-hot-row", 1, 1), ("ledger", 1, 1)]  # fmt: skip
    assert all(r["per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in runs)


# ------------------------------------------------------------------------------------ logs


def test_pool_reconnection_warnings_are_rate_limited_per_pool(pg_server) -> None:
    """While PostgreSQL is down psycopg's pool warns at every reconnection attempt; the ledger's
    filter lets one per pool per interval through, saying how many it left out, and passes the rest."""
    import logging

    from dprdm.ledger.postgres import RECONNECT_LOG_INTERVAL_S, ReconnectLogFilter

    led = open_ledger(pg_server.new_url())
    try:
        pool_log = logging.getLogger("psycopg.pool")
        assert sum(isinstance(f, ReconnectLogFilter) for f in pool_log.filters) == 1
        open_ledger(pg_server.new_url()).close()  # a second ledger adds no second filter
        assert sum(isinstance(f, ReconnectLogFilter) for f in pool_log.filters) == 1
    finally:
        led.close()

    now = [100.0]
    flt = ReconnectLogFilter(clock=lambda: now[0])

    def record(pool: str, msg: str = "error connecting in %r: %s") -> logging.LogRecord:
        return logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, msg, (pool, "refused"), None)

    first = record("dprdm-ledger-read")
    assert flt.filter(first) and first.getMessage() == "error connecting in 'dprdm-ledger-read': refused"
    for _ in range(5):
        now[0] += 1.0
        assert not flt.filter(record("dprdm-ledger-read"))
    assert flt.filter(record("dprdm-ledger-write"))  # per pool
    other = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "discarding broken connection: %s",
                              ("c",), None)
    assert flt.filter(other) and flt.filter(other)  # other messages are never held back
    now[0] = 100.0 + RECONNECT_LOG_INTERVAL_S
    later = record("dprdm-ledger-read")
    assert flt.filter(later)
    assert later.getMessage() == (
        f"error connecting in 'dprdm-ledger-read': refused (5 similar left out in the last "
        f"{RECONNECT_LOG_INTERVAL_S:.0f} s)"
    )
    now[0] += 1.0
    assert not flt.filter(record("dprdm-ledger-read"))
