"""Server lifecycle (issue 13 items 2-4): the SIGTERM drain, SIGHUP, one-line start-up errors and
``dprdm serve --check``.

Servers run as subprocesses through ``tests/lifecycle_server.py`` (``dprdm serve`` with the fake
index and bundles of :mod:`dprdm.server.testing`, the real SQLite ledger, logging and signals);
``--check`` cases with real index files run the real ``python -m dprdm``. No wall-clock time is
asserted: the tests wait for conditions (a spend in the ledger, a log line) with generous bounds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.proto.v1 import dprdm_pb2, dprdm_pb2_grpc
from dprdm.server.config import ConfigError, parse_config
from dprdm.server.testing import ADMIN_TOKEN, OTHER_TOKEN, TENANT_TOKEN

RUNNER = str(Path(__file__).parent / "lifecycle_server.py")
WAIT = 60.0  # bound on any wait for a condition (never an assertion on time)


def _toml(
    tmp_path: Path,
    *,
    sleep: float = 0.0,
    grace: float = 30.0,
    threads: int = 2,
    listen: str = "127.0.0.1:0",
    data_dir: str | None = None,
    extra_server: str = "",
    tokens: str | None = None,
    path: str | None = None,
    bundle: str = "hash-16",
) -> Path:
    tokens = tokens if tokens is not None else _tokens(TENANT_TOKEN)
    text = f"""
[server]
listen = "{listen}"
data_dir = "{data_dir or tmp_path / "data"}"
query_threads = {threads}
shutdown_grace = {grace!r}
noise_pool_size = 64
{extra_server}
{tokens}
[indexes.faces]
path = "{path or f"fake:domain=corpus-a,n=300,dim=16,public=1000,sleep={sleep}"}"
bundle = "{bundle}"

[indexes.faces.profiles.default]
k = 5
q = 0.2
sigma = 1.0
lambda = 0.5

[budgets.corpus-a]
epsilon = 1000.0
delta = 1e-5
"""
    out = tmp_path / "server.toml"
    out.write_text(text)
    return out


def _tokens(*tenant_tokens: str) -> str:
    blocks = [f'[[tokens]]\ntenant = "t{i}"\ntoken = "{tok}"\n' for i, tok in enumerate(tenant_tokens)]
    blocks.append(f'[[tokens]]\ntenant = "root"\nrole = "admin"\ntoken = "{ADMIN_TOKEN}"\n')
    return "\n".join(blocks)


class Server:
    """A ``dprdm serve`` subprocess (fake loaders); stderr goes to a file we can poll."""

    def __init__(self, config: Path, *args: str) -> None:
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, RUNNER, "serve", "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on port" in line, (line, self.log())
        self.address = f"127.0.0.1:{int(line.split()[-1])}"

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> int:
        rc = self.proc.wait(timeout=WAIT)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        self._log.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.kill()


def _until(cond, what: str) -> None:
    end = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _spends(address: str) -> list:
    with Client(address, ADMIN_TOKEN, timeout=10) as admin:
        return admin.audit_trail("corpus-a", limit=1000)


def _retrieve_raw(address: str, prompt: str, request_id: str = "") -> dprdm_pb2.RetrieveResponse:
    """Retrieve through the raw stub: an empty ``request_id`` lets the server choose one."""
    with grpc.insecure_channel(address) as ch:
        stub = dprdm_pb2_grpc.DprdmStub(ch)
        req = dprdm_pb2.RetrieveRequest(index="faces", profile="default", prompt=prompt, request_id=request_id)
        return stub.Retrieve(req, metadata=[("authorization", f"Bearer {TENANT_TOKEN}")], timeout=WAIT)


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log and "CancelledError" not in log, log


def _calls(address: str, n: int, *, server_ids: bool = False) -> tuple[list[threading.Thread], dict]:
    """``n`` concurrent Retrieve calls; results[i] = ("ok", response) or ("error", DprdmError)."""
    results: dict[int, tuple[str, object]] = {}

    def one(i: int) -> None:
        rid = "" if server_ids and i % 2 else f"call-{i}"
        try:
            results[i] = ("ok", _retrieve_raw(address, f"prompt {i}", rid))
        except grpc.RpcError as err:
            results[i] = ("error", DprdmError.from_rpc(err))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


# --------------------------------------------------------------------------------- SIGTERM drain


def test_sigterm_drains_admitted_calls_and_exits_0(tmp_path, servers):
    cfg = _toml(tmp_path, sleep=0.5, grace=600.0, threads=2)
    srv = Server(cfg)
    servers.append(srv)
    threads, results = _calls(srv.address, 12)
    _until(lambda: len(results) >= 1, "a first answer")  # 10 calls' work (~2.5 s) still to do
    srv.signal(signal.SIGTERM)
    for t in threads:
        t.join(WAIT)
    assert srv.wait() == 0
    log = srv.log()
    _no_traceback(log)
    assert "shutting down: draining" in log and "(grace 600 s)" in log and "stopped" in log, log
    assert "cut call" not in log, log
    drained = int(log.split("shutting down: draining ")[1].split()[0])
    assert drained >= 1
    ok = {i: r for i, (kind, r) in results.items() if kind == "ok"}
    assert len(ok) >= drained, results
    with SqliteLedger(tmp_path / "data" / "ledger.sqlite3") as ledger:
        spends = {s.request_id: s for s in ledger.audit_trail("corpus-a")}
    for i, resp in ok.items():  # every receipt is in the ledger, with its release stored
        assert spends[f"call-{i}"].spend_id == resp.receipt.spend_id
        assert spends[f"call-{i}"].status == "released"
    for i, (kind, err) in results.items():  # a call refused by the drain was never charged
        if kind == "error":
            assert err.code == grpc.StatusCode.UNAVAILABLE and f"call-{i}" not in spends, err


def test_grace_expiry_cuts_calls_with_their_request_ids_and_replays_return_the_release(tmp_path, servers):
    cfg = _toml(tmp_path, sleep=3.0, grace=0.0, threads=8)  # a free pool thread answers the polls
    srv = Server(cfg)
    servers.append(srv)
    threads, results = _calls(srv.address, 4, server_ids=True)
    _until(lambda: len(_spends(srv.address)) >= 1, "a charged call in flight")
    srv.signal(signal.SIGTERM)
    for t in threads:
        t.join(WAIT)
    assert srv.wait() == 0
    log = srv.log()
    _no_traceback(log)
    assert "grace of 0 s expired" in log and "stopped" in log, log
    cut = {i: err for i, (kind, err) in results.items() if kind == "error"}
    assert cut, results
    for i, err in cut.items():
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), err
        rid = err.metadata["request_id"]
        assert rid == f"call-{i}" if i % 2 == 0 else rid.startswith("srv-"), (i, rid)
        assert rid in err.message
        assert f"cut call request_id={rid}" in log or f"refused call request_id={rid}" in log, (rid, log)
    with SqliteLedger(tmp_path / "data" / "ledger.sqlite3") as ledger:
        spends = {s.request_id: s for s in ledger.audit_trail("corpus-a")}
    assert all(s.status == "released" for s in spends.values()), spends  # charged calls stored theirs
    charged_cut = [i for i, err in cut.items() if err.metadata["request_id"] in spends]
    assert charged_cut, (cut, spends)
    again = Server(_toml(tmp_path, sleep=0.0, grace=0.0))
    servers.append(again)
    for i, err in cut.items():
        rid = err.metadata["request_id"]
        resp = _retrieve_raw(again.address, f"prompt {i}", rid)
        if rid in spends:  # the stored release, no new charge
            assert resp.receipt.replayed and resp.receipt.spend_id == spends[rid].spend_id
        else:  # cut before its charge: answered afresh
            assert not resp.receipt.replayed
    again.signal(signal.SIGINT)
    assert again.wait() == 0


# ----------------------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_the_token_list_and_keeps_it_on_a_bad_file(tmp_path, servers):
    cfg = _toml(tmp_path, tokens=_tokens(TENANT_TOKEN))
    srv = Server(cfg)
    servers.append(srv)

    def budget_with(token: str) -> grpc.StatusCode:
        try:
            with Client(srv.address, token, timeout=10) as c:
                c.budget("faces")
        except DprdmError as err:
            return err.code
        return grpc.StatusCode.OK

    assert budget_with(OTHER_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    _toml(tmp_path, tokens=_tokens(TENANT_TOKEN, OTHER_TOKEN))
    srv.signal(signal.SIGHUP)
    _until(lambda: "reloaded 3 token(s)" in srv.log(), "the reload")
    assert budget_with(OTHER_TOKEN) == grpc.StatusCode.OK
    cfg.write_text(cfg.read_text().replace("[[tokens]]", "[[tokenz]]", 1))
    srv.signal(signal.SIGHUP)
    _until(lambda: "tokens not reloaded" in srv.log(), "the refused reload")
    assert "unknown key" in srv.log()
    assert budget_with(OTHER_TOKEN) == grpc.StatusCode.OK and budget_with(TENANT_TOKEN) == grpc.StatusCode.OK
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0
    _no_traceback(srv.log())


# ------------------------------------------------------------------------- one-line start-up errors


def _run(argv: list[str], env: dict[str, str] | None = None, runner: bool = True) -> tuple[int, str, str]:
    cmd = [sys.executable, RUNNER] if runner else [sys.executable, "-m", "dprdm"]
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=WAIT * 2, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def _one_line(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_grpc_port_in_use_is_one_line(tmp_path, busy_port):
    rc, _out, err = _run(["serve", "--config", str(_toml(tmp_path, listen=f"127.0.0.1:{busy_port}"))])
    _one_line(rc, err, f"server.listen: cannot bind 127.0.0.1:{busy_port}: address already in use")


def test_metrics_port_in_use_is_one_line(tmp_path, busy_port):
    cfg = _toml(tmp_path, extra_server=f"metrics_port = {busy_port}")
    rc, _out, err = _run(["serve", "--config", str(cfg)])
    _one_line(rc, err, f"server.metrics_port: cannot bind 127.0.0.1:{busy_port}: address already in use")


# Tests run as root here, where a chmod 0o500 directory does not stop writes: the ledger's file
# is made unopenable instead (a path under a regular file; a directory where the file should be).
@pytest.mark.parametrize(
    "layout, reason",
    [("under-a-file", "Not a directory"), ("directory-in-place", "unable to open database file")],
)
def test_unusable_data_directory_is_one_line_naming_the_ledger(tmp_path, layout, reason):
    if layout == "under-a-file":
        (tmp_path / "plain").write_text("")
        data = tmp_path / "plain" / "data"
        where = str(data)
    else:
        data = tmp_path / "data"
        (data / "ledger.sqlite3").mkdir(parents=True)
        where = str(data / "ledger.sqlite3")
    rc, _out, err = _run(["serve", "--config", str(_toml(tmp_path, data_dir=str(data)))])
    _one_line(rc, err, "server.data_dir: cannot open the ledger", where, reason)


def test_unset_token_variable_is_one_line_naming_it(tmp_path):
    tokens = '[[tokens]]\ntenant = "alice"\ntoken_env = "DPRDM_TOKEN_LIFECYCLE_UNSET"\n'
    env = {k: v for k, v in os.environ.items() if k != "DPRDM_TOKEN_LIFECYCLE_UNSET"}
    rc, _out, err = _run(["serve", "--config", str(_toml(tmp_path, tokens=tokens))], env=env)
    _one_line(rc, err, "tokens[0].token_env: environment variable DPRDM_TOKEN_LIFECYCLE_UNSET is not set")
    short = {**env, "DPRDM_TOKEN_LIFECYCLE_UNSET": "short"}
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.token_env: the token must have at least 16"):
        parse_config({"tokens": [{"tenant": "a", "token_env": "DPRDM_TOKEN_LIFECYCLE_UNSET"}]}, env=short)


def test_shutdown_grace_is_validated():
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ConfigError, match="server.shutdown_grace"):
            parse_config({"server": {"shutdown_grace": bad}})
    assert parse_config({"server": {"shutdown_grace": 5}}).shutdown_grace == 5.0


# -------------------------------------------------------------------------------- serve --check


@pytest.fixture(scope="module")
def real_index(tmp_path_factory) -> Path:
    from dprdm.index import BuildConfig, build_from_vectors
    from dprdm.models.fake import FakeEncoder

    out = tmp_path_factory.mktemp("idx") / "faces"
    vectors = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    build_from_vectors(
        vectors, FakeEncoder(16).identity, BuildConfig(output=out, corpus_id="corpus-a", public_size=1000, progress=False)
    )
    return out


def test_check_refuses_a_missing_index_path(tmp_path):
    missing = tmp_path / "no-such-index"
    rc, out, err = _run(["serve", "--config", str(_toml(tmp_path, path=str(missing))), "--check"], runner=False)
    _one_line(rc, err, "indexes.faces: cannot load index", str(missing))
    assert "configuration OK" not in out


def test_check_refuses_a_truncated_index(tmp_path, real_index):
    import shutil

    copy = tmp_path / "faces"
    shutil.copytree(real_index, copy)
    vectors = copy / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-100])
    rc, out, err = _run(["serve", "--config", str(_toml(tmp_path, path=str(copy))), "--check"], runner=False)
    _one_line(rc, err, "indexes.faces: cannot load index", "vectors.npy")
    assert "configuration OK" not in out


def test_check_refuses_a_misspelled_bundle(tmp_path, real_index):
    cfg = _toml(tmp_path, path=str(real_index), bundle="dprdm-minii")
    rc, out, err = _run(["serve", "--config", str(cfg), "--check"], runner=False)
    _one_line(rc, err, "indexes.faces: cannot load bundle 'dprdm-minii'")
    assert "configuration OK" not in out


@pytest.mark.slow  # ~35-50 s: CI's slow step
def test_check_binds_no_port_and_leaves_the_ledger_alone(tmp_path, busy_port, servers):
    cfg = _toml(tmp_path, listen=f"127.0.0.1:{busy_port}", extra_server=f"metrics_port = {busy_port}")
    rc, out, err = _run(["serve", "--config", str(cfg), "--check"])
    assert rc == 0, err
    assert "index faces: " in out and "bundle hash-16" in out and "budget corpus-a" in out and "configuration OK" in out, out
    assert not (tmp_path / "data").exists()  # no ledger created
    srv = Server(_toml(tmp_path))  # now a ledger with a spend exists; --check reads a copy of it
    servers.append(srv)
    _retrieve_raw(srv.address, "one", "one")
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0
    ledger_file = tmp_path / "data" / "ledger.sqlite3"
    before = _files(ledger_file.parent)
    rc, out, err = _run(["serve", "--config", str(cfg), "--check"])
    assert rc == 0 and "ledger: " in out and "(1 domain(s))" in out, (out, err)
    assert _files(ledger_file.parent) == before


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
