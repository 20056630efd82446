"""Smoke test of ``dprdm bench load`` (clients/bench.py): a tiny budget drained over loopback."""

from __future__ import annotations

import json

import pytest

from dprdm.benchmarks import load_harness as bench
from dprdm.cli.main import main
from dprdm.privacy import Profile


class _Info:
    def __init__(self, epsilon: float, spent: float) -> None:
        self.epsilon, self.epsilon_spent = epsilon, spent


def test_drains_budgets_exactly_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["bench", "load", "--n", "300", "--d", "16", "--clients", "1,4", "--queries", "12",
            "--generate-queries", "4", "--steps", "1", "--max-seconds", "20", "--noise", "float",
            "--tmp", str(tmp_path), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    (path,) = out.glob("load-*.json")
    result = json.loads(path.read_text())
    assert result["ok"] and result["settings"]["token"] is None
    assert [(c["method"], c["clients"]) for c in result["cells"]] == [
        ("retrieve", 1), ("retrieve", 4), ("generate", 1), ("generate", 4)
    ]  # fmt: skip
    for cell in result["cells"]:
        checks = cell["checks"]
        assert checks["granted"] == checks["expected_admits"] == (12 if cell["method"] == "retrieve" else 4)
        assert cell["refusals"]["RESOURCE_EXHAUSTED/PRIVACY_BUDGET_EXHAUSTED"] == cell["clients"]
        assert checks["composed_granted_epsilon"] <= checks["budget_epsilon"]
        assert checks["ledger_epsilon_spent"] == pytest.approx(checks["composed_granted_epsilon"], rel=1e-9)
        assert cell["latency_ms"]["p50"] > 0 and len(cell["epsilon_series"]) == 10
    printed = capsys.readouterr().out
    assert "| retrieve | 4 | float | 12/12 |" in printed
    assert not list(tmp_path.glob("dprdm-load-*")), "the temp index and ledgers are removed"


def test_budget_plan_admits_exactly_m():
    plan = bench.plan_budget(Profile(k=16, q=0.01, sigma=0.2, lam=0.5), 50, 1e-7, None)
    assert plan.composed(50) <= plan.epsilon < plan.composed(51)


def test_check_cell_flags_overspending():
    plan = bench.plan_budget(Profile(k=16, q=0.01, sigma=0.2, lam=0.5), 3, 1e-7, None)
    ok = [(0.1 * i, 0.01, "OK", "", 0.1, plan.composed(i + 1), f"s{i}", False) for i in range(3)]
    refusal = [(1.0, 0.01, "RESOURCE_EXHAUSTED", "PRIVACY_BUDGET_EXHAUSTED", 0.0, 0.0, "", False)]
    good = bench.check_cell({"records": ok + refusal}, _Info(plan.epsilon, plan.composed(3)), plan)
    assert good["ok"], good["violations"]
    extra = (0.4, 0.01, "OK", "", 0.1, plan.composed(4), "s3", False)
    bad = bench.check_cell({"records": [*ok, extra, *refusal]}, _Info(plan.epsilon, plan.composed(4)), plan)
    assert not bad["ok"] and any("budget admits 3" in v for v in bad["violations"])
    dup = bench.check_cell({"records": [*ok[:2], ok[1]]}, _Info(plan.epsilon, plan.composed(3)), plan)
    assert any("duplicate spend ids" in v for v in dup["violations"])


def test_refuses_non_loopback_address(capsys):
    assert main(["bench", "load", "--address", "10.0.0.1:50051", "--token", "x" * 20]) == 2
    assert "loopback only" in capsys.readouterr().err


def test_missing_tmp_directory_is_one_line(tmp_path, capsys):
    assert main(["bench", "load", "--tmp", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--tmp" in err and "not an existing directory" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_benchmark_server_defaults_follow_the_server() -> None:
    """The load benchmark measures the server as shipped unless a flag says otherwise."""
    from dprdm.server.config import ServerConfig

    s, c = bench.LoadSettings(), ServerConfig()
    assert (s.query_threads, s.group_commit, s.generation_workers, s.generation_queue) == (
        c.query_threads, c.group_commit, c.generation_workers, c.generation_queue
    )
