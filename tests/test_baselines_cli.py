"""``dprdm baseline train|sample`` end to end (tiny model, a few steps) and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dprdm.baselines.artifacts import load_baseline
from dprdm.baselines.data import write_image_dir
from dprdm.baselines.tiny import write_tiny_backbone
from dprdm.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = write_tiny_backbone(root / "model", size=8)
    rng = np.random.default_rng(0)
    data = write_image_dir(root / "data", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                           [f"a {c} circle" for c in ("red", "blue", "green", "red", "blue", "green")])
    return model, data


def _train(model: Path, data: Path, out: Path, method: str, *extra: str) -> int:
    return main(["baseline", "train", "--method", method, "--model", str(model), "--data", str(data),
                 "--epsilon", "4", "--delta", "1e-3", "--out", str(out), "--insecure-dp-seed", "1",
                 "--threads", "1", "--steps", "2", "--batch-size", "3", "--ti-steps", "2", *extra])


@pytest.mark.parametrize(("method", "extra"), [("dp-lora", ("--multiplicity", "2", "--rank", "2")),
                                               ("dpagg-ti", ("--sample-rate", "0.5"))])
def test_train_then_sample(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           method: str, extra: tuple[str, ...]) -> None:
    model, data = setup
    out = tmp_path / "baseline"
    assert _train(model, data, out, method, *extra) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and summary["epsilon"] <= 4.0 and summary["production"] is False
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["delta"] == 1e-3 and report["accountant"]["events"] and "NOT suitable" in report["noise_source"]
    _, meta, rep, emb = load_baseline(out)
    assert meta["method"] == method and rep.epsilon == summary["epsilon"]
    assert (emb is not None) == (method == "dpagg-ti")
    images = tmp_path / "images"
    assert main(["baseline", "sample", "--model", str(out), "--prompt", "a red circle", "--n", "2",
                 "--steps", "2", "--seed", "0", "--out", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["0000.png", "0001.png"]


def test_errors_name_the_bad_value(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = setup
    assert main(["baseline", "train", "--method", "dp-ldm", "--model", str(model), "--data", str(data),
                 "--epsilon", "1", "--delta", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "delta" in capsys.readouterr().err
    assert main(["baseline", "train", "--method", "dp-ldm", "--model", str(model), "--data", str(tmp_path / "none"),
                 "--epsilon", "1", "--delta", "1e-3", "--out", str(tmp_path / "o")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert main(["baseline", "sample", "--model", str(tmp_path / "missing"), "--prompt", "x",
                 "--out", str(tmp_path / "i")]) == 2
    assert "lacks baseline.json" in capsys.readouterr().err


def test_sample_refuses_a_changed_backbone(setup: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, data = setup
    out = tmp_path / "b"
    assert _train(model, data, out, "dp-ldm") == 0
    meta = json.loads((out / "baseline.json").read_text())
    meta["base_unet_sha256"] = "0" * 64
    (out / "baseline.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["baseline", "sample", "--model", str(out), "--prompt", "x", "--out", str(tmp_path / "i")]) == 2
    assert "trained on" in capsys.readouterr().err


def _production_train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["baseline", "train", "--method", "dpagg-ti", "--model", str(model), "--data", str(data),
                 "--epsilon", "4", "--delta", "1e-3", "--out", str(out), "--threads", "1", "--ti-steps", "2",
                 "--sample-rate", "0.5", *extra])


def test_training_charges_the_domain_ledger_before_writing(setup: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dprdm.ledger import SqliteLedger
    from dprdm.privacy import Budget, Profile

    model, data = setup
    path = tmp_path / "ledger.sqlite3"
    with SqliteLedger(path) as led:
        led.create_budget("faces", Budget.renyi_filter(5.0, 1e-3, [Profile(k=4, q=0.5, sigma=1.0, lam=1.0)]))
        led.create_budget("single", Budget.single(6.0, 1e-3, Profile(k=4, q=0.5, sigma=1.0, lam=1.0)))
    assert _production_train(model, data, tmp_path / "a", "--ledger", str(path), "--domain", "faces") == 0
    with SqliteLedger(path) as led:
        state = led.budget_state("faces")
        (spend,) = led.audit_trail("faces")
        assert state.spends == 1 and spend.status == "released" and spend.tenant == "baseline:dpagg-ti"
        assert state.epsilon_spent > 0
    # Two runs at epsilon 4 compose to ~5.7 > 5: the second is refused and writes nothing.
    assert _production_train(model, data, tmp_path / "b", "--ledger", str(path), "--domain", "faces") == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "b").exists()
    # A single-profile budget cannot take a baseline's charge.
    assert _production_train(model, data, tmp_path / "c", "--ledger", str(path), "--domain", "single") == 2
    assert "Rényi-filter" in capsys.readouterr().err and not (tmp_path / "c").exists()
