"""The one grid of Rényi orders shared by admission, calibration and receipts (SPEC §4).

Every RDP curve in the project is a vector over exactly this grid, so curves from different
queries, profiles and processes add element-wise, and a ledger written by one version of the
server can be read by another: stored curves carry their grid (the ledger's ``meta`` table, the
accountant's JSON state), and :func:`migrate_curve` moves a curve from an older grid to this one
conservatively.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_ORDERS", "ORDERS_V1", "OPACUS_ORDERS", "MAX_ORDER_RATIO", "validate_orders", "migrate_curve"]

MAX_ORDER_RATIO = 1.1
"""SPEC §4: above 64, no two neighbouring orders of :data:`DEFAULT_ORDERS` more than 10 % apart."""


def _build_v1_orders() -> tuple[float, ...]:
    fine = [round(1.0 + 0.05 * i, 2) for i in range(1, 5)]  # 1.05 .. 1.2
    mid = [round(1.25 + 0.25 * i, 2) for i in range(0, 39)]  # 1.25 .. 10.75
    ints = [float(a) for a in range(11, 65)]  # 11 .. 64
    return tuple(fine + mid + ints)


def _build_large_orders() -> list[float]:
    """Integer orders from 64 to 1024: each is ``floor(11 * previous / 10)`` (exact integer
    arithmetic, so the ratio is at most 1.1) but never past the next power of two, which is taken
    instead; so the grid keeps 128, 256, 512 and 1024 (orders of the previous grid, on which
    existing Rényi-filter budgets may sit) and is the sparsest integer grid with both properties.
    Integers keep the subsampled-Gaussian RDP on its exact finite sum (``rdp.log_a_integer``)."""
    out, a = [], 64
    while a < 1024:
        power = 1 << a.bit_length()  # the smallest power of two > a
        a = min((11 * a) // 10, power)
        out.append(float(a))
    return out


ORDERS_V1: tuple[float, ...] = _build_v1_orders() + (128.0, 256.0, 512.0, 1024.0)
"""The grid before issue 12 (101 orders: a gap from 64 to 128); ledgers written with it migrate."""

DEFAULT_ORDERS: tuple[float, ...] = _build_v1_orders() + tuple(_build_large_orders())
"""SPEC §4 grid (129 orders): {1.05, ..., 1.2} U {1.25, 1.5, ..., 10.75} U {11, ..., 64} U
{70, 77, 84, 92, 101, 111, 122, 128, 140, ..., 245, 256, 281, ..., 493, 512, 563, ..., 994, 1024}
(``_build_large_orders``: integers, neighbours at most 10 % apart); a superset of
:data:`ORDERS_V1`, so every Rényi-filter order chosen on the old grid is still on it."""

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


def migrate_curve(
    curve: npt.ArrayLike, *, from_orders: npt.ArrayLike, to_orders: npt.ArrayLike = DEFAULT_ORDERS
) -> npt.NDArray[np.float64]:
    """Move an RDP curve from one order grid to another, never lowering the guarantee it states.

    A curve R over a grid G states that the mechanism is (a, R(a))-RDP for each a in G. The
    Rényi divergence is non-decreasing in its order (T. van Erven, P. Harremoës, "Rényi
    Divergence and Kullback-Leibler Divergence", IEEE Trans. Inf. Theory 2014, Thm 3; for RDP,
    I. Mironov, "Rényi Differential Privacy", CSF 2017, Prop. 9), and so is its supremum over
    neighbouring datasets; so (b, R(b))-RDP implies (a, R(b))-RDP for every a <= b. The migrated
    value at a new order a is therefore R(b) at the smallest b in G with b >= a (exactly R(a)
    when a is in G), and ``+inf`` (no statement) above max(G). This holds for any stored upper
    bound, composed or not, whether or not the stored numbers are themselves monotone.

    Migration only selects values (no arithmetic), so it commutes with summation bit for bit:
    migrating a sum of curves equals summing the migrated curves (a ledger's running curve stays
    the exact sequential sum of its migrated charges).

    Args:
        curve: RDP values over ``from_orders`` (>= 0, may be ``+inf``).
        from_orders: the grid the curve was computed on (orders > 1, in any order; one value
            per order).
        to_orders: the new grid (default: :data:`DEFAULT_ORDERS`).

    Returns:
        The curve over ``to_orders`` (a new float64 array), pointwise >= the mechanism's RDP.

    Raises:
        ValueError: naming a length mismatch, a bad order, or a negative or NaN value.
    """
    src = validate_orders(from_orders)
    dst = validate_orders(to_orders)
    values = np.asarray(curve, dtype=np.float64).reshape(-1)
    if values.shape != src.shape:
        raise ValueError(f"curve has {values.size} values but the grid it is over has {src.size} orders")
    if not (values >= 0.0).all():  # False for NaN too
        raise ValueError("RDP curve values must be >= 0 and not NaN")
    perm = np.argsort(src, kind="stable")
    sorted_orders, sorted_values = src[perm], values[perm]
    # A duplicated old order: the first of its values after a stable sort is used (each is sound).
    idx = np.searchsorted(sorted_orders, dst, side="left")  # smallest b >= a
    out = np.full(dst.shape, np.inf)
    ok = idx < sorted_orders.size
    out[ok] = sorted_values[idx[ok]]
    return out
