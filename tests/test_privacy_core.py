"""The privacy core beyond the RDP formula: mechanism, accountant, budgets, calibration, RNG, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from dprdm.cli.main import main as cli_main
from dprdm.privacy import (
    DEFAULT_ORDERS,
    Budget,
    Profile,
    RdpAccountant,
    RetrievalEvent,
    SubsampledGaussianEvent,
    calibrate_k,
    calibrate_q,
    calibrate_sigma,
    check_delta_for_size,
    check_dp_generator,
    default_delta,
    epsilon_for,
    filter_capacity,
    make_dp_generator,
    max_queries,
    new_dp_generator,
    profile_rdp,
    release,
)
from dprdm.privacy.accountant import event_from_dict
from dprdm.privacy.orders import validate_orders

# ---------------------------------------------------------------- import purity


def test_privacy_core_imports_without_torch_faiss_grpc() -> None:
    code = (
        "import sys, dprdm.privacy, dprdm.cli.privacy;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'faiss', 'grpc', 'diffusers', 'open_clip'});"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == ""


# ---------------------------------------------------------------- order grid


def test_order_grid_contains_the_spec_minimum() -> None:
    grid = set(DEFAULT_ORDERS)
    required = {1.05, 1.1, 1.15, 1.2} | {1.25 + 0.25 * i for i in range(39)} | set(map(float, range(11, 65)))
    assert required | {128.0, 256.0, 512.0, 1024.0} <= grid
    assert list(DEFAULT_ORDERS) == sorted(DEFAULT_ORDERS)
    with pytest.raises(ValueError, match="found 0.5"):
        validate_orders([2.0, 0.5])


# ---------------------------------------------------------------- profile and release


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"k": 0, "q": 0.1, "sigma": 0.1, "lam": 0.5}, "k"),
        ({"k": 2.5, "q": 0.1, "sigma": 0.1, "lam": 0.5}, "k"),
        ({"k": True, "q": 0.1, "sigma": 0.1, "lam": 0.5}, "k"),
        ({"k": 4, "q": 0.0, "sigma": 0.1, "lam": 0.5}, "q"),
        ({"k": 4, "q": 1.01, "sigma": 0.1, "lam": 0.5}, "q"),
        ({"k": 4, "q": float("nan"), "sigma": 0.1, "lam": 0.5}, "q"),
        ({"k": 4, "q": 0.1, "sigma": -0.1, "lam": 0.5}, "sigma"),
        ({"k": 4, "q": 0.1, "sigma": float("inf"), "lam": 0.5}, "sigma"),
        ({"k": 4, "q": 0.1, "sigma": 0.1, "lam": 1.5}, "lambda"),
        ({"k": 4, "q": 0.1, "sigma": 0.1, "lam": "0.5"}, "lambda"),
    ],
)
def test_profile_validation_names_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} "):
        Profile(**kwargs)


def test_profile_facts_and_round_trip() -> None:
    p = Profile(k=18, q=0.01, sigma=0.2, lam=0.7)
    assert p.sensitivity == pytest.approx(2 / 18)
    assert p.noise_multiplier == pytest.approx(1.8)
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="sigma = 0"):
        Profile(k=4, q=0.1, sigma=0.0, lam=0.5).require_private_ok()
    Profile(k=4, q=0.1, sigma=0.0, lam=0.0).require_private_ok()  # no retrieval: fine


def test_lambda_zero_costs_nothing_and_releases_the_query() -> None:
    p = Profile(k=4, q=0.5, sigma=0.0, lam=0.0)
    assert np.all(profile_rdp(p) == 0.0)
    u = np.array([0.6, 0.8])
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    out = release(p, query=u, selected=np.ones((3, 2)), rng=rng)
    assert np.array_equal(out, u) and rng.bit_generator.state == before  # no noise drawn
    assert max_queries(epsilon=1.0, delta=1e-6, profile=p) is None


def test_release_divides_by_k_with_zero_padding_and_clamps() -> None:
    p = Profile(k=4, q=1.0, sigma=0.0, lam=1.0)
    selected = np.array([[1.0, 0.0], [0.0, 2.0]])  # second row has norm 2: clamped to 1
    out = release(p, query=np.array([0.0, 1.0]), selected=selected, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out, [0.25, 0.25])
    np.testing.assert_allclose(release(p, query=np.array([0.0, 1.0]), selected=np.zeros((0, 2)), rng=np.random.default_rng(0)), [0, 0])
    with pytest.raises(ValueError, match="k = 4"):
        release(p, query=np.array([0.0, 1.0]), selected=np.ones((5, 2)), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        release(p, query=np.array([0.0, 1.0]), selected=np.ones((2, 3)), rng=np.random.default_rng(0))


def test_release_noise_and_mixing_statistics() -> None:
    p = Profile(k=2, q=1.0, sigma=0.3, lam=0.25)
    u = np.array([1.0, 0.0, 0.0])
    x = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    rng = np.random.default_rng(1)
    draws = np.stack([release(p, query=u, selected=x, rng=rng) for _ in range(20000)])
    np.testing.assert_allclose(draws.mean(axis=0), 0.25 * np.array([0, 1, 0]) + 0.75 * u, atol=0.005)
    np.testing.assert_allclose(draws.std(axis=0), 0.25 * 0.3, rtol=0.03)


def _top_k_mean(query: np.ndarray, data: np.ndarray, ids: np.ndarray, kept: np.ndarray, k: int) -> np.ndarray:
    """Reference: top-k of the kept rows under (score desc, id asc), mean divided by k."""
    rows = np.flatnonzero(kept)
    scores = data[rows] @ query
    order = sorted(range(rows.size), key=lambda i: (-scores[i], ids[rows[i]]))[:k]
    return data[rows[order]].sum(axis=0) / k if order else np.zeros(data.shape[1])


def test_empirical_sensitivity_never_exceeds_two_over_k() -> None:
    """Add/remove one record under the same coins for the others: ||v - v'|| <= 2/k."""
    rng = np.random.default_rng(2026)
    worst = 0.0
    for trial in range(400):
        n, d, k = int(rng.integers(1, 40)), int(rng.integers(2, 6)), int(rng.integers(1, 8))
        data = rng.normal(size=(n + 1, d))
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        query = rng.normal(size=d)
        query /= np.linalg.norm(query)
        if trial % 2:  # adversarial: the extra record aligned with the query, antipodal-ish to the rest
            data[-1] = query
            data[:-1] = -np.abs(data[:-1] @ query)[:, None] * query + 0.01 * data[:-1]
            data /= np.linalg.norm(data, axis=1, keepdims=True)
        ids = rng.permutation(n + 1)
        kept = rng.random(n + 1) < rng.uniform(0.2, 1.0)
        kept[-1] = True
        v_with = _top_k_mean(query, data, ids, kept, k)
        v_without = _top_k_mean(query, data[:-1], ids[:-1], kept[:-1], k)
        worst = max(worst, float(np.linalg.norm(v_with - v_without)) * k / 2)
    assert worst <= 1.0 + 1e-12
    assert worst > 0.9  # the bound is attained in the adversarial cases


# ---------------------------------------------------------------- accountant


def test_accountant_composes_additively_and_mixed_profiles() -> None:
    p1, p2 = Profile(k=10, q=0.01, sigma=0.3, lam=0.5), Profile(k=4, q=0.1, sigma=1.0, lam=1.0)
    acc = RdpAccountant().compose(RetrievalEvent(p1), 3).compose(RetrievalEvent(p2), 2)
    np.testing.assert_allclose(acc.rdp, 3 * profile_rdp(p1) + 2 * profile_rdp(p2))
    assert acc.events == {RetrievalEvent(p1): 3, RetrievalEvent(p2): 2}
    assert RdpAccountant().get_epsilon(1e-6) == 0.0


def test_accountant_validates_before_changing_state() -> None:
    acc = RdpAccountant().compose(SubsampledGaussianEvent(0.1, 1.0), 5)
    before = acc.to_dict()
    with pytest.raises(TypeError, match="unsupported"):
        acc.compose("not an event")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        acc.compose(SubsampledGaussianEvent(0.1, 1.0), -1)
    assert acc.to_dict() == before


def test_accountant_json_round_trip_and_tamper_detection() -> None:
    acc = RdpAccountant().compose(RetrievalEvent(Profile(k=8, q=0.05, sigma=0.4, lam=0.6)), 7)
    acc.compose(SubsampledGaussianEvent(0.2, 0.0), 1)  # infinite curve survives JSON
    state = json.loads(json.dumps(acc.to_dict()))
    restored = RdpAccountant.from_dict(state)
    assert np.array_equal(restored.rdp, acc.rdp)
    state["rdp"][3] = 0.0
    with pytest.raises(ValueError, match="does not match"):
        RdpAccountant.from_dict(state)
    with pytest.raises(ValueError, match="version"):
        RdpAccountant.from_dict({**acc.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown privacy event type"):
        event_from_dict({"type": "laplace"})


def test_get_delta_inverts_get_epsilon() -> None:
    acc = RdpAccountant().compose(RetrievalEvent(Profile(k=18, q=0.01, sigma=0.2, lam=1.0)), 1000)
    eps = acc.get_epsilon(1e-7)
    assert acc.get_delta(eps) == pytest.approx(1e-7, rel=1e-6)
    assert acc.get_delta(eps * 1.1) < 1e-7


# ---------------------------------------------------------------- properties


def test_epsilon_monotone_in_t_q_sigma_k() -> None:
    base = {"k": 10, "q": 0.02, "sigma": 0.3, "lam": 1.0}
    eps = lambda t=100, **kw: epsilon_for(Profile(**{**base, **kw}), queries=t, delta=1e-6)  # noqa: E731
    assert eps(t=0) == 0.0
    assert eps(t=10) < eps(t=100) < eps(t=1000)
    assert eps(q=0.01) < eps(q=0.02) < eps(q=0.1)
    assert eps(sigma=0.5) < eps(sigma=0.3) < eps(sigma=0.2)
    assert eps(k=20) < eps(k=10) < eps(k=5)


# ---------------------------------------------------------------- budgets


def test_single_profile_budget_admits_exactly_max_queries() -> None:
    p = Profile(k=18, q=0.01, sigma=0.2, lam=1.0)
    budget = Budget.single(1.0, 1e-7, p)
    t_max = max_queries(epsilon=1.0, delta=1e-7, profile=p)
    assert t_max == 1006
    charge = budget.charge(p)
    assert budget.admits(charge * (t_max - 1), charge)
    assert not budget.admits(charge * t_max, charge)
    with pytest.raises(ValueError, match="serves only profile"):
        budget.charge(Profile(k=18, q=0.02, sigma=0.2, lam=1.0))


def test_renyi_filter_is_sound_at_its_order() -> None:
    profiles = [Profile(k=10, q=0.01, sigma=0.3, lam=0.5), Profile(k=4, q=0.05, sigma=1.0, lam=1.0)]
    budget = Budget.renyi_filter(2.0, 1e-6, profiles)
    idx = DEFAULT_ORDERS.index(budget.filter_order)
    spent = np.zeros(len(DEFAULT_ORDERS))
    admitted = 0
    for i in range(100000):
        charge = budget.charge(profiles[i % 2])
        if not budget.admits(spent, charge):
            break
        spent += charge
        admitted += 1
    assert admitted > 10
    # At the filter order alone, the composed RDP converts to at most the budget's epsilon.
    a = budget.filter_order
    eps_at_order = spent[idx] + math.log1p(-1 / a) - (math.log(1e-6) + math.log(a)) / (a - 1)
    assert eps_at_order <= 2.0 + 1e-12
    assert filter_capacity(2.0, 1e-6, a) > 0
    with pytest.raises(ValueError, match="grid"):
        Budget(epsilon=1.0, delta=1e-6, filter_order=3.1)


def test_budget_and_delta_validation() -> None:
    assert default_delta(1000) == pytest.approx(1e-4)
    check_delta_for_size(1e-4, 1000)
    with pytest.raises(ValueError, match="delta must be in"):
        check_delta_for_size(1e-3, 1000)
    with pytest.raises(ValueError, match="public size"):
        default_delta(0)
    with pytest.raises(ValueError, match="epsilon"):
        Budget.single(0.0, 1e-6, Profile(k=1, q=1.0, sigma=1.0, lam=1.0))
    with pytest.raises(ValueError, match="exactly one"):
        Budget(epsilon=1.0, delta=1e-6)
    b = Budget.renyi_filter(3.0, 1e-6, [Profile(k=4, q=0.1, sigma=1.0, lam=1.0)])
    assert Budget.from_dict(json.loads(json.dumps(b.to_dict()))) == b


# ---------------------------------------------------------------- calibration


def test_calibration_solves_each_parameter() -> None:
    target = {"epsilon": 1.0, "delta": 1e-7, "queries": 1000}
    sigma = calibrate_sigma(k=18, q=0.01, **target)
    assert epsilon_for(Profile(k=18, q=0.01, sigma=sigma, lam=1.0), queries=1000, delta=1e-7) <= 1.0
    assert epsilon_for(Profile(k=18, q=0.01, sigma=sigma * 0.999, lam=1.0), queries=1000, delta=1e-7) > 1.0
    assert sigma == pytest.approx(0.2, rel=0.01)
    k = calibrate_k(sigma=0.2, q=0.01, **target)
    assert k == 18
    q = calibrate_q(sigma=0.2, k=18, **target)
    assert epsilon_for(Profile(k=18, q=q, sigma=0.2, lam=1.0), queries=1000, delta=1e-7) <= 1.0
    assert epsilon_for(Profile(k=18, q=q * 1.001, sigma=0.2, lam=1.0), queries=1000, delta=1e-7) > 1.0
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_sigma(epsilon=-1.0, delta=1e-7, queries=10, k=1, q=0.1)
    with pytest.raises(ValueError, match="no k"):
        calibrate_k(epsilon=1.0, delta=1e-7, queries=10, sigma=0.0, q=0.1)


# ---------------------------------------------------------------- randomness


def test_dp_generator_is_chacha_and_fresh() -> None:
    a, b = new_dp_generator(), new_dp_generator()
    check_dp_generator(a, production=True)
    assert not np.array_equal(a.normal(size=8), b.normal(size=8))


@pytest.mark.parametrize("bitgen", [np.random.PCG64, np.random.Philox, np.random.MT19937, np.random.SFC64])
def test_statistical_generators_refused_in_production(bitgen: type) -> None:
    rng = np.random.Generator(bitgen(0))
    with pytest.raises(ValueError, match=bitgen.__name__):
        check_dp_generator(rng, production=True)
    check_dp_generator(rng, production=False)


@pytest.mark.parametrize("rounds", [8, 12])
def test_reduced_round_chacha_refused_in_production(rounds: int) -> None:
    """randomgen keeps the round count in state["state"]["rounds"] (issue 12, item 5)."""
    import randomgen

    rng = np.random.Generator(randomgen.ChaCha(key=int.from_bytes(b"k" * 32, "little"), rounds=rounds))
    with pytest.raises(ValueError, match=f"ChaCha with {rounds} rounds"):
        check_dp_generator(rng, production=True)


@pytest.mark.parametrize("how", ["seed", "key"])
def test_fixed_seed_or_chosen_key_chacha_refused_in_production(how: str) -> None:
    import randomgen

    bg = randomgen.ChaCha(seed=7, rounds=20) if how == "seed" else randomgen.ChaCha(key=7, counter=0, rounds=20)
    rng = np.random.Generator(bg)
    with pytest.raises(ValueError, match="not keyed from os.urandom"):
        check_dp_generator(rng, production=True)
    check_dp_generator(rng, production=False)


def test_seed_refused_in_production() -> None:
    with pytest.raises(ValueError, match="seed=3"):
        make_dp_generator(production=True, seed=3)
    assert make_dp_generator(production=False, seed=3).normal() == np.random.default_rng(3).normal()
    with pytest.raises(TypeError):
        check_dp_generator(np.random.RandomState(0), production=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------- command line


def test_cli_epsilon_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["privacy", "epsilon", "--sigma", "0.2", "--q", "0.01", "--k", "18", "--queries", "1000",
                   "--delta", "1e-7", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and round(out["epsilon"], 2) == 0.93 and out["order"] is None and out["accountant"] == "pld"
    rc = cli_main(["privacy", "epsilon", "--sigma", "0.2", "--q", "0.01", "--k", "18", "--queries", "1000",
                   "--delta", "1e-7", "--json", "--accountant", "rdp"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and round(out["epsilon"], 2) == 1.0 and out["order"] == 25.0


def test_cli_calibrate_and_max_queries(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["privacy", "calibrate", "--epsilon", "1", "--delta", "1e-7", "--queries", "1000",
                     "--sigma", "0.2", "--q", "0.01", "--json", "--noise", "float", "--accountant", "rdp"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 18
    assert cli_main(["privacy", "max-queries", "--epsilon", "1", "--delta", "1e-7", "--sigma", "0.2",
                     "--q", "0.01", "--k", "18", "--noise", "float", "--accountant", "rdp"]) == 0
    assert capsys.readouterr().out.strip() == "max queries = 1006 (float noise, RDP)"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--sigma", "abc", "--q", "0.1", "--k", "3", "--queries", "10", "--delta", "1e-6"], "--sigma"),
        (["--sigma", "0.1", "--q", "2", "--k", "3", "--queries", "10", "--delta", "1e-6"], "q must be"),
        (["--sigma", "0.1", "--q", "0.1", "--k", "0", "--queries", "10", "--delta", "1e-6"], "--k"),
        (["--sigma", "0.1", "--q", "0.1", "--k", "3", "--queries", "10", "--delta", "1.5"], "delta"),
        (["--sigma", "0.1", "--q", "0.1", "--k", "3", "--queries", "10"], "--delta"),
    ],
)
def test_cli_bad_arguments_one_line(argv: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dprdm", "privacy", "epsilon", *argv], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_fast_admission_equals_the_per_order_formula() -> None:
    """``Budget`` (precomputed grid constants) against Thm 21 evaluated order by order."""
    from dprdm.privacy.conversion import epsilon_per_order

    rng = np.random.default_rng(8)
    budget = Budget.single(3.0, 1e-9, Profile(k=4, q=0.1, sigma=1.0, lam=1.0))
    for scale in (1e-12, 1e-4, 0.05, 1.0, 30.0):
        for _ in range(50):
            curve = rng.exponential(scale, len(DEFAULT_ORDERS))
            per_order = epsilon_per_order(curve, DEFAULT_ORDERS, 1e-9)
            tv = 1e-18 + math.expm1(-float(curve.min())) >= 0.0
            expected = 0.0 if tv else max(float(per_order.min()), 0.0)
            assert budget.spent_epsilon(curve) == expected
            assert budget.admits(curve, np.zeros_like(curve)) == (expected <= 3.0)
