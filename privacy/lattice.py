"""The lattice 2^k Z^d of the floating-point-safe release (SPEC §6): its step, rounding to it, and
the L2 sensitivity after rounding both neighbours to it. See :mod:`dprdm.privacy.discrete`."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_LATTICE_EXPONENT", "round_to_lattice", "widened_sensitivity"]

DEFAULT_LATTICE_EXPONENT = -20
"""Lattice step 2^-20 ~ 9.5e-7: far below the noise (sigma >= 1e-3) and the widening 2^k sqrt(d)
is ~2e-5 at d = 512, i.e. ~1e-4 of the sensitivity 2/k for k = 16."""


def round_to_lattice(v: npt.ArrayLike, exponent: int = DEFAULT_LATTICE_EXPONENT) -> npt.NDArray[np.float64]:
    """Round each coordinate to the nearest multiple of 2^exponent (exact in float64 for |v| < 2^30)."""
    scale = math.ldexp(1.0, -exponent)
    out: npt.NDArray[np.float64] = np.round(np.asarray(v, dtype=np.float64) * scale) / scale
    return out


def widened_sensitivity(sensitivity: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> float:
    """L2 sensitivity after rounding both neighbours to the lattice: Delta + 2^k sqrt(d)."""
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1; found {dimension!r}")
    return sensitivity + math.ldexp(1.0, exponent) * math.sqrt(dimension)
