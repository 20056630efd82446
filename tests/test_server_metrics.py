"""Prometheus metrics: request counts by method/status and budgets; nothing private-derived."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import MemoryLedger
from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config


def test_metrics(tmp_path):
    cfg = make_config(server={"metrics_port": 0}, budgets={"corpus-a": {"epsilon": 3.0}})
    with ServerThread(cfg, ledger=MemoryLedger()) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            c.retrieve("faces", "m1")
            with pytest.raises(DprdmError):
                for i in range(20):
                    c.retrieve("faces", f"m{i + 2}")
            c.generate("faces", "g", steps=1, profile="public")
        with Client(srv.address, "wrong-token-xxxxxxxx") as bad, pytest.raises(DprdmError):
            bad.list_indexes()
        port = srv.running.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'dprdm_requests_total{code="OK",method="Retrieve"}' in text
    assert 'dprdm_requests_total{code="RESOURCE_EXHAUSTED",method="Retrieve"} 1.0' in text
    assert 'dprdm_requests_total{code="UNAUTHENTICATED",method="ListIndexes"} 1.0' in text
    assert 'dprdm_requests_total{code="OK",method="Generate"} 1.0' in text
    assert re.search(r'dprdm_budget_epsilon_spent\{domain="corpus-a"\} [0-9.]+', text)
    names = {m.group(1) for m in re.finditer(r"^(dprdm_[a-z_]+?)(?:_total|_created|_bucket|_count|_sum)?[{ ]", text, re.M)}
    assert names == {
        "dprdm_requests",  # dprdm_bad_requests has no sample until a bad request (test_server_observability)
        "dprdm_budget_epsilon",
        "dprdm_budget_epsilon_spent",
        "dprdm_generation_inside",
        "dprdm_generation_seconds",
        "dprdm_ledger_commit_seconds",
        "dprdm_ledger_errors",
    }
    # the only timings: generation and ledger commits (public inputs); none per query or per method
    timed = {m.group(1) for m in re.finditer(r"^(\w+)_seconds_bucket", text, re.M)}
    assert timed == {"dprdm_generation", "dprdm_ledger_commit"}
    assert "survivor" not in text and "distance" not in text
    # a stopped server's exporter is gone and its port released (it used to outlive the server)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    with socket.socket() as probe:  # SO_REUSEADDR: TIME_WAIT connections do not hold it, a listener would
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen(1)
