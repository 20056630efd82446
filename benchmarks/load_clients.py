"""The load generator of ``dprdm bench load``: client processes driving one cell, and the
summary and never-overspent checks of a cell's records (see :mod:`dprdm.benchmarks.load_harness`)."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the harness imports this module; types only
    from .load_harness import BudgetPlan, LoadSettings

__all__ = ["Record", "BUDGET_REFUSALS", "connection_client", "run_cell", "summarize", "check_cell", "format_table"]

BUDGET_REFUSALS = ("PRIVACY_BUDGET_EXHAUSTED", "TENANT_QUOTA_EXHAUSTED")
Record = tuple[float, float, str, str, float, float, str, bool]  # end, latency, code, reason, charged, spent, id, reused


@dataclass(frozen=True)
class _Job:
    """What one load-generator process runs (picklable)."""

    address: str
    token: str
    method: str
    client_ids: tuple[int, ...]
    index: str
    profile: str
    steps: int
    start_at: float
    stop_at: float
    max_requests: int
    timeout: float
    backoff: float
    nonce: str


async def _client_loop(client: Any, job: _Job, cid: int, budget: list[int], out: list[Record]) -> None:
    from dprdm.clients.client import DprdmError

    i = 0
    while time.time() < job.stop_at and budget[0] > 0:
        budget[0] -= 1
        prompt = f"bench {job.nonce} c{cid} r{i}"  # distinct: no release reuse (charged 0)
        t0 = time.perf_counter()
        try:
            if job.method == "retrieve":
                rec = (await client.retrieve(job.index, prompt, profile=job.profile, timeout=job.timeout)).receipt
            else:
                res = await client.generate(job.index, prompt, profile=job.profile, steps=job.steps, seed=i,
                                            timeout=job.timeout)  # fmt: skip
                rec = res.receipt
            lat = time.perf_counter() - t0
            out.append((time.time() - job.start_at, lat, "OK", "", rec.epsilon_charged, rec.epsilon_spent,
                        rec.spend_id, bool(rec.reused or rec.replayed)))  # fmt: skip
        except DprdmError as err:
            lat = time.perf_counter() - t0
            out.append((time.time() - job.start_at, lat, err.code.name, err.reason, 0.0, 0.0, "", False))
            if err.reason in BUDGET_REFUSALS:
                return
            if err.reason in ("OVERLOADED", "NOISE_POOL_EMPTY"):  # nothing charged; back off, retry
                await asyncio.sleep(job.backoff * (0.5 + random.random()))
        i += 1


def connection_client(address: str, token: str, timeout: float) -> Any:
    """An ``AsyncClient`` on its own TCP connection.

    gRPC Python shares ONE connection among all channels of a process to the same target (its
    global subchannel pool), so the clients of a load-generator process would otherwise reach
    ONE worker of a ``dprdm serve --workers N`` server (the kernel balances connections, not
    calls). Each simulated client gets its own connection, as separate users would have.
    """
    import grpc

    from dprdm.clients.client import AsyncClient, ChannelSettings
    from dprdm.proto.v1 import admin_pb2_grpc, dprdm_pb2_grpc

    class _Own(AsyncClient):
        def __init__(self) -> None:  # AsyncClient.__init__ with one more channel option
            self.settings = ChannelSettings.from_env(address, token)
            options = [*self.settings.options(), ("grpc.use_local_subchannel_pool", 1)]
            self._channel = grpc.aio.insecure_channel(self.settings.address, options=options)
            self._stub = dprdm_pb2_grpc.DprdmStub(self._channel)
            self._admin = admin_pb2_grpc.AdminStub(self._channel)
            self.timeout = timeout

    return _Own()


async def _drive(job: _Job) -> tuple[list[Record], float]:
    clients = [connection_client(job.address, job.token, job.timeout) for _ in job.client_ids]
    try:
        for client in clients:
            await client.list_indexes()  # connect before the start line (not charged)
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        cpu0, out = time.process_time(), list[Record]()
        budget = [job.max_requests]
        await asyncio.gather(*(_client_loop(c, job, cid, budget, out) for c, cid in zip(clients, job.client_ids)))
        return out, time.process_time() - cpu0
    finally:
        for client in clients:
            await client.close()


def _run_job(job: _Job) -> tuple[list[Record], float]:
    """Entry point of a load-generator process: (records, CPU seconds spent driving)."""
    return asyncio.run(_drive(job))


def run_cell(
    address: str, token: str, method: str, clients: int, settings: LoadSettings, pool: ProcessPoolExecutor | None
) -> dict[str, Any]:
    """Drive ``method`` with ``clients`` concurrent clients until refusal or the bounds.

    Args:
        address: ``host:port`` of the server.
        token: tenant token.
        method: ``retrieve`` or ``generate``.
        clients: concurrent clients (spread over ``settings.client_procs`` processes).
        settings: bounds and request options.
        pool: spawned worker processes, or None to drive from this process.

    Returns:
        Raw results: ``records`` (per call), ``client_cpu_s``, ``wall_s``.
    """
    procs = max(1, min(settings.client_procs, clients))
    limit = settings.max_requests or (settings.admits(method) * 4 + clients * 16)
    start = time.time() + 0.5 + 0.5 * procs
    jobs = [
        _Job(address, token, method, tuple(range(p, clients, procs)), settings.index, settings.profile,
             settings.steps, start, start + settings.max_seconds, -(-limit // procs), settings.timeout,
             settings.overload_backoff, secrets.token_hex(4))  # fmt: skip
        for p in range(procs)
    ]
    results = list(pool.map(_run_job, jobs)) if pool is not None else [_run_job(j) for j in jobs]
    records = sorted((r for rs, _ in results for r in rs), key=lambda r: r[0])
    return {"records": records, "client_cpu_s": sum(c for _, c in results), "wall_s": time.time() - start}


def _pct(values: Sequence[float], p: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1e3, p)) if len(values) else None


def summarize(raw: dict[str, Any], *, series_points: int = 10) -> dict[str, Any]:
    """Throughput, latency percentiles (ms), refusals by code/reason, epsilon-over-time series.

    Args:
        raw: the output of :func:`run_cell`.
        series_points: length of the epsilon series.

    Returns:
        The cell summary (public facts only).
    """
    recs: list[Record] = raw["records"]
    ok = [r for r in recs if r[2] == "OK"]
    refused = Counter(f"{r[2]}/{r[3]}" if r[3] else r[2] for r in recs if r[2] != "OK")
    end = max((r[0] for r in recs), default=0.0)
    t_granted = max((r[0] for r in ok), default=0.0)
    series = []
    for j in range(1, series_points + 1):
        t = end * j / series_points
        series.append([round(t, 3), max((r[5] for r in ok if r[0] <= t), default=0.0)])
    cpu = raw["client_cpu_s"]
    return {
        "requests": len(recs),
        "granted": len(ok),
        "refusals": dict(sorted(refused.items())),
        "seconds": end,
        "granted_per_s": len(ok) / t_granted if t_granted > 0 else 0.0,
        "responses_per_s": len(recs) / end if end > 0 else 0.0,
        "latency_ms": {"p50": _pct([r[1] for r in ok], 50), "p95": _pct([r[1] for r in ok], 95),
                       "p99": _pct([r[1] for r in ok], 99)},  # fmt: skip
        "refusal_latency_p50_ms": _pct([r[1] for r in recs if r[2] != "OK"], 50),
        "client_cpu_us_per_request": cpu / len(recs) * 1e6 if recs else None,
        "epsilon_series": series,
    }


def check_cell(
    raw: dict[str, Any], budget: Any, plan: BudgetPlan | None, *, start_spent: float = 0.0
) -> dict[str, Any]:
    """The never-overspent invariants of one cell (see the module docstring).

    Args:
        raw: the output of :func:`run_cell`.
        budget: the ledger's ``BudgetInfo`` after the cell (``GetBudget``).
        plan: the local budget plan (None against an external server: composition unknown).
        start_spent: the ledger's epsilon spent before the cell.

    Returns:
        ``ok`` and the checked quantities; ``violations`` names every failed check.
    """
    recs: list[Record] = raw["records"]
    ok = [r for r in recs if r[2] == "OK"]
    charged = [r for r in ok if not r[7]]
    exhausted = any(r[3] in BUDGET_REFUSALS for r in recs)
    unknown = sum(1 for r in recs if r[2] not in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INVALID_ARGUMENT"))
    eps, tol = float(budget.epsilon), 1e-9 * max(1.0, float(budget.epsilon))
    bad: list[str] = []
    out: dict[str, Any] = {"budget_epsilon": eps, "ledger_epsilon_spent": float(budget.epsilon_spent),
                           "granted": len(charged), "unknown_outcome": unknown, "budget_refused": exhausted}  # fmt: skip
    if len({r[6] for r in charged}) != len(charged):
        bad.append("duplicate spend ids among granted receipts")
    max_spent = max((r[5] for r in charged), default=0.0)
    out["max_receipt_epsilon_spent"] = max_spent
    out["naive_sum_epsilon_charged"] = float(sum(r[4] for r in charged))  # basic composition (loose, info)
    if max_spent > eps + tol:
        bad.append(f"a receipt reports epsilon_spent {max_spent!r} > budget {eps!r}")
    if float(budget.epsilon_spent) > eps + tol:
        bad.append(f"GetBudget reports epsilon_spent {budget.epsilon_spent!r} > budget {eps!r}")
    if plan is not None:
        composed = plan.composed(len(charged))
        out.update(expected_admits=plan.admits, composed_granted_epsilon=composed)
        if len(charged) > plan.admits:
            bad.append(f"{len(charged)} queries granted; the budget admits {plan.admits}")
        if composed > eps + tol:
            bad.append(f"composed epsilon of the granted charges {composed!r} > budget {eps!r}")
        if exhausted and len(charged) + unknown < plan.admits:
            bad.append(f"refused after {len(charged)} grants (+{unknown} unknown); the budget admits {plan.admits}")
        lo, hi = composed, plan.composed(len(charged) + unknown)
        if not (lo - tol <= float(budget.epsilon_spent) - start_spent <= hi + tol):
            bad.append(f"ledger spend {budget.epsilon_spent!r} is not within [{lo!r}, {hi!r}] of the grants")
    out["violations"] = bad
    out["ok"] = not bad
    return out


def format_table(cells: Sequence[dict[str, Any]], *, header: bool = True) -> str:
    """A Markdown table of cells: throughput, latency, refusals, CPU per request, invariant."""

    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    lines = []
    if header:
        lines += ["| method | clients | noise | granted/M | granted/s | p50 ms | p95 ms | p99 ms | refusals "
                  "| client CPU us/req | server CPU us/req | eps spent / budget | ok | workers |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for c in cells:
        ch, lat = c["checks"], c["latency_ms"]
        refusals = ", ".join(f"{k} {v}" for k, v in c["refusals"].items()) or "-"
        lines.append(
            f"| {c['method']} | {c['clients']} | {c['noise']} | {ch['granted']}/{ch.get('expected_admits', '?')} "
            f"| {c['granted_per_s']:,.0f} | {f(lat['p50'], '.2f')} | {f(lat['p95'], '.2f')} | {f(lat['p99'], '.2f')} "
            f"| {refusals} | {f(c['client_cpu_us_per_request'], '.0f')} | {f(c['server_cpu_us_per_request'], '.0f')} "
            f"| {ch['ledger_epsilon_spent']:.4g} / {ch['budget_epsilon']:.4g} | {'yes' if ch['ok'] else 'NO'} "
            f"| {c.get('workers', '-')} |"
        )
    return "\n".join(lines)
