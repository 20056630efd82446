"""``benchmarks/ledger.py --across-processes``: the SQLite group-commit ledger with its writers
spread over 3 OS processes on one file (issue 14) runs, writes, and leaves a consistent ledger."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "ledger.py"


def test_sqlite_across_processes_spreads_writers_and_commits(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_ledger_across", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = mod.sqlite_across_processes(tmp_path, writers=(1, 4), seconds=0.2)  # verify()s each file
    assert [(r["writers"], r["processes"]) for r in runs] == [(1, 1), (4, 3)]
    for r in runs:
        assert r["per_s"] > 0 and r["ops_per_transaction"] >= 1.0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert "kind" not in r
        base = r["batch_first"]  # the paired baseline (issue 14's order), verified too
        assert base["per_s"] > 0 and base["ops_per_transaction"] >= 1.0
        assert r["over_batch_first"] == r["per_s"] / base["per_s"]
    files = [p.name for p in tmp_path.glob("ledger-across-*.db")]
    assert len(files) == 4 and sum(f.endswith("-batch-first.db") for f in files) == 2  # fresh files per run
