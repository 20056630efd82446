"""The ledger's write operations as frozen values, validated once for every store.

Each public write of a :class:`~dprdm.ledger.api.Ledger` is one small frozen dataclass built by
its ``build`` classmethod, which checks the caller's arguments and names a bad value. Both stores
build the same operations, so they refuse the same inputs with the same messages; the SQLite
writer queues them (:class:`Pending` carries the mutable completion state) and dispatches on the
operation's type through a table (``dprdm.ledger.writer``).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.privacy import Budget

from .api import BudgetState, Receipt
from .state import (
    check_curve,
    check_text,
    compose_receipt,
    new_spend_id,
    release_conflict,
    release_missing,
    replay_mismatch,
    short_repr,
)

__all__ = ["CreateBudget", "Reserve", "StoreRelease", "CheckWritable", "WriteOp", "Pending"]


@dataclass(frozen=True)
class CreateBudget:
    """Create a domain's budget with optional per-tenant epsilon quotas.

    Attributes:
        domain: privacy domain (corpus id).
        budget: its (epsilon, delta) budget and admission rule.
        quotas: tenant -> epsilon quota (finite, > 0).
    """

    domain: str
    budget: Budget
    quotas: dict[str, float]

    @classmethod
    def build(cls, domain: str, budget: Budget, tenant_quotas: dict[str, float] | None) -> CreateBudget:
        """The operation, from a caller's arguments.

        Raises:
            ValueError: naming a bad domain, budget, tenant or quota.
        """
        check_text("domain", domain)
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be a dprdm.privacy.Budget; found {type(budget).__name__}")
        budget.to_dict()  # a PLD budget's plan (T_max, table) is computed here, not in the transaction
        quotas: dict[str, float] = {}
        for tenant, quota in (tenant_quotas or {}).items():
            check_text("tenant", tenant)
            q = float(quota)
            if not (q > 0.0) or math.isinf(q):
                raise ValueError(f"quota of tenant {tenant!r} must be finite and > 0; found {quota!r}")
            quotas[tenant] = q
        return cls(domain, budget, quotas)


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class Reserve:
    """Admit and append one charge, and compose its receipt.

    Attributes:
        domain, tenant, request_id, binding_hash: as :meth:`Ledger.reserve` takes them.
        profile_json: the profile as canonical JSON text (sorted keys).
        profile_name: the profile's ``"name"`` ("" if none), the receipt's label.
        index: the index name the receipt is labelled with ("" if none).
        charge: read-only float64 charge curve over ``DEFAULT_ORDERS``.
        charge_key: ``charge.tobytes()`` (the charge-curve cache key).
    """

    domain: str
    tenant: str
    request_id: str
    binding_hash: str
    profile_json: str
    profile_name: str
    index: str
    charge: npt.NDArray[np.float64]
    charge_key: bytes

    @classmethod
    def build(
        cls,
        *,
        domain: str,
        tenant: str,
        request_id: str,
        binding_hash: str,
        profile: dict[str, Any],
        charge_rdp: npt.ArrayLike,
        index: str = "",
    ) -> Reserve:
        """The operation, from :meth:`Ledger.reserve`'s arguments.

        Raises:
            ValueError: naming a malformed argument (text, profile, index or charge curve).
        """
        for name, value in (("domain", domain), ("tenant", tenant), ("request_id", request_id)):
            check_text(name, value)
        check_text("binding_hash", binding_hash)
        if not isinstance(index, str):
            raise ValueError(f"index must be a string; found {short_repr(index)}")
        if not isinstance(profile, dict):
            raise ValueError(f"profile must be a JSON object; found {short_repr(profile)}")
        try:
            profile_json = json.dumps(profile, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"profile must be plain JSON; found {short_repr(profile)}") from exc
        name = profile.get("name", "")
        charge = check_curve(charge_rdp)
        return cls(domain, tenant, request_id, binding_hash, profile_json, str(name), index, charge, charge.tobytes())

    def check_replay(self, *, binding_hash: str, domain: str, has_release: bool) -> None:
        """Check a replay of this (tenant, request id) against the spend already stored for it.

        Raises:
            ReplayMismatch: the stored spend was for another binding or domain.
            ReleaseMissing: the stored spend has no release (a crash between reserve and store).
        """
        if binding_hash != self.binding_hash or domain != self.domain:
            raise replay_mismatch(self.tenant, self.request_id)
        if not has_release:
            raise release_missing(self.tenant, self.request_id)

    def new_spend(self, epsilon_charged: float, state: BudgetState) -> tuple[str, Receipt]:
        """A fresh spend id and the receipt of this charge (``state``: the domain right after it)."""
        spend_id = new_spend_id()
        receipt = compose_receipt(
            spend_id=spend_id,
            request_id=self.request_id,
            index=self.index,
            profile=self.profile_name,
            epsilon_charged=epsilon_charged,
            state=state,
        )
        return spend_id, receipt


@dataclass(frozen=True)
class StoreRelease:
    """Attach a release to a reserved spend.

    Attributes:
        spend_id: the reservation's spend id.
        blob: the release as little-endian float64 bytes.
        shape: its shape as JSON text.
    """

    spend_id: str
    blob: bytes
    shape: str

    @classmethod
    def build(cls, spend_id: str, release: npt.ArrayLike) -> StoreRelease:
        """The operation, from :meth:`Ledger.store_release`'s arguments.

        Raises:
            ValueError: a bad spend id or a release that is not an array of floats.
        """
        check_text("spend_id", spend_id)
        try:
            arr = np.ascontiguousarray(release, dtype="<f8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"release must be an array of floats; found {type(release).__name__}") from exc
        return cls(spend_id, arr.tobytes(), json.dumps(list(arr.shape)))

    def needs_write(self, stored_blob: bytes | None, stored_shape: str | None) -> bool:
        """Whether this release must be written over what the spend holds: True when it holds none,
        False when it holds this same release (store is idempotent).

        Raises:
            ReleaseConflict: the spend already holds a different release.
        """
        if stored_blob is None:
            return True
        if stored_blob != self.blob or stored_shape != self.shape:
            raise release_conflict(self.spend_id)
        return False


@dataclass(frozen=True)
class CheckWritable:
    """The health probe: can the store commit again after it could not? Rewrites the ``meta``
    row ``write_check`` with 64 KiB of fresh bytes (more than one charge writes) and commits;
    no budget or spend changes."""


WriteOp = CreateBudget | Reserve | StoreRelease | CheckWritable
"""Every write operation of a ledger."""


@dataclass(eq=False)
class Pending:
    """A queued operation and its completion state; the caller waits on ``done``."""

    op: WriteOp
    result: Any = None
    error: BaseException | None = None
    done: threading.Lock = field(default_factory=threading.Lock)
