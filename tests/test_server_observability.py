"""Issue 13 items 6, 8, 9, 10: undecodable requests, lambda = 0 receipts, logs, metrics.

No wall-clock time is asserted anywhere: durations are only checked for presence or absence.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import MemoryLedger
from dprdm.server import metrics as metrics_mod
from dprdm.server.config import ConfigError
from dprdm.server.logs import JsonFormatter, TextFormatter, event, setup_logging
from dprdm.server.metrics import TIMED_STAGES, Metrics
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, ServerThread, make_config

AUTH = [("authorization", f"Bearer {TENANT_TOKEN}")]
SECRET_PROMPT = "zebra-crossing-confidential-prompt"


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (tag and length fit in one byte here)."""
    return bytes([number << 3 | 2, len(data)]) + data


def _scrape(srv: ServerThread) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read().decode()


# -- item 6: undecodable requests -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("/dprdm.v1.Dprdm/Retrieve", _field(1, b"faces") + _field(3, b"a\xffb"), "prompt"),
        ("/dprdm.v1.Dprdm/Retrieve", _field(1, b"faces") + _field(3, b"\xed\xa0\x80"), "prompt"),  # lone surrogate
        ("/dprdm.v1.Dprdm/Retrieve", _field(1, b"fa\xffces"), "index"),
        ("/dprdm.v1.Dprdm/Retrieve", b"\x1a\x09ab", "request"),  # truncated: no single field to blame
        ("/dprdm.v1.Dprdm/Generate", _field(1, b"faces") + _field(3, b"\xff"), "prompt"),
    ],
)
def test_undecodable_request_is_invalid_argument_naming_the_field(method, body, field, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config(server={"metrics_port": 0})
    with ServerThread(cfg, ledger=MemoryLedger()) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            if method.endswith("Generate"):
                call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as info:
                    list(call(body, metadata=AUTH, timeout=10))
            else:
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as info:
                    call(body, metadata=AUTH, timeout=10)
        text = _scrape(srv)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "DecodeError" not in err.details() and "protobuf" not in err.details()
    status = rpc_status.from_call(err)
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [v.field for v in bad.field_violations]
    assert violations == [field]
    name = method.rsplit("/", 1)[1]
    assert f'dprdm_bad_requests_total{{field="{field}",method="{name}"}} 1.0' in text
    assert f'dprdm_requests_total{{code="INVALID_ARGUMENT",method="{name}"}} 1.0' in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_undecodable_request_without_a_token_is_still_unauthenticated():
    with ServerThread(make_config(), ledger=MemoryLedger()) as srv, grpc.insecure_channel(srv.address) as ch:
        call = ch.unary_unary("/dprdm.v1.Dprdm/Retrieve", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(_field(3, b"\xff"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- item 8: lambda = 0 receipts ------------------------------------------------------------------
def test_lambda_zero_receipt_shows_the_domains_real_figures():
    with ServerThread(make_config(), ledger=MemoryLedger()) as srv, Client(srv.address, TENANT_TOKEN) as c:
        charged = c.retrieve("faces", "first", request_id="r1").receipt
        free = c.retrieve("faces", "second", profile="public").receipt
        budget = c.budget("faces")
    assert charged.epsilon_charged > 0
    assert free.spend_id == "" and free.epsilon_charged == 0.0
    assert free.epsilon_budget == 50.0 == budget.epsilon
    assert free.delta == budget.delta > 0.0
    assert free.epsilon_spent == pytest.approx(charged.epsilon_spent) and free.epsilon_spent > 0
    assert free.epsilon_left == pytest.approx(50.0 - free.epsilon_spent)


def test_lambda_zero_receipt_without_a_budget_stays_zero():
    cfg = make_config(
        indexes={"pub": {"path": "fake:domain=open,private=0", "bundle": "hash-16", "profiles": {
            "public": {"k": 5, "q": 0.5, "sigma": 0.5, "lambda": 0.0}}}},
        budgets={},
    )  # fmt: skip
    with ServerThread(cfg, ledger=MemoryLedger()) as srv, Client(srv.address, TENANT_TOKEN) as c:
        r = c.retrieve("pub", "x", profile="public").receipt
    assert r.epsilon_budget == 0.0 and r.delta == 0.0 and r.spend_id == ""


# -- item 9: logs ---------------------------------------------------------------------------------
@pytest.fixture
def json_log():
    buf = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = setup_logging("INFO", "json", stream=buf)
    yield buf
    root.removeHandler(handler)
    root.setLevel(level)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_logs_startup_access_refusals_auth_and_shutdown(json_log):
    cfg = make_config(server={"metrics_port": 0}, budgets={"corpus-a": {"epsilon": 3.0}})
    with ServerThread(cfg, ledger=MemoryLedger()) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            c.retrieve("faces", SECRET_PROMPT, request_id="req-1")
            c.retrieve("faces", SECRET_PROMPT, request_id="req-1")  # replay
            c.generate("faces", SECRET_PROMPT, steps=2, profile="public")
            c.budget("faces")
            with pytest.raises(DprdmError):
                for i in range(50):
                    c.retrieve("faces", f"{SECRET_PROMPT} {i}")
        with Client(srv.address, "wrong-token-xxxxxxxxxxxx") as bad, pytest.raises(DprdmError):
            bad.list_indexes()
        with Client(srv.address, ADMIN_TOKEN) as admin:
            admin.counts("corpus-a")
    raw = json_log.getvalue()
    lines = _lines(json_log)
    assert SECRET_PROMPT not in raw and "wrong-token" not in raw and TENANT_TOKEN not in raw
    assert "Traceback" not in raw

    start = next(x for x in lines if x["msg"].startswith("serving 1 index(es)"))
    assert start["listen"].startswith("127.0.0.1:") and start["ledger"] == "MemoryLedger"
    assert start["metrics"].startswith("127.0.0.1:") and "data_dir" in start
    assert start["indexes"] == [{"name": "faces", "domain": "corpus-a", "private": True, "public_size": 400,
                                 "bundle": "hash-16-gen", "generation": True, "profiles": ["default", "public"]}]
    assert start["budgets"]["corpus-a"]["epsilon"] == 3.0
    assert "200" not in json.dumps(start)  # the exact count (N = 200) is operator-only

    access = [x for x in lines if x["logger"] == "dprdm.access"]
    first, replay = [x for x in access if x.get("request_id") == "req-1"]
    assert first["msg"] == "access" and first["method"] == "Retrieve" and first["code"] == "OK"
    assert first["tenant"] == "alice" and first["index"] == "faces" and first["profile"] == "default"
    assert first["spend_id"] and first["replayed"] is False and "duration_ms" not in first
    assert replay["replayed"] is True and replay["spend_id"] == first["spend_id"]
    gen = next(x for x in access if x["method"] == "Generate")
    assert gen["code"] == "OK" and gen["profile"] == "public" and "duration_ms" not in gen
    budget = next(x for x in access if x["method"] == "GetBudget")
    assert budget["code"] == "OK" and isinstance(budget["duration_ms"], float)
    refused = next(x for x in access if x["code"] == "RESOURCE_EXHAUSTED")
    assert refused["level"] == "WARNING" and refused["msg"] == "refused" and refused["error"] == "BudgetExhausted"
    auth = next(x for x in access if x["msg"] == "auth refused")
    assert auth["level"] == "WARNING" and auth["code"] == "UNAUTHENTICATED" and auth["method"] == "ListIndexes"
    assert auth["reason"] == "unknown token"
    counts = next(x for x in access if x["method"] == "GetCounts")
    assert counts["tenant"] == "root" and counts["domain"] == "corpus-a"
    assert not any(k in x for x in access for k in ("prompt", "count", "exact_size", "survivors", "distance"))
    assert [x for x in lines if x["msg"] == "stopped"]


def test_text_format_is_one_line_with_quoted_fields():
    record = logging.LogRecord("dprdm.access", logging.INFO, __file__, 1, "access", None, None)
    record.fields = {"method": "Retrieve", "index": "a b\nc", "spend_id": None, "ok": True}
    line = TextFormatter().format(record)
    assert "\n" not in line and 'index="a b\\nc"' in line and "method=Retrieve" in line and "ok=true" in line
    assert json.loads(JsonFormatter().format(record))["index"] == "a b\nc"


def test_event_drops_none_fields(caplog):
    caplog.set_level(logging.INFO, logger="dprdm.test")
    event(logging.getLogger("dprdm.test"), logging.INFO, "x", a=1, b=None)
    assert caplog.records[-1].fields == {"a": 1}


def test_log_format_option():
    assert make_config(server={"log_format": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="server.log_format"):
        make_config(server={"log_format": "xml"})
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")


def test_model_loading_progress_bars_are_off():
    code = (
        "from dprdm.server.logs import quiet_progress; quiet_progress()\n"
        "import tqdm\n"
        "for _ in tqdm.tqdm(range(3), desc='Loading checkpoint shards'): pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "Loading" not in out.stderr and "it/s" not in out.stderr


def test_serve_installs_the_logging_setup():
    from dprdm.cli import serve

    source = Path(serve.__file__).read_text()
    assert "setup_logging(" in source and "--log-format" in source


# -- item 10: metrics -----------------------------------------------------------------------------
def _documented() -> set[str]:
    doc = (Path(metrics_mod.__file__).parent / "METRICS.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))


def _exposed_names(registry) -> set[str]:
    return {f.name + "_total" if f.type == "counter" else f.name for f in registry.collect()}


def test_every_series_is_documented():
    names = _exposed_names(Metrics().registry)
    assert names == _documented()
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "dprdm_ledger_errors_total"} <= names


def test_no_per_query_retrieval_timing_after_traffic():
    cfg = make_config(server={"metrics_port": 0}, budgets={"corpus-a": {"epsilon": 3.0}})
    with ServerThread(cfg, ledger=MemoryLedger()) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            c.retrieve("faces", "a")
            c.generate("faces", "b", steps=2, profile="public")
            with pytest.raises(DprdmError):
                for i in range(50):
                    c.retrieve("faces", f"c{i}")
        registry = srv.running.metrics.registry
        text = _scrape(srv)
        assert _exposed_names(registry) == _documented()
    histograms = {f.name for f in registry.collect() if f.type in ("histogram", "summary")}
    assert histograms == set(TIMED_STAGES)
    for family in registry.collect():
        for sample in family.samples:
            assert not re.search(r"retriev|search|query|survivor|distance|neighbo", sample.name)
            if family.type in ("histogram", "summary"):
                assert "method" not in sample.labels  # no per-method (hence per-Retrieve) latency
    assert "dprdm_generation_seconds_count 1.0" in text
    assert re.search(r'dprdm_ledger_commit_seconds_count\{operation="reserve"\} [1-9]', text)
    assert re.search(r'dprdm_ledger_commit_seconds_count\{operation="store_release"\} [1-9]', text)
    assert 'dprdm_ledger_errors_total{error="BudgetExhausted",operation="reserve"} 1.0' in text
    assert "process_cpu_seconds_total" in text
