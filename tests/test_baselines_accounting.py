"""Accounting of the baselines: calibration on the project's accountant, privacy reports."""

from __future__ import annotations

import math

import pytest

from dprdm.baselines.accounting import (
    PrivacyReport,
    _epsilon,
    calibrate_noise_multiplier,
    check_target,
    dpsgd_accountant,
)
from dprdm.privacy import RdpAccountant, SubsampledGaussianEvent


@pytest.mark.parametrize(("q", "steps", "eps", "delta"), [(0.01, 1000, 1.0, 1e-5), (0.5, 2, 5.0, 1e-3), (1.0, 1, 2.0, 1e-4)])
def test_calibration_returns_the_feasible_end(q: float, steps: int, eps: float, delta: float) -> None:
    z = calibrate_noise_multiplier(q=q, steps=steps, epsilon=eps, delta=delta)
    assert _epsilon(q, z, steps, delta) <= eps
    assert _epsilon(q, z * (1 - 2e-3), steps, delta) > eps  # tight to the tolerance


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_agrees_with_opacus_within_grid_differences() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    ours = calibrate_noise_multiplier(q=0.01, steps=1000, epsilon=1.0, delta=1e-5)
    theirs = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=1000,
                                  accountant="rdp", epsilon_tolerance=0.001)
    assert ours == pytest.approx(theirs, rel=0.03)


@pytest.mark.parametrize("bad", [{"q": 0.0}, {"q": 1.5}, {"steps": 0}, {"epsilon": 0.0}, {"epsilon": math.inf},
                                 {"delta": 1.0}])
def test_calibration_refuses_bad_arguments(bad: dict[str, float]) -> None:
    args = {"q": 0.1, "steps": 10, "epsilon": 1.0, "delta": 1e-5} | bad
    with pytest.raises(ValueError, match=next(iter(bad)).replace("q", "sample rate q")):
        calibrate_noise_multiplier(**args)


def test_check_target_refuses_large_delta() -> None:
    check_target(epsilon=1.0, delta=1e-3, public_size=100)
    with pytest.raises(ValueError, match="delta"):
        check_target(epsilon=1.0, delta=0.01, public_size=100)
    with pytest.raises(ValueError, match="epsilon"):
        check_target(epsilon=-1.0, delta=1e-3, public_size=100)


def test_report_uses_the_shared_accountant_and_round_trips() -> None:
    report = PrivacyReport.build(method="dp-ldm", epsilon_target=5.0, delta=1e-5, q=0.02, noise_multiplier=1.1,
                                 steps=300, clip_norm=1.0, public_size=1000, noise_source="test", production=False)
    expected = RdpAccountant().compose(SubsampledGaussianEvent(q=0.02, noise_multiplier=1.1), 300).get_epsilon(1e-5)
    assert report.epsilon == expected
    assert dpsgd_accountant(q=0.02, noise_multiplier=1.1, steps=300).get_epsilon(1e-5) == expected
    again = PrivacyReport.from_dict(report.to_dict())
    assert again == report
    tampered = report.to_dict() | {"epsilon": report.epsilon / 2}
    with pytest.raises(ValueError, match="does not match"):
        PrivacyReport.from_dict(tampered)
