"""One private query, synchronously: reserve, then compute (SPEC §6).

:func:`answer_query` runs on a worker thread. Its order is the privacy contract:

1. encode the prompt (public: the query embedding depends on the request alone);
2. release reuse (optional): a stored release of the same tenant for the same public input is
   answered with "charged 0";
3. hardened profiles take their pre-generated noise vector (public, data-independent) from the
   pool; a drained pool raises :class:`~dprdm.server.errors.NoiseExhausted` here, nothing charged
   (a vector whose query is refused before the charge, or replayed, goes back unused);
   then ``guard.before_charge()``: the last point where the deadline or a cancellation stops the
   query with nothing charged;
4. ``ledger.reserve``: one durable transaction (idempotency, admission, append) committed before
   it returns; a replay returns the stored release, never a fresh draw;
5. only now private data is touched: a fresh CSPRNG, the subsampled search, the release;
6. ``ledger.store_release``; from step 4 on the work always runs to completion, whatever
   happens to the caller (the charge is never refunded, and the release stays replayable).

A failure after the charge is never a bare INTERNAL: it raises
:class:`~dprdm.server.errors.AnswerPending` when the release exists but the ledger cannot store
it (the release is held in :class:`HeldReleases`; a replay with the request id stores and returns
it once the ledger commits again), or :class:`~dprdm.server.errors.AnswerLost` when no release
exists (a replay is answered ``ReleaseMissing``, never with a fresh draw; its subclass
``ChargedShardUnavailable``, UNAVAILABLE, when a shard server of a sharded index failed). Both
carry the request id. A release leaves the server only once it is stored (SPEC §6: store, then return), so every
answer a client saw can be replayed.

The receipt is the ledger's: ``reserve`` composes and stores it with the spend, replays and
release reuse return the stored one; this module only marks a reused one (charged 0).

Nothing here logs or returns a private-derived value other than the release itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from dprdm.ledger.api import (
    BudgetState,
    Ledger,
    LedgerUnavailable,
    ReleaseMissing,
    ReplayMismatch,
    Reservation,
)
from dprdm.privacy import Budget, check_dp_generator, release
from dprdm.privacy.discrete import NoisePool, release_hardened

from .api_types import Answer, Caller, QueryArgs, Receipt
from .catalog import Catalog, ServedIndex, ServedProfile
from .errors import (
    AnswerLost,
    AnswerPending,
    Cancelled,
    ChargedShardUnavailable,
    DeadlineTooShort,
    NoiseExhausted,
    NotFound,
    PermissionDenied,
    ShardUnavailable,
)

__all__ = [
    "ChargeGuard",
    "QueryPlan",
    "plan_query",
    "binding_hash",
    "answer_query",
    "HeldReleases",
    "PoolNoise",
    "pool_noise",
]

log = logging.getLogger("dprdm.server")


@dataclass
class ChargeGuard:
    """Deadline and cancellation, checked right before the charge (never after).

    Attributes:
        deadline: absolute ``time.monotonic()`` deadline, or None.
        margin: seconds that must remain at the charge for the answer to be worth computing.
    """

    deadline: float | None = None
    margin: float = 0.0
    _cancelled: threading.Event = field(default_factory=threading.Event)
    charged: bool = False

    def cancel(self) -> None:
        """The caller went away (effective only before the charge)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def before_charge(self) -> None:
        """Raise :class:`Cancelled` or :class:`DeadlineTooShort` if the query should not be charged."""
        if self._cancelled.is_set():
            raise Cancelled()
        if self.deadline is not None and time.monotonic() + self.margin >= self.deadline:
            raise DeadlineTooShort()


@dataclass(frozen=True)
class QueryPlan:
    """A query resolved against the catalog: everything needed to charge and answer it.

    ``budget`` is None when the index's domain has no budget on this server (a non-private index
    without a ``[budgets]`` section, or a domain whose profiles never retrieve): nothing is charged.
    """

    tenant: str
    args: QueryArgs
    served: ServedIndex
    profile: ServedProfile
    binding: str
    budget: Budget | None

    @property
    def charged(self) -> bool:
        """Whether answering touches private data charged to a ledger."""
        return self.profile.profile.retrieves and self.budget is not None


def binding_hash(served: ServedIndex, profile: ServedProfile, prompt: str) -> str:
    """SHA-256 of (domain, index name and version, profile name and parameters, prompt)."""
    doc = {
        "domain": served.domain,
        "index": served.name,
        "version": served.index.version,
        "profile": profile.name,
        "params": profile.profile.to_dict(),
        "nprobe": profile.nprobe,
        "prompt": prompt,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def plan_query(catalog: Catalog, caller: Caller, args: QueryArgs) -> QueryPlan:
    """Resolve index and profile names for ``caller``.

    Raises:
        NotFound: naming ``index`` or ``profile``.
        PermissionDenied: the caller's token is limited to other indexes or domains.
    """
    served = catalog.indexes.get(args.index)
    if served is None:
        raise NotFound("index", args.index)
    if not caller.may_use(served.name, served.domain):
        raise PermissionDenied(f"this token may not use index {served.name!r}")
    prof = served.profiles.get(args.profile)
    if prof is None:
        raise NotFound("profile", args.profile)
    return QueryPlan(
        caller.tenant,
        args,
        served,
        prof,
        binding_hash(served, prof, args.prompt),
        catalog.budgets.get(served.domain),
    )


@dataclass(frozen=True)
class _Held:
    binding: str
    spend_id: str
    release: npt.NDArray[np.float64]
    receipt: Receipt


class HeldReleases:
    """Charged releases the ledger could not store, kept in memory until a replay of their
    (tenant, request id) stores and returns them (see :func:`answer_query`).

    A held release is only ever given to the same tenant, request id and binding it was charged
    for (the ledger checks the binding before it answers ``ReleaseMissing``). At most ``limit``
    are held, the oldest dropped first; a dropped one, like any after a restart, is answered
    ``ReleaseMissing`` on replay (as after a crash between the charge and the store).
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[str, str], _Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def put(self, tenant: str, request_id: str, held: _Held) -> None:
        """Hold a release (dropping the oldest beyond the limit)."""
        with self._lock:
            self._held[(tenant, request_id)] = held
            while len(self._held) > self._limit:
                self._held.popitem(last=False)

    def get(self, tenant: str, request_id: str) -> _Held | None:
        """The held release of (tenant, request id), or None."""
        with self._lock:
            return self._held.get((tenant, request_id))

    def discard(self, tenant: str, request_id: str) -> None:
        """Forget a release once it is stored."""
        with self._lock:
            self._held.pop((tenant, request_id), None)


def _encode(plan: QueryPlan) -> npt.NDArray[np.float32]:
    u = np.asarray(plan.served.bundle.encoder.encode_texts([plan.args.prompt]), dtype=np.float32)
    return u.reshape(-1)


def answer_query(
    plan: QueryPlan,
    ledger: Ledger,
    guard: ChargeGuard,
    *,
    rng_factory: Callable[[], np.random.Generator],
    reuse: bool,
    production: bool = True,
    on_charge: Callable[[BudgetState], None] | None = None,
    noise: NoiseSource | None = None,
    held: HeldReleases | None = None,
) -> Answer:
    """Charge and answer one query (see the module docstring for the order of steps).

    Args:
        plan: the resolved query.
        ledger: the durable ledger.
        guard: deadline/cancellation, checked only before the charge.
        rng_factory: one fresh DP generator per query (``new_dp_generator`` in production).
        reuse: answer an identical public input of the same tenant from its stored release.
        production: refuse a non-CSPRNG generator (tests of the pipeline may pass False).
        on_charge: called with the budget state after a new charge (metrics).
        noise: lattice noise source for hardened profiles (pre-generated off the request path;
            it raises :class:`NoiseExhausted` instead of sampling when none is ready).
        held: where a charged release the ledger cannot store waits for its replay (None: such
            a release is dropped and its replay answered ``ReleaseMissing``).

    Raises:
        Cancelled, DeadlineTooShort, NoiseExhausted: before the charge, nothing charged.
        dprdm.ledger.api.LedgerError: refusal, replay mismatch, missing release, a ledger that
            cannot commit (``LedgerUnavailable``: nothing charged).
        AnswerPending, AnswerLost: after the charge (both name the request id).
    """
    u = _encode(plan)
    domain = plan.served.domain
    if not plan.charged:
        z = _take_noise(plan, noise)
        _give_back_on_error(guard.before_charge, plan, noise, z)
        c = u.astype(np.float64)
        if plan.profile.profile.retrieves:  # non-private index without a budget: nothing to charge
            rng = rng_factory()
            check_dp_generator(rng, production=production)
            c = _release(plan, u, rng, z)
        state = ledger.budget_state(domain) if plan.budget is not None else None  # e.g. lambda = 0
        free = Receipt.free(
            request_id=plan.args.request_id, index=plan.served.name, domain=domain, profile=plan.profile.name,
            state=state,
        )  # fmt: skip
        return Answer(release=c, receipt=free)
    if reuse:
        bound = ledger.request_binding(tenant=plan.tenant, request_id=plan.args.request_id)
        if bound is not None and bound != plan.binding:
            raise ReplayMismatch(f"request_id {plan.args.request_id!r} was used for another request")
        found = ledger.find_release(domain=domain, tenant=plan.tenant, binding_hash=plan.binding)
        if found is not None:
            _spend_id, stored, receipt = found  # the ledger's stored receipt
            if receipt.request_id == plan.args.request_id:  # a replay of that very request
                receipt = receipt.as_replay()
            else:
                receipt = receipt.as_reuse(plan.args.request_id, ledger.budget_state(domain))
            return Answer(release=np.asarray(stored, dtype=np.float64), receipt=receipt)
    z = _take_noise(plan, noise)  # before the charge: a drained pool refuses with nothing charged

    def charge() -> Reservation:
        guard.before_charge()
        _check_available(plan, ledger)  # a sharded index whose shard server is known down: nothing charged
        return ledger.reserve(
            domain=domain,
            tenant=plan.tenant,
            request_id=plan.args.request_id,
            binding_hash=plan.binding,
            profile={"name": plan.profile.name, **plan.profile.profile.to_dict()},
            charge_rdp=plan.profile.charge,
            index=plan.served.name,
        )

    try:
        res = _give_back_on_error(charge, plan, noise, z)  # a refusal returns the unused vector
    except ReleaseMissing:
        found = _store_held(plan, ledger, held)  # a replay of a release the ledger could not store
        if found is None:
            raise
        guard.charged = True
        return found
    guard.charged = True
    if res.replay:  # the ledger's stored receipt, marked replayed (the vector was never used)
        _give_back(plan, noise, z)
        return Answer(release=np.asarray(res.release, dtype=np.float64), receipt=res.receipt)
    if on_charge is not None:
        try:
            on_charge(res.state)
        except Exception:  # metrics never fail a charged query
            log.exception("budget metrics failed after the charge of spend %s", res.spend_id)
    try:
        rng = rng_factory()
        check_dp_generator(rng, production=production)
        c = _release(plan, u, rng, z)
    except ShardUnavailable as exc:  # charged, a shard server failed: UNAVAILABLE, replay ReleaseMissing
        raise ChargedShardUnavailable(request_id=plan.args.request_id, spend_id=res.spend_id,
                                      index=plan.served.name) from exc
    except Exception as exc:  # charged, no release: a replay is answered ReleaseMissing
        raise AnswerLost(request_id=plan.args.request_id, spend_id=res.spend_id) from exc
    _store(plan, ledger, held, res, c)
    return Answer(release=c, receipt=res.receipt)


def _store(
    plan: QueryPlan, ledger: Ledger, held: HeldReleases | None, res: Reservation, c: npt.NDArray[np.float64]
) -> None:
    """Store the charged release; if the ledger cannot, hold it for a replay (AnswerPending)."""
    rid = plan.args.request_id
    try:
        ledger.store_release(res.spend_id, c)
    except LedgerUnavailable as exc:
        if held is None:
            raise AnswerLost(request_id=rid, spend_id=res.spend_id) from exc
        held.put(plan.tenant, rid, _Held(plan.binding, res.spend_id, c, res.receipt))
        raise AnswerPending(
            request_id=rid, spend_id=res.spend_id, cause=exc.cause, retry_after_seconds=exc.retry_after_seconds
        ) from exc
    except Exception as exc:
        raise AnswerLost(request_id=rid, spend_id=res.spend_id) from exc


def _store_held(plan: QueryPlan, ledger: Ledger, held: HeldReleases | None) -> Answer | None:
    """The replay of a held release: store it now (``LedgerUnavailable`` if the ledger still
    cannot: it stays held) and answer it as the replay of its own request; None if none is held."""
    found = None if held is None else held.get(plan.tenant, plan.args.request_id)
    if held is None or found is None or found.binding != plan.binding:
        return None
    ledger.store_release(found.spend_id, found.release)
    held.discard(plan.tenant, plan.args.request_id)
    return Answer(release=found.release, receipt=found.receipt.as_replay())


NoiseSource = Callable[[float, int], npt.NDArray[np.float64]]
"""``noise(sigma, dimension)`` -> one fresh exact lattice noise vector, never sampled on the
request path (``NoisePool.take_nowait``); raises :class:`NoiseExhausted` when none is ready."""


class PoolNoise:
    """The request path's noise source over a :class:`NoisePool`: pop a ready vector or refuse.

    A vector taken for a query that is then refused before its charge (budget, quota, deadline,
    cancellation) or answered as a replay was never used: :meth:`give_back` returns it to the
    pool, so refused requests (e.g. a tenant with no budget left) cannot drain the pool for
    others. Whether a vector comes back depends only on public admission, never on its value,
    so the vectors released stay iid. A vector is never given back once the charge is made.

    Args:
        pool: the background pool (keys prepared at start-up).
        retry_after_seconds: the RetryInfo delay of a refusal (a public constant, never a
            measured sampling time, which would depend on the noise).
    """

    def __init__(self, pool: NoisePool, retry_after_seconds: float = 0.1) -> None:
        self._pool, self._retry = pool, retry_after_seconds

    def __call__(self, sigma: float, dimension: int) -> npt.NDArray[np.float64]:
        """One ready vector.

        Raises:
            NoiseExhausted: none is ready (nothing was sampled on the request path).
        """
        vec = self._pool.take_nowait(sigma, dimension)
        if vec is None:
            raise NoiseExhausted(self._retry)
        return vec

    def give_back(self, sigma: float, dimension: int, vec: npt.NDArray[np.float64]) -> None:
        """Return an unused vector (taken by :meth:`__call__`, never part of a release)."""
        self._pool.put_back(vec, sigma, dimension)


def pool_noise(pool: NoisePool, retry_after_seconds: float = 0.1) -> PoolNoise:
    """The request path's noise source over ``pool`` (see :class:`PoolNoise`)."""
    return PoolNoise(pool, retry_after_seconds)


def _give_back(plan: QueryPlan, noise: NoiseSource | None, z: npt.NDArray[np.float64] | None) -> None:
    give_back = getattr(noise, "give_back", None)
    if z is not None and give_back is not None and plan.profile.hardened_dimension is not None:
        give_back(plan.profile.profile.sigma, plan.profile.hardened_dimension, z)


_T = TypeVar("_T")


def _give_back_on_error(
    step: Callable[[], _T], plan: QueryPlan, noise: NoiseSource | None, z: npt.NDArray[np.float64] | None
) -> _T:
    """Run a pre-charge step; if it raises (nothing charged, the vector unused), return the vector."""
    try:
        return step()
    except BaseException:
        _give_back(plan, noise, z)
        raise


def _take_noise(plan: QueryPlan, noise: NoiseSource | None) -> npt.NDArray[np.float64] | None:
    """The hardened profile's noise vector, taken BEFORE the charge (None for float noise).

    The vector is data-independent; one taken for a query that is then refused or replayed is
    discarded (by position, never by value), which keeps the released vectors iid.
    """
    prof = plan.profile
    if prof.hardened_dimension is None or not prof.profile.retrieves:
        return None
    if noise is None:
        raise RuntimeError("a hardened profile needs a lattice noise source; none is configured")
    return noise(prof.profile.sigma, prof.hardened_dimension)


def _release(
    plan: QueryPlan,
    u: npt.NDArray[np.float32],
    rng: np.random.Generator,
    noise: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.float64]:
    """Search, then release with the index's noise: the exact discrete Gaussian when the profile
    is hardened (no float-noise path exists for it), numpy's float Gaussian otherwise."""
    prof = plan.profile
    selected = _search(plan, u, rng)
    if prof.hardened_dimension is None:
        return release(prof.profile, query=u, selected=selected, rng=rng)
    if noise is None:
        raise RuntimeError("a hardened profile needs its lattice noise vector; none was taken")
    _noisy, c = release_hardened(prof.profile, query=u, selected=selected, noise=noise)
    return c


def _check_available(plan: QueryPlan, ledger: Ledger) -> None:
    """Before the charge: an index with remote shards refuses (:class:`ShardUnavailable`, nothing
    charged) while one of its shard servers is known to be down (a public fact, not private data).
    A replay of a charged request id needs no shard: the ledger answers it."""
    check = getattr(plan.served.index, "check_available", None)
    if check is None or ledger.request_binding(tenant=plan.tenant, request_id=plan.args.request_id) is not None:
        return
    check()


def _search(plan: QueryPlan, u: npt.NDArray[np.float32], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    p = plan.profile
    selected = plan.served.index.search_subsampled(u, k=p.profile.k, q=p.profile.q, rng=rng, nprobe=p.nprobe)
    return np.asarray(selected, dtype=np.float64)
