"""The transport-free service layer: Retrieve, Generate, GetBudget, ListIndexes.

Async orchestration around :func:`dprdm.server.query.answer_query`:

* ledger work and retrieval run in a small thread pool (the ledger may group-commit concurrent
  reservations); generation runs in the bounded :class:`GenerationPool`;
* the charge-and-release step is shielded from cancellation: once a query is submitted it runs
  to completion (its guard stops it only BEFORE the charge), so a caller that goes away after
  the charge leaves a stored, replayable release;
* with ``fixed_response_seconds``, answers leave at a fixed time after admission, so the
  response time does not depend on the private data (unless the work overran it);
* concurrent requests with the same (tenant, request id) are serialised: the second waits for the
  first and is then answered as a replay (instead of seeing a reservation without its release);
* shutdown drain: every Retrieve/Generate is an admitted call while it runs here; :meth:`drain`
  waits for them, :meth:`cut` ends those still running with
  :class:`~dprdm.server.errors.ShuttingDown` naming their request id (their queries still run to
  completion in the pool, so a charged one stores its release and a retry returns it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from dprdm.ledger.api import BudgetState, Ledger
from dprdm.privacy import Budget, new_dp_generator
from dprdm.privacy.discrete import LatticeSampler, NoisePool
from dprdm.privacy.fast_discrete import FastExactSampler

from .api_types import (
    Answer,
    BudgetView,
    Caller,
    Done,
    GenerateArgs,
    GenerateEvent,
    IndexView,
    ProfileView,
    QueryArgs,
    Queued,
    QuotaView,
    Retrieved,
    validate_name,
)
from .catalog import Catalog
from .config import Limits
from .errors import (
    DeadlineTooShort,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShuttingDown,
    StartupError,
    Unsupported,
)
from .generation import GenerationJob, GenerationPool
from .metrics import InstrumentedLedger, Metrics
from .query import ChargeGuard, HeldReleases, answer_query, plan_query, pool_noise

__all__ = ["ServiceOptions", "DprdmService", "budget_view"]

log = logging.getLogger("dprdm.server")


@dataclass(frozen=True)
class ServiceOptions:
    """Operational options of the service layer (from :class:`~dprdm.server.config.ServerConfig`)."""

    limits: Limits = Limits()
    reuse_releases: bool = True
    query_threads: int = 8
    generation_workers: int = 1
    generation_queue: int = 8
    min_deadline_seconds: float = 0.05
    fixed_response_seconds: float | None = None
    noise_pool_size: int = 2048
    noise_pool_threads: int = 1
    noise_retry_seconds: float = 0.1


def budget_view(state: BudgetState, quota: QuotaView | None = None) -> BudgetView:
    """Public view of a budget state."""
    b: Budget = state.budget
    return BudgetView(
        domain=state.domain,
        epsilon=float(b.epsilon),
        delta=float(b.delta),
        epsilon_spent=float(state.epsilon_spent),
        epsilon_left=float(state.epsilon_left),
        rule="single_profile" if b.profile is not None else "renyi_filter",
        filter_order=float(b.filter_order or 0.0),
        quota=quota,
    )


def _hardened_keys(catalog: Catalog) -> set[tuple[float, int]]:
    """(sigma, dimension) of every served profile released with the exact discrete Gaussian."""
    return {
        (p.profile.sigma, p.hardened_dimension)
        for s in catalog.indexes.values()
        for p in s.profiles.values()
        if p.hardened_dimension is not None and p.profile.retrieves
    }


def _make_sampler() -> LatticeSampler:
    """The production lattice sampler: the vectorised exact CKS20 sampler (~30x OpenDP's
    throughput, ``benchmarks/noise.py``) driven by ChaCha20 keyed from ``os.urandom``."""
    return FastExactSampler(new_dp_generator())


def _default_noise_pool(catalog: Catalog, options: ServiceOptions = ServiceOptions()) -> NoisePool | None:
    """A background pool of exact lattice noise for every hardened profile served (or None),
    filled before the server answers (``options.noise_pool_size`` vectors per key).

    Raises:
        StartupError: the sampler refuses a served profile's sigma (outside its range; named).
    """
    keys = _hardened_keys(catalog)
    if not keys:
        return None
    pool = NoisePool(_make_sampler(), options.noise_pool_size, threads=options.noise_pool_threads)
    try:
        for sigma, dim in sorted(keys):
            try:
                pool.prepare(sigma, dim, fill=True)
            except ValueError as exc:
                raise StartupError(f"discrete noise for sigma={sigma!r}, dimension={dim}: {exc}") from None
    except BaseException:
        pool.close()
        raise
    return pool


class _Admission:
    """One admitted Retrieve/Generate while it runs in the service (the shutdown drain's unit).

    A cut (:meth:`DprdmService.cut`) cancels the call's task; leaving this context turns that
    cancellation into :class:`ShuttingDown` with the request id (any other cancellation, e.g. the
    caller going away, stays a cancellation).
    """

    def __init__(self, service: DprdmService, request_id: str) -> None:
        self.service, self.request_id = service, request_id
        self.task = asyncio.current_task()
        self.guard: ChargeGuard | None = None
        self.cut = False

    def __enter__(self) -> _Admission:
        if self.service._draining:
            log.info("shutting down: refused call request_id=%s (not admitted, not charged)", self.request_id)
            raise ShuttingDown(self.request_id)
        self.service._admitted.add(self)
        self.service._idle.clear()
        return self

    def __exit__(
        self, etype: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        admitted = self.service._admitted
        admitted.discard(self)
        if not admitted:
            self.service._idle.set()
        if self.cut and isinstance(exc, asyncio.CancelledError):
            if self.task is not None:
                self.task.uncancel()
            raise ShuttingDown(self.request_id) from None


class DprdmService:
    """The public API's service layer (no gRPC types)."""

    def __init__(
        self,
        catalog: Catalog,
        ledger: Ledger,
        options: ServiceOptions = ServiceOptions(),
        *,
        metrics: Metrics | None = None,
        rng_factory: Callable[[], np.random.Generator] = new_dp_generator,
        noise_pool: NoisePool | None = None,
    ) -> None:
        self.catalog, self.ledger, self.options = catalog, ledger, options
        self.metrics = metrics
        if metrics is not None:  # commit durations and error counts (public: the ledger holds no private data)
            self.ledger = InstrumentedLedger(ledger, metrics)  # type: ignore[assignment]
        self._rng_factory = rng_factory
        if noise_pool is not None:  # an injected pool (tests, tools): register the served keys
            for sigma, dim in sorted(_hardened_keys(catalog)):
                noise_pool.prepare(sigma, dim)
        self._noise_pool = noise_pool if noise_pool is not None else _default_noise_pool(catalog, options)
        self._noise = (
            None if self._noise_pool is None else pool_noise(self._noise_pool, options.noise_retry_seconds)
        )
        self._pool = ThreadPoolExecutor(max_workers=options.query_threads, thread_name_prefix="dprdm-query")
        self.generation = GenerationPool(options.generation_workers, options.generation_queue)
        if metrics is not None:  # generation time depends on public inputs only (steps, images, model)
            self.generation.on_generated = metrics.generation_seconds.observe
        self._inflight: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self.held = HeldReleases()  # charged releases the ledger could not store, until replayed
        self._admitted: set[_Admission] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def admitted(self) -> int:
        """Retrieve/Generate calls running in the service now."""
        return len(self._admitted)

    def begin_drain(self) -> None:
        """Refuse new Retrieve/Generate calls with :class:`ShuttingDown` (nothing charged)."""
        self._draining = True

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the admitted calls to finish; whether they all did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return not self._admitted
        return True

    def cut(self) -> int:
        """End every admitted call with :class:`ShuttingDown` (one log line each); returns how many.

        An uncharged query is stopped before its charge; a charged one keeps running in the pool
        until its release is stored (:meth:`close` waits for it), so a retry returns it.
        """
        calls = sorted(self._admitted, key=lambda a: a.request_id)
        for call in calls:
            charged = call.guard is not None and call.guard.charged
            if call.guard is not None:
                call.guard.cancel()  # effective only before the charge
            call.cut = True
            if call.task is not None:
                call.task.cancel()
            log.warning(
                "shutting down: cut call request_id=%s (%s)",
                call.request_id,
                "charged: its release is stored before exit" if charged else "not charged",
            )
        return len(calls)

    async def retrieve(self, caller: Caller, args: QueryArgs, *, deadline: float | None = None) -> Answer:
        """Charge and answer one query: the release and its receipt.

        Args:
            caller: the authenticated tenant.
            args: validated query arguments.
            deadline: absolute ``time.monotonic()`` deadline of the call, or None.

        Raises:
            NotFound, DeadlineTooShort, Cancelled, ShuttingDown, and the ledger's errors
            (refusal, replay mismatch, missing release).
        """
        with _Admission(self, args.request_id) as call:
            return await self._retrieve(caller, args, deadline, call)

    async def _retrieve(
        self, caller: Caller, args: QueryArgs, deadline: float | None, call: _Admission
    ) -> Answer:
        start = time.monotonic()
        plan = plan_query(self.catalog, caller, args)
        fixed = self.options.fixed_response_seconds
        guard = ChargeGuard(deadline=deadline, margin=max(self.options.min_deadline_seconds, fixed or 0.0))
        call.guard = guard
        guard.before_charge()
        key = (caller.tenant, args.request_id)
        while args.client_request_id and key in self._inflight:
            await asyncio.wait([self._inflight[key]])
        on_charge = self.metrics.budget_state if self.metrics else None
        future = asyncio.get_running_loop().run_in_executor(
            self._pool,
            lambda: answer_query(
                plan,
                self.ledger,
                guard,
                rng_factory=self._rng_factory,
                reuse=self.options.reuse_releases,
                on_charge=on_charge,
                noise=self._noise,
                held=self.held,
            ),
        )
        future.add_done_callback(_consume)
        if args.client_request_id:
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        try:
            answer = await asyncio.shield(future)
        except asyncio.CancelledError:
            guard.cancel()  # effective only if the charge has not happened yet
            raise
        if fixed is not None:  # timing is a release: answer at a fixed time after admission (SPEC §3)
            await asyncio.sleep(max(0.0, start + fixed - time.monotonic()))
        return answer

    async def generate(
        self, caller: Caller, args: GenerateArgs, *, deadline: float | None = None
    ) -> AsyncIterator[GenerateEvent]:
        """Queued -> Retrieved (receipt) -> Progress... -> images -> Done.

        Overload is refused with :class:`~dprdm.server.errors.Overloaded` before any charge.

        Raises:
            Unsupported: the index has no generator (``GeneratorFailed``: it failed to load).
            GeneratorLoading: the generator is still loading in the background.
            Plus the errors of :meth:`retrieve`.
        """
        plan = plan_query(self.catalog, caller, args.query)
        generator = plan.served.bundle.generator
        if generator is None:
            raise Unsupported(f"index {plan.served.name!r} has no generator; use Retrieve")
        loaded = getattr(generator, "loaded", None)  # a generator loading in the background
        if callable(loaded):
            generator = loaded()  # GeneratorLoading / GeneratorFailed: before any charge
        if deadline is not None and time.monotonic() + self.options.min_deadline_seconds >= deadline:
            raise DeadlineTooShort()
        with _Admission(self, args.query.request_id) as call:
            async for event in self._generate(caller, args, deadline, call, generator):
                yield event

    async def _generate(
        self, caller: Caller, args: GenerateArgs, deadline: float | None, call: _Admission, generator: Any
    ) -> AsyncIterator[GenerateEvent]:
        slot = self.generation.admit()
        self._gauge()
        try:
            yield Queued(position=slot.position)
            answer = await self._retrieve(caller, args.query, deadline, call)
            yield Retrieved(receipt=answer.receipt)
            seed = args.seed if args.seed is not None else self.generation.new_seed()
            job = GenerationJob(
                generator,
                answer.release.astype(np.float32),
                args.query.prompt,
                args.num_images,
                args.steps,
                seed,
            )
            async for event in self.generation.run(job):
                yield event
            yield Done(receipt=answer.receipt, seed=seed, num_images=args.num_images)
        finally:
            slot.release()
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.generation_inside.set(self.generation.inside)

    def _domain_of(self, caller: Caller, index: str | None, domain: str | None) -> str:
        if index is not None:
            served = self.catalog.indexes.get(validate_name("index", index))
            if served is None:
                raise NotFound("index", index)
            if not caller.may_use(served.name, served.domain):
                raise PermissionDenied(f"this token may not use index {served.name!r}")
            return served.domain
        if not domain:
            raise InvalidArgument("domain", "one of index or domain is required")
        validate_name("domain", domain)
        if domain not in self.catalog.budgets:
            raise NotFound("domain", str(domain))
        if not any(caller.may_use(s.name, s.domain) for s in self.catalog.indexes.values() if s.domain == domain):
            raise PermissionDenied(f"this token may not use domain {domain!r}")
        return str(domain)

    async def get_budget(
        self, caller: Caller, *, index: str | None = None, domain: str | None = None
    ) -> BudgetView:
        """The budget of an index's domain (or of a served domain by name), with the caller's quota.

        Raises:
            InvalidArgument, NotFound, PermissionDenied (a token limited to other indexes/domains).
        """
        name = self._domain_of(caller, index, domain)
        if name not in self.catalog.budgets:
            raise NotFound("domain", name)
        loop = asyncio.get_running_loop()
        state, quotas = await loop.run_in_executor(self._pool, _state_and_quotas, self.ledger, name)
        q = quotas.get(caller.tenant)
        quota = None if q is None else QuotaView(caller.tenant, float(q[0]), float(q[1]))
        if self.metrics is not None:
            self.metrics.budget_state(state)
        return budget_view(state, quota)

    async def list_indexes(self, caller: Caller) -> list[IndexView]:
        """Public facts about every served index the caller may use (public size N̄, never the exact
        count)."""
        views = []
        for served in self.catalog.indexes.values():
            if not caller.may_use(served.name, served.domain):
                continue
            budget = None
            if served.domain in self.catalog.budgets:
                budget = await self.get_budget(caller, domain=served.domain)
            idx = served.index
            views.append(
                IndexView(
                    name=served.name,
                    domain=served.domain,
                    version=idx.version,
                    dimension=idx.dimension,
                    public_size=idx.public_size,
                    encoder=idx.encoder.to_dict(),
                    profiles=tuple(
                        ProfileView(
                            p.name,
                            p.profile.k,
                            p.profile.q,
                            p.profile.sigma,
                            p.profile.lam,
                            p.epsilon_per_query,
                        )
                        for p in served.profiles.values()
                    ),
                    budget=budget,
                    private=served.config.private,
                    generation=served.bundle.generator is not None,
                    bundle=served.bundle.name,
                )
            )
        return views

    def close(self) -> None:
        """Stop the worker pools (running queries finish), then close the indexes that hold
        connections (an index with a ``close()`` method: the channels to shard servers)."""
        self.generation.shutdown()
        self._pool.shutdown(wait=True)
        if self._noise_pool is not None:
            self._noise_pool.close()
        for served in self.catalog.indexes.values():
            close = getattr(served.index, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # one index failing to close must not keep the others open
                    log.exception("index %s: closing failed", served.name)


def _consume(future: asyncio.Future[Answer]) -> None:
    """Mark a shielded future's exception as retrieved (its caller may have gone away)."""
    if not future.cancelled():
        future.exception()


def _state_and_quotas(ledger: Ledger, domain: str) -> tuple[BudgetState, dict[str, tuple[float, float]]]:
    return ledger.budget_state(domain), ledger.tenant_quotas(domain)
