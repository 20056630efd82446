"""The one grid of Rényi orders shared by admission, calibration and receipts (SPEC §4).

Every RDP curve in the project is a vector over exactly this grid, so curves from different
queries, profiles and processes add element-wise, and a ledger written by one version of the
server can be read by another (the grid is recorded with the curve; see ``accountant``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_ORDERS", "OPACUS_ORDERS", "validate_orders"]


def _build_default_orders() -> tuple[float, ...]:
    fine = [round(1.0 + 0.05 * i, 2) for i in range(1, 5)]  # 1.05 .. 1.2
    mid = [round(1.25 + 0.25 * i, 2) for i in range(0, 39)]  # 1.25 .. 10.75
    ints = [float(a) for a in range(11, 65)]  # 11 .. 64
    large = [128.0, 256.0, 512.0, 1024.0]
    return tuple(fine + mid + ints + large)


DEFAULT_ORDERS: tuple[float, ...] = _build_default_orders()
"""SPEC §4 grid: {1.05, ..., 1.2} U {1.25, 1.5, ..., 10.75} U {11, ..., 64} U {128, ..., 1024}."""

_DEFAULT_ARRAY = np.array(DEFAULT_ORDERS, dtype=np.float64)

OPACUS_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)
"""Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` grid, used only to reproduce its golden values."""


def validate_orders(orders: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return ``orders`` as a float array after checking that every order is finite and > 1.

    Raises:
        ValueError: naming the first bad order.
    """
    if orders is DEFAULT_ORDERS:
        return _DEFAULT_ARRAY.copy()
    arr = np.asarray(orders, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("orders must not be empty")
    bad = ~(np.isfinite(arr) & (arr > 1.0))
    if bad.any():
        raise ValueError(f"Rényi orders must be finite and > 1; found {float(arr[bad][0])!r}")
    return arr
