"""Benchmark scripts: each one imports (its names still exist after refactors), and the utility
metric shared by ``benchmarks/utility.py`` and ``benchmarks/baselines.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Judge:
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert images.shape[0] == self.labels.shape[0]
        return self.labels


class _Encoder:
    def encode_pixels(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(images.shape[0], -1)[:, :4].astype(np.float64)


def test_score_images_counts_each_attribute() -> None:
    util = _load("utility")
    # (shape, colour, fill, background) per image; targets (shape, colour); private style (1, 1),
    # i.e. (striped, dotted).
    labels = np.array([[0, 0, 1, 1], [1, 2, 1, 0], [3, 3, 0, 1], [2, 1, 1, 1]])
    targets = np.array([[0, 0], [1, 1], [3, 3], [0, 1]])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(4, 24, 24, 3), dtype=np.uint8)
    feats = rng.normal(size=(50, 4))
    out = util.score_images(("striped", "dotted"), _Judge(labels), _Encoder(), images, targets, feats)
    assert out["shape_acc"] == pytest.approx(0.75)
    assert out["colour_acc"] == pytest.approx(0.75)
    assert out["content_acc"] == pytest.approx(0.5)
    assert out["fill_rate"] == pytest.approx(0.75)
    assert out["background_rate"] == pytest.approx(0.75)
    assert out["private_style_rate"] == pytest.approx(0.5)
    assert out["content_and_style"] == pytest.approx(0.25)
    assert np.isfinite(out["fd_to_private"]) and out["fd_to_private"] > 0



@pytest.mark.parametrize(
    "script", sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__" and not p.stem.startswith("load_"))
)
def test_every_benchmark_script_imports_and_has_a_main(script: str) -> None:
    mod = _load(script)
    assert callable(getattr(mod, "main", None)), f"benchmarks/{script}.py has no main()"


def test_ledger_benchmark_runs_end_to_end(tmp_path) -> None:
    """A very short run of benchmarks/ledger.py: every part of it still works (JSON written)."""
    import json

    ledger = _load("ledger")
    ledger.main(["--seconds", "0.05", "--threads", "1,4", "--out", str(tmp_path / "out"), "--tmp", str(tmp_path)])
    (result,) = (tmp_path / "out").glob("ledger-*.json")
    doc = json.loads(result.read_text())
    assert doc["admission"]["ledger_rule_admits_us"] > 0
