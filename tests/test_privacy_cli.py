"""Issue 12 item 10: ``dprdm privacy`` reports what the server charges (noise kind, safe rounding)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from dprdm.cli.main import main as cli_main
from dprdm.cli.privacy import safe_round
from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import SqliteLedger
from dprdm.privacy import Profile, epsilon_for
from dprdm.privacy.calibration import max_queries
from dprdm.privacy.pld import epsilon_pld, max_queries_pld
from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli_main(["privacy", *argv]) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.slow  # ~35-50 s: CI's slow step
def test_calibrated_sigma_printed_rounded_up_meets_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    """30 random targets: the printed sigma, parsed back, still meets epsilon (float noise and RDP for
    speed; the rounding does not depend on the noise kind or the accountant)."""
    rng = np.random.default_rng(12)
    for _ in range(30):
        eps, k, q = float(rng.uniform(0.3, 8.0)), int(rng.integers(2, 40)), float(rng.uniform(0.005, 0.2))
        out = _run(capsys, "calibrate", "--epsilon", repr(eps), "--delta", "1e-6", "--queries", "100",
                   "--k", str(k), "--q", repr(q), "--noise", "float", "--accountant", "rdp")
        sigma = float(out.split("=")[1].split()[0])
        assert epsilon_for(Profile(k=k, q=q, sigma=sigma, lam=1.0), queries=100, delta=1e-6) <= eps


def test_pld_is_the_float_default_and_calibrates_below_rdp(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17: float noise defaults to PLD (what the server uses); calibrating under PLD gives a
    smaller sigma than RDP, both in --json, and the printed PLD sigma meets the target (fine grid)."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        eps, k, q = float(rng.uniform(0.5, 6.0)), int(rng.integers(2, 30)), float(rng.uniform(0.01, 0.2))
        common = ["calibrate", "--epsilon", repr(eps), "--delta", "1e-6", "--queries", "50", "--k", str(k),
                  "--q", repr(q), "--noise", "float"]
        doc = json.loads(_run(capsys, *common, "--json"))
        assert doc["accountant"] == "pld" and doc["sigma"] < doc["sigma_rdp"]
        text = _run(capsys, *common)
        sigma = float(text.split("=")[1].split()[0])
        assert text.endswith(f"(float noise, PLD); RDP: {safe_round(doc['sigma_rdp'], up=True)}")
        assert epsilon_pld(profile=Profile(k=k, q=q, sigma=sigma, lam=1.0), queries=50, delta=1e-6) <= eps
    eps_doc = json.loads(_run(capsys, "epsilon", "--sigma", "0.05", "--q", "0.01", "--k", "23", "--queries",
                              "1455", "--delta", "2e-5", "--noise", "float", "--json"))
    assert eps_doc["accountant"] == "pld" and eps_doc["order"] is None and eps_doc["epsilon"] <= 9.44


def test_pld_below_one_lattice_step_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Discrete noise has a PLD pair (privacy.lattice_gdp) only for sigma >= one lattice step (2^-20)."""
    tiny = repr(2.0**-21)
    for cmd in (["max-queries", "--epsilon", "1", "--sigma", tiny], ["epsilon", "--sigma", tiny, "--queries", "5"]):
        assert cli_main(["privacy", *cmd, "--q", "0.01", "--k", "18", "--delta", "1e-7", "--accountant", "pld"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--accountant pld: PLD for discrete lattice noise needs sigma >=" in err
        assert f"found sigma {tiny}" in err
    doc = json.loads(_run(capsys, "max-queries", "--epsilon", "1", "--sigma", tiny, "--q", "0.01", "--k", "18",
                          "--delta", "1e-7", "--json"))
    assert doc["accountant"] == "rdp"  # the default falls back to RDP, as the server does


def test_discrete_pld_calibrates_between_float_pld_and_discrete_rdp(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["calibrate", "--epsilon", "9.44", "--delta", "2e-5", "--queries", "1000", "--k", "23", "--q", "0.01"]
    hard = json.loads(_run(capsys, *common, "--json"))
    fl = json.loads(_run(capsys, *common, "--noise", "float", "--json"))
    assert hard["accountant"] == "pld" and hard["noise"] == "discrete" and hard["dimension"] == 512
    assert fl["sigma"] < hard["sigma"] < hard["sigma_rdp"]
    assert epsilon_pld(profile=Profile(k=23, q=0.01, sigma=hard["sigma"], lam=1.0), queries=1000, delta=2e-5,
                       hardened_dimension=512) <= 9.44


def test_printed_epsilon_rounds_up_and_queries_down(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--sigma", "0.2", "--q", "0.01", "--k", "18", "--delta", "1e-7"]
    text = _run(capsys, "epsilon", *args, "--queries", "1000")
    full = json.loads(_run(capsys, "epsilon", *args, "--queries", "1000", "--json"))
    assert full["noise"] == "discrete" and full["dimension"] == 512 and full["accountant"] == "pld"
    printed = float(text.split("=")[1].split()[0])
    assert printed >= full["epsilon"] and printed == pytest.approx(full["epsilon"], rel=1e-5)
    p = Profile(k=18, q=0.01, sigma=0.2, lam=1.0)
    assert full["epsilon"] == epsilon_pld(profile=p, queries=1000, delta=1e-7, hardened_dimension=512)
    rdp = json.loads(_run(capsys, "epsilon", *args, "--queries", "1000", "--json", "--accountant", "rdp"))
    assert rdp["epsilon"] == epsilon_for(p, queries=1000, delta=1e-7, hardened_dimension=512) > full["epsilon"]
    fl = json.loads(_run(capsys, "epsilon", *args, "--queries", "1000", "--json", "--noise", "float"))
    assert fl["noise"] == "float" and fl["dimension"] is None and fl["epsilon"] < full["epsilon"]


def test_max_queries_is_the_discrete_curve_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """SPEC §4 reference profile: the CLI says what a private (discrete-noise, d = 512) index admits."""
    args = ["--epsilon", "9.44", "--delta", "2e-5", "--sigma", "0.05", "--q", "0.01", "--k", "23"]
    assert _run(capsys, "max-queries", *args, "--noise", "float", "--accountant", "rdp") == "max queries = 999 (float noise, RDP)"
    assert _run(capsys, "max-queries", *args, "--noise", "float") == "max queries = 1455 (float noise, PLD)"
    p = Profile(k=23, q=0.01, sigma=0.05, lam=1.0)
    expected = max_queries_pld(epsilon=9.44, delta=2e-5, profile=p, hardened_dimension=512)
    assert expected is not None and 1400 <= expected <= 1455
    assert _run(capsys, "max-queries", *args) == f"max queries = {expected} (discrete noise, PLD)"
    doc = json.loads(_run(capsys, "max-queries", *args, "--json"))
    assert doc["max_queries"] == expected and doc["accountant"] == "pld"
    assert doc["max_queries_rdp"] == max_queries(epsilon=9.44, delta=2e-5, profile=p, hardened_dimension=512) == 988
    assert _run(capsys, "max-queries", *args, "--accountant", "rdp") == "max queries = 988 (discrete noise, RDP)"


def test_server_admits_exactly_what_max_queries_reports(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """Budget epsilon = the CLI's epsilon for T queries of the served index (fake, d = 16, discrete noise):
    max-queries reports T and the server admits exactly T, then refuses."""
    t = 6
    profile = {"k": 5, "q": 0.5, "sigma": 0.8, "lambda": 0.5}
    prof_args = ["--sigma", "0.8", "--q", "0.5", "--k", "5", "--delta", "1e-5", "--dimension", "16"]
    eps = json.loads(_run(capsys, "epsilon", *prof_args, "--queries", str(t), "--json"))["epsilon"]
    reported = json.loads(_run(capsys, "max-queries", *prof_args, "--epsilon", repr(eps), "--json"))["max_queries"]
    assert reported == t
    cfg = make_config(
        indexes={"faces": {"path": "fake:domain=corpus-x,n=300,dim=16,public=1000", "bundle": "hash-16",
                           "profiles": {"default": profile}}},
        budgets={"corpus-x": {"delta": 1e-5, "epsilon": eps, "rule": "single"}},
    )
    with ServerThread(cfg, ledger=SqliteLedger(tmp_path / "ledger.sqlite3")) as srv, Client(srv.address, TENANT_TOKEN) as c:
        for i in range(reported):
            c.retrieve("faces", f"prompt {i}", profile="default")
        with pytest.raises(DprdmError) as err:
            c.retrieve("faces", "one more", profile="default")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_rounded_value_that_crosses_a_jump_of_the_discrete_bound_is_not_printed() -> None:
    """The discrete-noise bound is not monotone in sigma (at k 256, q 0.01, T 10,000, delta 2.5e-6,
    d 1280, epsilon 10: sigma 0.006706 meets the target, 0.00671 does not): the CLI prints a rounded
    value only after re-checking it, else the exact calibrated one."""
    import argparse

    from dprdm.cli.privacy import _checked
    from dprdm.privacy.calibration import meets_target

    common = {"epsilon": 10.0, "delta": 2.5e-6, "queries": 10_000}
    args = argparse.Namespace(k=256, q=0.01, sigma=None, noise="discrete", dimension=1280)

    def meets(sigma: float) -> bool:
        return meets_target(Profile(k=256, q=0.01, sigma=sigma, lam=1.0), hardened_dimension=1280, **common)

    assert meets(0.006706) and not meets(0.00671)  # the jump this test relies on
    assert _checked("0.00671", 0.006706, "sigma", args, "rdp", common) == repr(0.006706)
    assert _checked("0.006706", 0.006706, "sigma", args, "rdp", common) == "0.006706"
