"""Faults around the ledger (issue 13, items 1 and 5).

* A ledger that cannot commit (disk full, injected as SQLite's own ``OperationalError`` on the
  writer's connection; and, where a tmpfs can be mounted, a real full disk) refuses with
  UNAVAILABLE naming the cause, charges nothing, turns health NOT_SERVING and back to SERVING
  once a commit succeeds.
* A failure after a committed charge tells the client the request id (server-chosen ones too);
  a replay with it returns the held release once the ledger can store it (RELEASE_MISSING after
  a restart, or when no release exists), never a fresh draw, and the charge stays.
* A second server on the same port is refused with one line; servers sharing a ledger say so.

Nothing here asserts a wall-clock time: waits are bounded polls of a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import LedgerUnavailable, MemoryLedger, SqliteLedger
from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile
from dprdm.proto.v1 import dprdm_pb2, dprdm_pb2_grpc
from dprdm.server.app import SERVICE_NAMES, start_server
from dprdm.server.errors import StartupError
from dprdm.server.testing import TENANT_TOKEN, ServerThread, fake_loaders, make_config

FULL = "database or disk is full"
WAIT_S = 30.0  # upper bound of every wait (a loaded 2-core box); the conditions come much sooner


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Disk:
    """The writer connection's proxy: while ``full`` is set, a matching statement fails the way
    SQLite fails on ENOSPC (the real transaction stays open and is rolled back by the ledger)."""

    def __init__(self, conn: sqlite3.Connection, match: Callable[[str], bool]) -> None:
        self._conn, self._match = conn, match
        self.full = threading.Event()
        self.failures = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full.is_set() and self._match(sql):
            self.failures += 1
            raise sqlite3.OperationalError(FULL)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _inject(ledger: SqliteLedger, match: Callable[[str], bool]) -> _Disk:
    disk = _Disk(ledger._writer._conn, match)
    ledger._writer._conn = disk  # type: ignore[assignment]
    return disk


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture()
def server(ledger_path: Path) -> Iterator[ServerThread]:
    with ServerThread(make_config(), ledger=SqliteLedger(ledger_path)) as srv:
        srv.running.ledger_health.probe_seconds = 0.05
        yield srv


def _health(srv: ServerThread) -> dict[str, int]:
    with grpc.insecure_channel(srv.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", *SERVICE_NAMES)
        }


def _all(status: int) -> Callable[[ServerThread], bool]:
    return lambda srv: set(_health(srv).values()) == {status}


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _spends(srv: ServerThread) -> int:
    return srv.running.ledger.budget_state("corpus-a").spends


def _retrieve_error(c: Client, **kwargs: Any) -> DprdmError:
    with pytest.raises(DprdmError) as err:
        c.retrieve("faces", kwargs.pop("prompt", "a prompt"), **kwargs)
    return err.value


def _retrieve_without_id(srv: ServerThread, prompt: str) -> DprdmError:
    """A raw call with no request id (the client library always sends one)."""
    with grpc.insecure_channel(srv.address) as ch:
        stub = dprdm_pb2_grpc.DprdmStub(ch)
        req = dprdm_pb2.RetrieveRequest(index="faces", profile="default", prompt=prompt)
        with pytest.raises(grpc.RpcError) as err:
            stub.Retrieve(req, metadata=(("authorization", f"Bearer {TENANT_TOKEN}"),), timeout=60)
    return DprdmError.from_rpc(err.value)


def _has(err: DprdmError, kind: type) -> bool:
    return any(isinstance(d, kind) for d in err.details)


# ------------------------------------------------------------------------------ ledger cannot commit


def test_disk_full_at_commit_is_unavailable_charges_nothing_and_health_follows(server, ledger_path, caplog):
    caplog.set_level(logging.WARNING, logger="dprdm.server")
    disk = _inject(server.running.ledger, lambda sql: sql == "COMMIT")
    disk.full.set()
    with Client(server.address, TENANT_TOKEN) as c:
        err = _retrieve_error(c, request_id="full-1")
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "LEDGER_UNAVAILABLE"
        assert FULL in err.message and "charged nothing" in err.message
        assert err.metadata["cause"] == FULL and _has(err, error_details_pb2.RetryInfo)
        assert str(ledger_path) not in err.message  # the file is named in the log, not to clients
        assert _spends(server) == 0 and server.running.ledger.audit_trail("corpus-a") == []
        _wait_for(lambda: _all(NOT_SERVING)(server), "health NOT_SERVING")
        _wait_for(lambda: disk.failures >= 3, "failing probes")  # still failing: still NOT_SERVING
        assert _all(NOT_SERVING)(server)
        lines = [r.getMessage() for r in caplog.records if "cannot commit" in r.getMessage()]
        assert len(lines) == 1 and str(ledger_path) in lines[0] and FULL in lines[0]  # once, not per call
        disk.full.clear()  # space is back: the probe commits, health returns without any call
        _wait_for(lambda: _all(SERVING)(server), "health SERVING again")
        assert any("commits again" in r.getMessage() for r in caplog.records)
        ok = c.retrieve("faces", "a prompt", request_id="full-1")  # the refused id was never used
    assert not ok.receipt.replayed and _spends(server) == 1
    server.running.ledger.verify()


def test_a_commit_by_a_call_also_restores_health(server):
    disk = _inject(server.running.ledger, lambda sql: sql == "COMMIT")
    server.running.ledger_health.probe_seconds = 3600.0  # no probe: the next call's commit recovers
    disk.full.set()
    with Client(server.address, TENANT_TOKEN) as c:
        assert _retrieve_error(c).code == grpc.StatusCode.UNAVAILABLE
        _wait_for(lambda: _all(NOT_SERVING)(server), "health NOT_SERVING")
        disk.full.clear()
        c.retrieve("faces", "a prompt")
    _wait_for(lambda: _all(SERVING)(server), "health SERVING again")
    assert _spends(server) == 1


# -------------------------------------------------------------------------- failure after the charge


def test_release_that_cannot_be_stored_names_the_request_id_and_a_replay_recovers_it(server):
    disk = _inject(server.running.ledger, lambda sql: sql.startswith("UPDATE spends SET release"))
    disk.full.set()
    with Client(server.address, TENANT_TOKEN) as c:
        err = _retrieve_error(c, request_id="paid-1")
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "CHARGED_REPLAY_TO_RECEIVE"
        assert err.metadata["request_id"] == "paid-1" and "paid-1" in err.message
        assert err.metadata["charged"] == "true" and _has(err, error_details_pb2.RetryInfo)
        spend_id = err.metadata["spend_id"]
        srv_err = _retrieve_without_id(server, "no id sent")  # the server chose the id: it is named too
        srv_id = srv_err.metadata["request_id"]
        assert srv_id.startswith("srv-") and srv_id in srv_err.message
        assert _spends(server) == 2  # both charged, the charges stay
        still = _retrieve_error(c, request_id="paid-1")  # the ledger still cannot store it
        assert still.code == grpc.StatusCode.UNAVAILABLE and still.reason == "LEDGER_UNAVAILABLE"
        disk.full.clear()
        got = c.retrieve("faces", "a prompt", request_id="paid-1")
        assert got.receipt.replayed and got.receipt.spend_id == spend_id
        again = c.retrieve("faces", "a prompt", request_id="paid-1")  # now from the ledger
        np.testing.assert_array_equal(again.embedding, got.embedding)
        assert c.retrieve("faces", "no id sent", request_id=srv_id).receipt.replayed
    assert _spends(server) == 2  # no replay charged anything
    assert len(server.running.service.held) == 0
    server.running.ledger.verify()
    assert {s.status for s in server.running.ledger.audit_trail("corpus-a")} == {"released"}


def test_a_held_release_is_gone_after_a_restart_and_the_replay_is_release_missing(ledger_path):
    with ServerThread(make_config(), ledger=SqliteLedger(ledger_path)) as srv:
        disk = _inject(srv.running.ledger, lambda sql: sql.startswith("UPDATE spends SET release"))
        disk.full.set()
        with Client(srv.address, TENANT_TOKEN) as c:
            assert _retrieve_error(c, request_id="lost-1").reason == "CHARGED_REPLAY_TO_RECEIVE"
        disk.full.clear()
    with ServerThread(make_config(), ledger=SqliteLedger(ledger_path)) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            err = _retrieve_error(c, request_id="lost-1")
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "RELEASE_MISSING"
        assert _spends(srv) == 1


def test_an_error_after_the_charge_names_the_request_id_and_never_draws_again(server, monkeypatch, caplog):
    index = server.running.catalog.indexes["faces"].index

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("index file vanished")

    monkeypatch.setattr(index, "search_subsampled", broken)
    caplog.set_level(logging.ERROR, logger="dprdm.server")
    with Client(server.address, TENANT_TOKEN) as c:
        err = _retrieve_error(c, request_id="lost-2")
        assert err.code == grpc.StatusCode.INTERNAL and err.reason == "CHARGED_ANSWER_LOST"
        assert err.metadata["request_id"] == "lost-2" and "lost-2" in err.message
        assert err.metadata["error_id"] in err.message and "index file vanished" not in err.message
        assert any(err.metadata["error_id"] in r.getMessage() for r in caplog.records)
        monkeypatch.undo()
        replay = _retrieve_error(c, request_id="lost-2")
    assert replay.code == grpc.StatusCode.FAILED_PRECONDITION and replay.reason == "RELEASE_MISSING"
    assert _spends(server) == 1


# ---------------------------------------------------------------------------------- a real full disk


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and mount rights; the injected tests above cover the server)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount (root); covered by the injected ENOSPC tests")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); covered by the injected tests"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def test_real_full_disk_names_the_cause_and_the_file_and_charges_nothing(tiny_tmpfs):
    path = tiny_tmpfs / "ledger.sqlite3"
    budget = Budget.single(5.0, 1e-6, Profile(k=18, q=0.01, sigma=0.2, lam=0.5))
    charge = np.full(len(DEFAULT_ORDERS), 0.01)
    seen: list[LedgerUnavailable | None] = []
    with SqliteLedger(path, group_commit=False) as led:
        led.add_commit_observer(seen.append)
        led.create_budget("c", budget)
        first = led.reserve(
            domain="c", tenant="t", request_id="r0", binding_hash="h", profile={}, charge_rdp=charge
        )
        _fill(tiny_tmpfs / "filler")
        with pytest.raises(LedgerUnavailable) as err:
            led.reserve(
                domain="c", tenant="t", request_id="r1", binding_hash="h", profile={}, charge_rdp=charge
            )
        assert FULL in str(err.value) and str(path) in str(err.value) and err.value.cause == FULL
        assert isinstance(seen[-1], LedgerUnavailable) and seen[-2] is None
        with pytest.raises(LedgerUnavailable):
            led.check_writable()
        assert led.budget_state("c").spends == 1 and led.request_binding(tenant="t", request_id="r1") is None
        (tiny_tmpfs / "filler").unlink()
        led.check_writable()
        assert seen[-1] is None
        led.reserve(domain="c", tenant="t", request_id="r1", binding_hash="h", profile={}, charge_rdp=charge)
        assert led.budget_state("c").spends == 2 and first.state.spends == 1
        led.verify()
    with SqliteLedger(path) as again:  # what is on disk: exactly the two committed charges
        assert again.budget_state("c").spends == 2
        again.verify()


# -------------------------------------------------------------------------- ports and shared ledgers


def test_a_second_server_on_the_same_port_is_refused_with_one_line(server):
    cfg = replace(make_config(), listen=f"127.0.0.1:{server.port}")
    with pytest.raises(StartupError) as err:
        asyncio.run(start_server(cfg, ledger=MemoryLedger(), loaders=fake_loaders()))
    text = str(err.value)
    assert "\n" not in text and f"127.0.0.1:{server.port}" in text and "in use" in text
    with Client(server.address, TENANT_TOKEN) as c:  # the first server is untouched
        c.retrieve("faces", "still here")


def test_servers_sharing_a_ledger_say_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dprdm.server")
    cfg = make_config(server={"data_dir": str(tmp_path)})
    ledger = tmp_path / "ledger.sqlite3"

    def shared() -> list[str]:
        return [r.getMessage() for r in caplog.records if "is shared with" in r.getMessage()]

    with ServerThread(cfg) as first:
        assert shared() == []  # alone
        with ServerThread(cfg) as second:
            assert shared() == [
                f"ledger {ledger} is shared with another server (pid {os.getpid()}, port {first.port})"
            ]
            with Client(first.address, TENANT_TOKEN) as a, Client(second.address, TENANT_TOKEN) as b:
                a.retrieve("faces", "one")
                b.retrieve("faces", "two")
            assert first.running.ledger.budget_state("corpus-a").spends == 2  # one budget
        caplog.clear()
    with ServerThread(cfg):  # the others stopped: alone again, and no record is left behind
        assert shared() == []
    assert list((tmp_path / "ledger.sqlite3.servers").glob("*.json")) == []
