"""A disk cache of the discrete-noise RDP curves, so a restart does not re-run their linear programs.

:func:`dprdm.privacy.discrete_rdp.hardened_rdp` bounds the fractional orders of the grid with a
certified linear program each (~1.3 s per distinct mechanism on one core, issue 13 item 11). The
curve depends only on the mechanism (profile, dimension, group size), the order grid and the code
that computes it, so :func:`cached_charge` keeps it in ``<data_dir>/curve-cache/<key>.json``:

* the key is a SHA-256 of the mechanism, the orders, the numpy/scipy versions and the source bytes
  of every module of :mod:`dprdm.privacy` (any change to the maths invalidates every entry);
* values are stored as ``float.hex`` (bit-exact: a cached curve equals a fresh one);
* an entry is used only if it passes cheap checks against freshly computed values: equal at every
  integer order (those need no linear program, ~10 ms) and never below the float-noise curve of the
  same mechanism at any order (the discrete curve is an upper bound of it; ~30 ms). A file that
  fails is logged, recomputed and overwritten.

Trust: the cache sits in the data directory beside the ledger, whose integrity the charges already
depend on; the checks above keep an edited file from lowering a charge below the continuous curve
or changing any integer order. Float-noise curves are cheap and never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dprdm.privacy import Profile, mechanism_rdp

__all__ = ["CACHE_DIR", "cached_charge", "cache_key"]

CACHE_DIR = "curve-cache"
_LOG = logging.getLogger("dprdm.server")
_CODE: str | None = None


def _code_digest() -> str:
    """SHA-256 of the privacy package's sources and the numeric libraries' versions (once per process)."""
    global _CODE
    if _CODE is None:
        import scipy

        import dprdm.privacy as privacy

        h = hashlib.sha256(f"numpy {np.__version__} scipy {scipy.__version__}".encode())
        for path in sorted(Path(privacy.__file__).parent.glob("*.py")):
            h.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
        _CODE = h.hexdigest()
    return _CODE


def cache_key(profile: Profile, orders: npt.ArrayLike, hardened_dimension: int, group_size: int) -> str:
    """The cache file's key: mechanism, order grid (exact) and code digest."""
    doc = {
        "profile": profile.to_dict(),
        "orders": [float(a).hex() for a in np.asarray(orders, dtype=np.float64)],
        "hardened_dimension": int(hardened_dimension),
        "group_size": int(group_size),
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _plausible(
    curve: npt.NDArray[np.float64], profile: Profile, orders: npt.NDArray[np.float64], dim: int, group: int
) -> bool:
    """Whether a cached curve agrees with fresh values at the integer orders and bounds the float curve."""
    if curve.shape != orders.shape or np.any(np.isnan(curve)):
        return False
    ints = orders == np.floor(orders)
    if np.any(ints):
        fresh = mechanism_rdp(profile, orders=orders[ints], hardened_dimension=dim, group_size=group)
        if not np.array_equal(curve[ints], fresh):
            return False
    floor = mechanism_rdp(profile, orders=orders, hardened_dimension=None, group_size=group)
    return bool(np.all(curve >= floor))


def cached_charge(
    profile: Profile, *, orders: npt.ArrayLike, hardened_dimension: int, group_size: int, cache_dir: Path
) -> npt.NDArray[np.float64]:
    """:func:`dprdm.privacy.mechanism_rdp` of a discrete-noise mechanism, through the disk cache.

    Args:
        profile, orders, hardened_dimension, group_size: as ``mechanism_rdp``.
        cache_dir: the cache directory (created if missing; unwritable: computed without caching).

    Returns:
        The curve, bit-identical to ``mechanism_rdp(...)``.
    """
    grid = np.asarray(orders, dtype=np.float64)
    key = cache_key(profile, grid, hardened_dimension, group_size)
    path = cache_dir / f"{key}.json"
    try:
        doc = json.loads(path.read_text())
        curve = np.array([float.fromhex(v) for v in doc["curve"]], dtype=np.float64)
        if doc.get("key") == key and _plausible(curve, profile, grid, hardened_dimension, group_size):
            return curve
        _LOG.warning("curve cache: %s failed its checks; recomputing", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _LOG.warning("curve cache: unreadable %s (%s); recomputing", path, exc)
    curve = mechanism_rdp(profile, orders=grid, hardened_dimension=hardened_dimension, group_size=group_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "profile": profile.to_dict(), "hardened_dimension": hardened_dimension,
                                   "group_size": group_size, "curve": [float(v).hex() for v in curve]}) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        _LOG.warning("curve cache: cannot write %s (%s)", path, exc)
    return curve
