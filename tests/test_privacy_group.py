"""Group size 2 (capacity-limited IVF lists): the charge bound of ``dprdm.privacy.group``."""

from __future__ import annotations

import numpy as np
import pytest

from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, epsilon_from_rdp, mechanism_rdp, retrieval_rdp
from dprdm.privacy.group import group2_rdp

ORDERS = np.asarray(DEFAULT_ORDERS)


@pytest.mark.parametrize("sigma,k", [(0.5, 4), (2.0, 10), (0.2, 18)])
def test_gaussian_group_bound_is_above_the_exact_group_divergence(sigma: float, k: int) -> None:
    """q = 1: the exact Rényi divergence of two Gaussians 2 sensitivities apart is
    a (2 Delta)^2 / (2 s^2) = 4 R(a); the weak-triangle bound must never be below it."""
    p = Profile(k=k, q=1.0, sigma=sigma, lam=1.0)
    exact = 4.0 * retrieval_rdp(p, orders=ORDERS)
    bound = group2_rdp(p, orders=ORDERS)
    assert np.all(bound >= exact * (1 - 1e-12))
    z2 = p.noise_multiplier ** 2  # (2a - 1)^2 / ((a - 1) 2 z^2) at a' = a, the closed form
    np.testing.assert_allclose(bound, np.minimum.accumulate((((2 * ORDERS - 1) ** 2 / ((ORDERS - 1) * 2 * z2)))[::-1])[::-1])


@pytest.mark.parametrize("q", [0.001, 0.01, 0.2])
def test_group_curve_dominates_one_record_and_is_monotone_never_nan(q: float) -> None:
    p = Profile(k=16, q=q, sigma=0.3, lam=1.0)
    one = retrieval_rdp(p, orders=ORDERS)
    two = group2_rdp(p, orders=ORDERS)
    assert not np.isnan(two).any() and np.all(two >= one) and np.all(np.diff(two) >= 0)
    assert np.all(group2_rdp(Profile(k=16, q=q, sigma=0.0, lam=1.0), orders=ORDERS) == np.inf)
    assert np.all(group2_rdp(Profile(k=16, q=q, sigma=0.3, lam=0.0), orders=ORDERS) == 0.0)


def test_group_charge_is_its_own_mechanism() -> None:
    p = Profile(k=18, q=0.01, sigma=0.2, lam=1.0)
    one = epsilon_from_rdp(1000 * mechanism_rdp(p, orders=ORDERS), ORDERS, 1e-7).epsilon
    two = epsilon_from_rdp(1000 * mechanism_rdp(p, orders=ORDERS, group_size=2), ORDERS, 1e-7).epsilon
    assert one == pytest.approx(1.0, abs=0.01) and two > 1.5 * one
    budget = Budget.single(3.0, 1e-7, p, group_size=2)
    assert budget.serves(p, None, 2) and not budget.serves(p, None, 1)
    assert Budget.from_dict(budget.to_dict()) == budget and Budget.single(3.0, 1e-7, p).to_dict().get("group_size") is None
    with pytest.raises(ValueError, match="group size 2"):
        Budget.single(3.0, 1e-7, p).charge(p, None, 2)
    with pytest.raises(ValueError, match="group_size must be 1 or 2"):
        mechanism_rdp(p, orders=ORDERS, group_size=3)
