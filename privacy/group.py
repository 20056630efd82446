"""RDP of a retrieval release when one record can change TWO stored records (group size 2).

Where it applies: an IVF index whose lists have public capacities keeps, in each list, the
records with the smallest record ids (``dprdm.index.ivf``). Adding or removing one record of the
corpus then changes the stored set by at most one addition and one removal (the record itself,
and the record it pushes out of, or lets into, its list), so neighbouring corpora give stored sets
D, D'' at add/remove distance 2 through an intermediate D'.

Bound (I. Mironov, "Rényi Differential Privacy", CSF 2017, Prop. 11, the weak triangle inequality
with p = q = 2): for any distributions P, Q, R and order a > 1,

    D_a(P || R) <= (a - 1/2) / (a - 1) * D_{2a}(P || Q) + D_{2a - 1}(Q || R).

With P, Q, R the release on D, D', D'' and R(.) the one-record curve of the mechanism (both
directions are bounded by R, as for every curve the ledger charges), one query on a group-2 pair
costs at most ``g(a) = (a - 1/2)/(a - 1) R(2a) + R(2a - 1)``. Rényi divergence is non-decreasing
in the order (Mironov 2017, Prop. 9), so ``g(a')`` for any ``a' >= a`` also bounds order a: the
curve returned is ``G(a) = min_{a' in grid, a' >= a} g(a')``. Composition over queries adds G as
any RDP curve (Mironov 2017, Prop. 1), since every query satisfies (a, G(a))-RDP for the same pair.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .accountant import retrieval_rdp
from .mechanism import Profile
from .orders import validate_orders

__all__ = ["group2_rdp"]


def group2_rdp(
    profile: Profile, *, orders: npt.ArrayLike, hardened_dimension: int | None = None
) -> npt.NDArray[np.float64]:
    """RDP curve of one release on an index where one record changes at most two stored records.

    Args:
        profile: the retrieval profile.
        orders: Rényi orders (> 1), in any order.
        hardened_dimension: as in :func:`dprdm.privacy.accountant.retrieval_rdp` (None: float noise).

    Returns:
        ``G(a)`` per order (see the module docstring): >= the one-record curve, ``+inf`` when that
        curve is infinite, 0 when the profile never retrieves. Never NaN.
    """
    a = validate_orders(orders)
    if not profile.retrieves:
        return np.zeros_like(a)
    r_2a = retrieval_rdp(profile, orders=2.0 * a, hardened_dimension=hardened_dimension)
    r_2a_1 = retrieval_rdp(profile, orders=2.0 * a - 1.0, hardened_dimension=hardened_dimension)
    with np.errstate(invalid="ignore", over="ignore"):
        g = (a - 0.5) / (a - 1.0) * r_2a + r_2a_1
    g = np.where(np.isnan(g), np.inf, g)
    # G(a) = min over grid orders a' >= a of g(a'): a suffix minimum in increasing order.
    order = np.argsort(a, kind="stable")
    suffix = np.minimum.accumulate(g[order][::-1])[::-1]
    out = np.empty_like(g)
    out[order] = suffix
    return out
