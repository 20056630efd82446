"""benchmarks/fidelity.py (issue 16 item 10): a ``--quick`` run writes the documented JSON, and its
numbers obey properties that a broken release path or calibration would violate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dprdm.benchmarks import fidelity


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fidelity") / "fidelity.json"
    assert fidelity.main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_run_writes_the_documented_structure(quick: dict) -> None:
    for key in (
        "best",
        "table",
        "fixed_profiles",
        "recommended_profiles",
        "noise_multipliers",
        "delta",
        "useful",
    ):
        assert key in quick, key
    assert set(quick["recommended_profiles"]) == {"32", "1024"}
    fields = {
        "epsilon",
        "queries",
        "k",
        "q",
        "sigma",
        "lambda",
        "dimension",
        "cosine_to_mean",
        "cosine_to_query",
    }
    entries = [e for v in quick["recommended_profiles"].values() for e in v]
    assert entries, "the quick run recommends nothing at d = 32 (epsilon 10, T 1,000 was useful there)"
    for e in entries:
        assert fields <= set(e)
        assert e["epsilon_spent"] <= e["epsilon"]  # checked with the hardened curve at its dimension
        assert e["cosine_to_mean"] >= quick["useful"]["cos_mean_median_min"]
    for row in quick["best"]:
        stats = row["cos_mean"]
        assert -1.0 <= stats["q25"] <= stats["median"] <= stats["q75"] <= 1.0
        rule = quick["useful"]
        assert row["useful"] == (
            stats["median"] >= rule["cos_mean_median_min"]
            and stats["median"] - row["public_cos_mean"] >= rule["gain_over_public_min"]
            and row["retrieval_specificity"]
            >= rule["retrieval_specificity_share_min"] * row["reference_specificity"]
            and row["k"] < row["expected_survivors"]
        )


def test_recommended_profile_costs_at_most_its_target_under_the_server_curve(quick: dict) -> None:
    from dprdm.privacy import epsilon_for
    from dprdm.privacy.mechanism import Profile

    e = quick["recommended_profiles"]["32"][0]
    prof = Profile(k=e["k"], q=e["q"], sigma=e["sigma"], lam=e["lambda"])
    spent = epsilon_for(prof, queries=e["queries"], delta=e["delta"], hardened_dimension=e["dimension"])
    assert spent <= e["epsilon"]


def test_fixed_sigma_loses_fidelity_as_the_dimension_grows(quick: dict) -> None:
    """The noise norm is sigma * sqrt(d): the same (k 20, q 1, sigma 0.05) that keeps the release
    close to the non-private mean at d = 32 loses much of it at d = 1024."""
    rows = {r["dimension"]: r for r in quick["fixed_profiles"]["rows"] if r["name"].startswith("paper-k20")}
    assert rows[32]["cos_mean_same_k"]["median"] > 0.85
    assert rows[1024]["cos_mean_same_k"]["median"] < rows[32]["cos_mean_same_k"]["median"] - 0.3
    assert rows[1024]["noise_norm"] == pytest.approx(0.05 * 32, rel=1e-3)


def test_huge_epsilon_without_subsampling_recovers_the_non_private_mean(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    fidelity.main(
        [
            "--quick",
            "--dimensions",
            "1024",
            "--epsilons",
            "1e7",
            "--q",
            "1.0",
            "--k",
            "16",
            "--lam",
            "1.0",
            "--no-pld",
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["best"]
    assert row["sigma"] < 2e-3
    assert row["cos_mean_same_k"]["q25"] > 0.99  # q = 1, no noise to speak of: the non-private mean itself


def test_scaled_sigma_matches_direct_calibration() -> None:
    """sigma_for(noise_multiplier(...)) is calibrate_sigma at that (k, d) up to bisection tolerance
    (the hardened curve depends on (q, z) only) -- or above it, never below by more than the tolerance."""
    from dprdm.privacy import calibrate_sigma

    target = {"epsilon": 10.0, "delta": 1e-5, "queries": 1000, "q": 0.1}
    z = fidelity.noise_multiplier(**target)
    direct = calibrate_sigma(k=64, hardened_dimension=768, **target)
    assert fidelity.sigma_for(z, 64, 768) == pytest.approx(direct, rel=1e-4)


def test_synthetic_data_has_the_stated_geometry() -> None:
    ds = fidelity.synthetic(
        256, clusters=3, per_cluster=200, queries=50, query_cos=0.5, anisotropy=0.25, seed=1
    )
    norms = np.linalg.norm(ds.stored.astype(np.float64), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-6) and np.allclose(np.linalg.norm(ds.queries, axis=1), 1.0)
    # each query's best record is in its cluster: cosine to it near query_cos * record_cos (0.3-0.45)
    best = (ds.queries @ ds.stored.T.astype(np.float64)).max(axis=1)
    assert np.all((best > 0.3) & (best < 0.75))


def test_bad_arguments_are_refused_with_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fidelity.main(["--quick", "--per-cluster", "0", "--out", str(tmp_path / "f.json")])
    assert "--per-cluster must be >= 1; found 0" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
