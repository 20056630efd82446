"""The empirical privacy audit: its statistics, and its power against broken mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dprdm.index.search import search_array
from dprdm.privacy import Profile
from dprdm.privacy.empirical_audit import (
    audit_retrieval,
    claimed_epsilon,
    clopper_pearson_upper,
    epsilon_lower_bound,
    worst_case_corpus,
)


def test_clopper_pearson_upper_bound() -> None:
    assert clopper_pearson_upper(0, 100, 0.975) == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_upper(100, 100, 0.975) == 1.0
    assert clopper_pearson_upper(10, 100, 0.975) > 0.1


def _gaussian_epsilon(shift: float, delta: float) -> float:
    """Exact epsilon of the 1-D Gaussian mechanism with sensitivity/std ratio ``shift`` (Balle & Wang 2018)."""

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(shift / 2 - eps / shift) - math.exp(eps) * stats.norm.cdf(-shift / 2 - eps / shift)

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_lower_bound_is_below_the_truth_and_informative() -> None:
    rng = np.random.default_rng(4)
    shift, delta = 2.0, 1e-5
    truth = _gaussian_epsilon(shift, delta)
    below = [epsilon_lower_bound(rng.normal(0, 1, 20000), rng.normal(shift, 1, 20000), delta)[0] for _ in range(5)]
    assert all(b <= truth for b in below)
    assert min(below) > 0.35 * truth  # the audit has power on a plain Gaussian
    same = epsilon_lower_bound(rng.normal(0, 1, 20000), rng.normal(0, 1, 20000), delta)[0]
    assert same < 0.2


def test_worst_case_corpus_attains_the_sensitivity() -> None:
    u, others = worst_case_corpus(3, 5)
    assert np.allclose(others @ u, -1) and np.isclose(u @ u, 1)
    search = search_array
    with_canary = np.vstack([u, others])
    sel_with = search(with_canary, np.arange(4, dtype=np.int64), u, 3, 1.0, np.random.default_rng(0))
    sel_without = search(others, np.arange(1, 4, dtype=np.int64), u, 3, 1.0, np.random.default_rng(0))
    assert np.linalg.norm(sel_with.sum(0) / 3 - sel_without.sum(0) / 3) == pytest.approx(2 / 3)


def test_claims_of_the_broken_variants() -> None:
    p = Profile(k=4, q=0.5, sigma=1.0, lam=1.0)
    assert claimed_epsilon(p, "sensitivity_1_over_k", 1e-5) < claimed_epsilon(p, "correct", 1e-5)
    assert claimed_epsilon(p, "shared_coins", 1e-5, batch=4) > claimed_epsilon(p, "correct", 1e-5)
    with pytest.raises(ValueError, match="unknown audit variant"):
        audit_retrieval(search_array, p, variant="nope", trials=20, rng=np.random.default_rng(0))


def test_correct_mechanism_audits_below_its_claim() -> None:
    p = Profile(k=1, q=1.0, sigma=3.0, lam=1.0)
    res = audit_retrieval(search_array, p, trials=6000, rng=np.random.default_rng(0))
    assert 0.0 <= res.audited_lower_bound <= res.claimed_epsilon


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,profile",
    [
        ("sigma_halved", Profile(k=1, q=1.0, sigma=3.0, lam=1.0)),
        ("sensitivity_1_over_k", Profile(k=1, q=1.0, sigma=3.0, lam=1.0)),
        ("divide_by_found", Profile(k=8, q=0.2, sigma=0.25, lam=1.0)),
    ],
)
def test_broken_variants_audit_above_their_claim(variant: str, profile: Profile) -> None:
    n_others = 2 if variant == "divide_by_found" else None  # few records: few survivors to divide by
    res = audit_retrieval(search_array, profile, variant=variant, trials=40000, n_others=n_others,
                          rng=np.random.default_rng(1))
    assert res.audited_lower_bound > res.claimed_epsilon


@pytest.mark.slow
def test_shared_coins_audit_above_their_claim() -> None:
    """A batch of 256 queries sharing one subsample: claimed as 256 independent releases."""
    profile = Profile(k=1, q=0.1, sigma=8.0, lam=1.0)
    res = audit_retrieval(search_array, profile, variant="shared_coins", trials=4000, batch=256, n_others=50,
                          rng=np.random.default_rng(3))
    assert res.audited_lower_bound > res.claimed_epsilon


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--trials", "5"], "need at least 20 trials"),
        (["--q", "0", "--trials", "100"], "q must be in (0, 1]"),
        (["--delta", "3", "--trials", "100"], "delta must be in (0, 1)"),
        (["--trials", "-3"], "--trials must be >= 1"),
    ],
)
def test_audit_cli_rejects_bad_arguments_in_one_line(argv: list[str], message: str, capsys) -> None:
    from dprdm.cli.main import main

    try:
        rc = main(["privacy", "audit", *argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
