"""``benchmarks/timing.py`` (issue 12 item 2) runs end to end at a tiny size and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "timing.py"


def test_timing_benchmark_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_timing", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "timing.json"
    assert mod.main(["--public-size", "2000", "--d", "8", "--pairs", "12", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["built_first"] for r in doc["rounds"]] == ["small", "full"]
    for r in doc["rounds"]:
        assert r["stored_rows"] == {"small": 2000, "full": 2000}  # both padded to N̄
        assert r["pairs"] == 12 and r["ratio_of_medians"] > 0 and r["ratio_ci95"][0] <= r["ratio_ci95"][1]
    assert "geometric mean" in capsys.readouterr().out
