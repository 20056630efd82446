"""Privacy events and a Rényi-DP accountant over the shared order grid.

Design after dp-accounting (``dp_event.py``, ``privacy_accountant.py``): events are frozen value
objects whose meaning never changes; the accountant composes them by adding RDP curves per order
(Mironov 2017, Prop. 1), validates a composition completely before changing any state, and
converts with Balle et al. 2020 Thm 21 (see ``conversion``). Dispatch is a small table from event
type to RDP function, not an ``isinstance`` chain.

State is a versioned plain-JSON dict (never pickle) so a ledger can persist it; ``+inf`` is
encoded as the string ``"inf"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .conversion import DeltaResult, EpsilonResult, delta_from_rdp, epsilon_from_rdp
from .discrete import hardened_rdp
from .mechanism import Profile, profile_rdp
from .orders import DEFAULT_ORDERS, migrate_curve, validate_orders
from .rdp import rdp_subsampled_gaussian

__all__ = [
    "SubsampledGaussianEvent",
    "RetrievalEvent",
    "Event",
    "event_rdp",
    "event_from_dict",
    "RdpAccountant",
    "retrieval_rdp",
    "curve_to_json",
    "curve_from_json",
]

STATE_VERSION = 1


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """One Poisson-subsampled Gaussian release: each record kept with probability ``q``, then a
    sum of sensitivity 1 plus N(0, noise_multiplier^2). ``q = 1`` is the plain Gaussian."""

    q: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.q) <= 1.0):
            raise ValueError(f"q must be in [0, 1]; found {self.q!r}")
        z = float(self.noise_multiplier)
        if not (z >= 0.0) or math.isinf(z):
            raise ValueError(f"noise_multiplier must be finite and >= 0; found {self.noise_multiplier!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"type": "subsampled_gaussian", "q": float(self.q), "noise_multiplier": float(self.noise_multiplier)}


@dataclass(frozen=True)
class RetrievalEvent:
    """One DP-RDM release under ``profile`` (sensitivity 2/k, multiplier sigma*k/2; lambda = 0
    costs nothing). See ``mechanism`` for the derivation.

    With ``hardened_dimension = d`` the release is the floating-point-safe discrete-Gaussian one
    of ``discrete`` at dimension d (sensitivity widened by the lattice rounding); its curve is
    ``discrete.hardened_rdp``."""

    profile: Profile
    hardened_dimension: int | None = None

    def __post_init__(self) -> None:
        d = self.hardened_dimension
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"hardened_dimension must be an integer >= 1; found {d!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out: dict[str, Any] = {"type": "retrieval", "profile": self.profile.to_dict()}
        if self.hardened_dimension is not None:
            out["hardened_dimension"] = self.hardened_dimension
        return out


def retrieval_rdp(
    profile: Profile, *, orders: npt.ArrayLike, hardened_dimension: int | None = None
) -> npt.NDArray[np.float64]:
    """RDP curve of one retrieval release, float (``None``) or hardened at dimension d."""
    if hardened_dimension is None:
        return profile_rdp(profile, orders)
    return hardened_rdp(profile, hardened_dimension, orders)


Event = SubsampledGaussianEvent | RetrievalEvent

_RDP_TABLE: Mapping[type, Callable[[Any, npt.NDArray[np.float64]], npt.NDArray[np.float64]]] = {
    SubsampledGaussianEvent: lambda e, a: rdp_subsampled_gaussian(q=e.q, noise_multiplier=e.noise_multiplier, orders=a),
    RetrievalEvent: lambda e, a: retrieval_rdp(e.profile, orders=a, hardened_dimension=e.hardened_dimension),
}

_FROM_DICT: Mapping[str, Callable[[Mapping[str, Any]], Event]] = {
    "subsampled_gaussian": lambda d: SubsampledGaussianEvent(q=d["q"], noise_multiplier=d["noise_multiplier"]),
    "retrieval": lambda d: RetrievalEvent(profile=Profile.from_dict(d["profile"]), hardened_dimension=d.get("hardened_dimension")),
}


def event_rdp(event: Event, orders: npt.ArrayLike = DEFAULT_ORDERS) -> npt.NDArray[np.float64]:
    """RDP curve of one occurrence of ``event``.

    Raises:
        TypeError: if the event type is not supported.
    """
    fn = _RDP_TABLE.get(type(event))
    if fn is None:
        raise TypeError(f"unsupported privacy event {event!r}")
    return fn(event, validate_orders(orders))


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Inverse of ``event.to_dict()``; raises ``ValueError`` naming an unknown type."""
    kind = data.get("type")
    fn = _FROM_DICT.get(str(kind))
    if fn is None:
        raise ValueError(f"unknown privacy event type {kind!r}")
    return fn(data)


def curve_to_json(curve: npt.ArrayLike) -> list[float | str]:
    """Encode an RDP curve for JSON: floats, with ``+inf`` as the string ``"inf"``."""
    return ["inf" if math.isinf(v) else float(v) for v in np.asarray(curve, dtype=np.float64)]


def curve_from_json(
    values: list[Any], *, stored_orders: npt.ArrayLike | None = None, orders: npt.ArrayLike = DEFAULT_ORDERS
) -> npt.NDArray[np.float64]:
    """Decode :func:`curve_to_json`; raises ``ValueError`` on anything else.

    Args:
        values: the JSON list (floats >= 0, ``"inf"`` for ``+inf``).
        stored_orders: the grid the stored curve is over, when it carries one. If it differs
            from ``orders`` the curve is migrated conservatively (:func:`orders.migrate_curve`:
            each new order takes the value at the smallest stored order above or at it, ``+inf``
            above the largest). None: the values are taken as they are.
        orders: the grid the caller works on (default: the shared grid).

    Raises:
        ValueError: a malformed value, or a length that does not match ``stored_orders``.
    """
    out = []
    for v in values:
        if v == "inf":
            out.append(math.inf)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            out.append(float(v))
        else:
            raise ValueError(f"bad RDP curve value {v!r}")
    curve = np.array(out, dtype=np.float64)
    if stored_orders is None:
        return curve
    src, dst = validate_orders(stored_orders), validate_orders(orders)
    if src.shape == dst.shape and np.array_equal(src, dst):
        if curve.shape != src.shape:
            raise ValueError(f"curve has {curve.size} values but the grid it is over has {src.size} orders")
        return curve
    return migrate_curve(curve, from_orders=src, to_orders=dst)


class RdpAccountant:
    """Composes privacy events and converts to (epsilon, delta).

    Args:
        orders: the Rényi order grid (default: the project's shared grid, SPEC §4).
    """

    def __init__(self, orders: npt.ArrayLike = DEFAULT_ORDERS) -> None:
        self._orders = validate_orders(orders)
        self._rdp = np.zeros_like(self._orders)
        self._counts: dict[Event, int] = {}

    @property
    def orders(self) -> npt.NDArray[np.float64]:
        """The order grid (copy)."""
        return self._orders.copy()

    @property
    def rdp(self) -> npt.NDArray[np.float64]:
        """The composed RDP curve (copy)."""
        return self._rdp.copy()

    @property
    def events(self) -> dict[Event, int]:
        """How many times each distinct event was composed (copy)."""
        return dict(self._counts)

    def supports(self, event: object) -> bool:
        """Whether ``event`` has an RDP rule here."""
        return type(event) in _RDP_TABLE

    def compose(self, event: Event, count: int = 1) -> RdpAccountant:
        """Add ``count`` occurrences of ``event``; validated fully before any state changes.

        Raises:
            TypeError: unsupported event.
            ValueError: ``count`` not an integer >= 0.
        """
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count must be an integer >= 0; found {count!r}")
        curve = event_rdp(event, self._orders)  # dry run: raises before any change
        with np.errstate(invalid="ignore"):
            added = np.where(curve == 0.0, 0.0, curve * int(count))
        self._rdp = self._rdp + added
        self._counts[event] = self._counts.get(event, 0) + int(count)
        return self

    def get_epsilon_and_order(self, delta: float) -> EpsilonResult:
        """Best epsilon over the grid at ``delta``, with the order that achieved it."""
        return epsilon_from_rdp(self._rdp, self._orders, delta)

    def get_epsilon(self, delta: float) -> float:
        """Best epsilon over the grid at ``delta``."""
        return self.get_epsilon_and_order(delta).epsilon

    def get_delta_and_order(self, epsilon: float) -> DeltaResult:
        """Best delta over the grid at ``epsilon``, with the order that achieved it."""
        return delta_from_rdp(self._rdp, self._orders, epsilon)

    def get_delta(self, epsilon: float) -> float:
        """Best delta over the grid at ``epsilon``."""
        return self.get_delta_and_order(epsilon).delta

    def to_dict(self) -> dict[str, Any]:
        """Versioned plain-JSON state."""
        return {
            "version": STATE_VERSION,
            "orders": [float(a) for a in self._orders],
            "rdp": curve_to_json(self._rdp),
            "events": [{"event": e.to_dict(), "count": c} for e, c in self._counts.items()],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RdpAccountant:
        """Restore from :meth:`to_dict`, re-deriving the curve from the events and checking it.

        Raises:
            ValueError: unknown version, malformed fields, or a stored curve that does not match
            its events (a tampered or corrupt state).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported accountant state version {state.get('version')!r}")
        acc = cls(orders=state["orders"])
        for item in state["events"]:
            acc.compose(event_from_dict(item["event"]), item["count"])
        stored = curve_from_json(state["rdp"])
        if stored.shape != acc._rdp.shape or not np.allclose(stored, acc._rdp, rtol=1e-9, atol=0.0, equal_nan=False):
            raise ValueError("accountant state's rdp curve does not match its events")
        return acc
