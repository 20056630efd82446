"""benchmarks/gpu.py (issue 16 item 9): one line and exit 0 without a GPU; the dry run on torch's CPU
device runs every part (equality on fixed coins, bf16 tiny pipelines with concurrent generation,
host vs device timing) and writes JSON; a difference between the paths fails the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dprdm.benchmarks import gpu as bench
from dprdm.index.device import DeviceSearch

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--device", "cpu", "--eq-n", "300", "--eq-d", "24", "--d", "32", "--n", "3000", "--queries", "3"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "no CUDA GPU on this machine" in printed
    assert not out.exists()


def test_dry_run_on_torch_cpu_runs_every_part(tmp_path, capsys):
    out = tmp_path / "gpu-cpu.json"
    assert bench.main([*SMALL, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["machine"]["device"] == "cpu" and doc["parts"] == list(bench.PARTS)
    assert set(doc["equality"]) == {"flat-float16", "flat-float32", "ivf-float16", "ivf-float32"}
    assert all(r["differ"] == 0 and r["searches"] == 40 for r in doc["equality"].values())
    pipes = doc["pipelines"]
    if "skipped" not in pipes:  # torch without bf16 CPU kernels skips with a reason
        assert {p["dtype"] for p in pipes.values()} == {"bfloat16"}
        assert all(p["concurrent_equal"] == [True] * 4 and p["images_ok"] for p in pipes.values())
    (row,) = doc["timing"]
    assert (row["N"], row["d"], row["differ"]) == (3000, 32, 0)
    assert row["host_median_ms"] > 0 and row["device_median_ms"] > 0
    assert "all checks passed" in capsys.readouterr().out


def test_a_difference_between_the_paths_fails_the_run(tmp_path, monkeypatch):
    real = DeviceSearch.search_subsampled

    def off_by_one_ulp(self, query, **kw):
        res = real(self, query, **kw)
        res.scores[:1] = np.nextafter(res.scores[:1], np.inf)
        return res

    monkeypatch.setattr(DeviceSearch, "search_subsampled", off_by_one_ulp)
    out = tmp_path / "gpu-cpu.json"
    assert bench.main([*SMALL, "--parts", "equality", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert not doc["ok"] and all(r["differ"] > 0 for r in doc["equality"].values())


def test_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--parts", "equality,speed"])
    assert "unknown part 'speed'" in capsys.readouterr().err
