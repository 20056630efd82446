"""The shared order grid (SPEC §4) and the conservative migration of curves between grids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dprdm.privacy import DEFAULT_ORDERS, Profile, epsilon_from_rdp, profile_rdp, rdp_subsampled_gaussian
from dprdm.privacy.accountant import curve_from_json, curve_to_json
from dprdm.privacy.discrete import hardened_rdp
from dprdm.privacy.orders import MAX_ORDER_RATIO, ORDERS_V1, migrate_curve

# SPEC §4's example: one query of a small-epsilon profile (z = sigma k / 2 = 2.6598).
SMALL = Profile(k=62, q=0.00139, sigma=0.0858, lam=1.0)
SMALL_DELTA = 1.08e-6


def _reference_migrate(curve: list[float], old: list[float], new: list[float]) -> list[float]:
    """The rule written out: the value at the smallest old order >= a, +inf above them all."""
    by_order = dict(zip(old, curve, strict=True))
    return [by_order[min(b for b in old if b >= a)] if a <= max(old) else math.inf for a in new]


# ---------------------------------------------------------------- the grid


def test_grid_is_the_spec_grid() -> None:
    grid = np.asarray(DEFAULT_ORDERS)
    assert isinstance(DEFAULT_ORDERS, tuple) and all(type(a) is float for a in DEFAULT_ORDERS)
    assert np.all(np.diff(grid) > 0) and grid[-1] == 1024.0
    required = {1.05, 1.1, 1.15, 1.2} | {1.25 + 0.25 * i for i in range(39)} | set(map(float, range(11, 65)))
    assert required <= set(DEFAULT_ORDERS)
    upper = grid[grid >= 64.0]
    assert np.all(upper[1:] <= MAX_ORDER_RATIO * upper[:-1]), "neighbours above 64 must be <= 10 % apart"
    assert np.all(upper == np.round(upper)), "orders above 64 are integers (exact finite sums)"
    assert len(DEFAULT_ORDERS) == 129


def test_grid_keeps_every_previous_order() -> None:
    # Rényi-filter budgets created on the old grid keep a valid filter order.
    assert set(ORDERS_V1) <= set(DEFAULT_ORDERS)
    assert len(ORDERS_V1) == 101 and ORDERS_V1[-5:] == (64.0, 128.0, 256.0, 512.0, 1024.0)


def test_small_epsilon_profile_is_no_longer_overcharged() -> None:
    new = epsilon_from_rdp(profile_rdp(SMALL, DEFAULT_ORDERS), DEFAULT_ORDERS, SMALL_DELTA)
    old = epsilon_from_rdp(profile_rdp(SMALL, ORDERS_V1), ORDERS_V1, SMALL_DELTA)
    assert round(old.epsilon, 3) == 0.136 and old.order == 64.0  # the old grid's charge
    assert new.epsilon <= 0.0905 and round(new.epsilon, 3) == 0.090 and new.order == 92.0


def test_small_epsilon_charge_matches_dp_accounting() -> None:
    rdp = pytest.importorskip("dp_accounting.rdp")
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(SMALL.q, dp_accounting.GaussianDpEvent(SMALL.noise_multiplier)))
    ours = epsilon_from_rdp(profile_rdp(SMALL, DEFAULT_ORDERS), DEFAULT_ORDERS, SMALL_DELTA).epsilon
    assert ours == pytest.approx(acc.get_epsilon(SMALL_DELTA), rel=1e-6)


# ---------------------------------------------------------------- migration


def test_migrate_matches_the_rule_written_out() -> None:
    rng = np.random.default_rng(7)
    old = [2.0, 3.0, 5.5, 8.0]
    curve = sorted(rng.exponential(1.0, 4))
    new = [1.5, 2.0, 2.5, 3.0, 4.0, 5.5, 7.9, 8.0, 9.0]
    got = migrate_curve(curve, from_orders=old, to_orders=new)
    assert got.tolist() == _reference_migrate(curve, old, new)
    shuffled = [3, 0, 2, 1]  # the old grid need not be sorted
    again = migrate_curve([curve[i] for i in shuffled], from_orders=[old[i] for i in shuffled], to_orders=new)
    assert again.tolist() == got.tolist()
    old_v1 = profile_rdp(SMALL, ORDERS_V1).tolist()
    assert migrate_curve(old_v1, from_orders=ORDERS_V1).tolist() == _reference_migrate(old_v1, list(ORDERS_V1), list(DEFAULT_ORDERS))


@pytest.mark.parametrize(
    ("profile", "hardened"),
    [
        (SMALL, None),
        (Profile(k=18, q=0.01, sigma=0.2, lam=1.0), None),
        (Profile(k=23, q=0.01, sigma=0.05, lam=1.0), None),
        (Profile(k=20, q=1.0, sigma=0.05, lam=1.0), None),
        (Profile(k=16, q=0.01, sigma=0.2, lam=1.0), 512),
    ],
)
def test_migrated_curve_bounds_the_directly_computed_one(profile: Profile, hardened: int | None) -> None:
    def curve(orders: tuple[float, ...]) -> np.ndarray:
        return profile_rdp(profile, orders) if hardened is None else hardened_rdp(profile, hardened, orders)

    for queries in (1, 1000):
        old, direct = curve(ORDERS_V1) * queries, curve(DEFAULT_ORDERS) * queries
        migrated = migrate_curve(old, from_orders=ORDERS_V1)
        assert np.all(migrated >= direct)
        on_old = np.isin(DEFAULT_ORDERS, ORDERS_V1)
        np.testing.assert_array_equal(migrated[on_old], old)  # old orders keep their value exactly
        for delta in (1e-5, 1e-7, SMALL_DELTA):
            e_old = epsilon_from_rdp(old, ORDERS_V1, delta).epsilon
            e_mig = epsilon_from_rdp(migrated, DEFAULT_ORDERS, delta).epsilon
            e_new = epsilon_from_rdp(direct, DEFAULT_ORDERS, delta).epsilon
            assert e_mig == e_old  # delta < 1/1024: the migrated orders never win
            assert e_new <= e_mig


def test_migration_commutes_with_sums_bit_for_bit() -> None:
    charges = [profile_rdp(p, ORDERS_V1) for p in (SMALL, Profile(k=8, q=0.02, sigma=0.5, lam=0.7))]
    charges.append(np.where(np.arange(len(ORDERS_V1)) % 3 == 0, np.inf, 0.01))
    total = np.zeros(len(ORDERS_V1))
    migrated_total = np.zeros(len(DEFAULT_ORDERS))
    for c in charges * 5:
        total = total + c
        migrated_total = migrated_total + migrate_curve(c, from_orders=ORDERS_V1)
    np.testing.assert_array_equal(migrate_curve(total, from_orders=ORDERS_V1), migrated_total)


def test_orders_above_the_old_grid_get_no_statement() -> None:
    got = migrate_curve([0.1, 0.2], from_orders=[2.0, 4.0], to_orders=[3.0, 4.0, 5.0])
    assert got.tolist() == [0.2, 0.2, math.inf]


@pytest.mark.parametrize(
    ("curve", "orders", "match"),
    [([0.1], [2.0, 3.0], "1 values but"), ([0.1, float("nan")], [2.0, 3.0], "NaN"), ([0.1, -1.0], [2.0, 3.0], ">= 0"),
     ([0.1, 0.2], [1.0, 3.0], "finite and > 1")],
)  # fmt: skip
def test_migrate_refuses_malformed_curves(curve: list[float], orders: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        migrate_curve(curve, from_orders=orders)


def test_curve_from_json_migrates_a_curve_carrying_another_grid() -> None:
    old = rdp_subsampled_gaussian(q=0.01, noise_multiplier=1.0, orders=ORDERS_V1)
    text = curve_to_json(np.append(old[:-1], np.inf))
    assert curve_from_json(text).size == len(ORDERS_V1)  # no grid given: taken as it is
    got = curve_from_json(text, stored_orders=ORDERS_V1)
    assert got.tolist() == _reference_migrate(curve_from_json(text).tolist(), list(ORDERS_V1), list(DEFAULT_ORDERS))
    same = curve_to_json(rdp_subsampled_gaussian(q=0.01, noise_multiplier=1.0, orders=DEFAULT_ORDERS))
    assert curve_from_json(same, stored_orders=DEFAULT_ORDERS).tolist() == curve_from_json(same).tolist()
    with pytest.raises(ValueError, match="values but"):
        curve_from_json(text, stored_orders=DEFAULT_ORDERS)
