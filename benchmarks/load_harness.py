"""The load harness behind ``dprdm bench load`` and ``benchmarks/load.py``: drain a privacy budget over loopback gRPC and check it was never overspent.

One *cell* = one method (``Retrieve`` or ``Generate``) driven by C concurrent clients against a
fresh budget that admits a known number M of queries, until the budget refuses, a request bound
or a time bound is hit. Per cell: throughput, p50/p95/p99 latency of granted calls, refusals by
(status code, ErrorInfo reason), a short series of epsilon spent over time, the CPU time of the
client processes and of the server per request, and the invariant checks:

* granted receipts are distinct spends and never more than M (exactly M once the budget refused);
* the composition (RDP, the ledger's own rule) of the granted receipts' charges fits the budget;
* every receipt's ``epsilon_spent`` and the ledger's ``GetBudget`` spend are within the budget, and
  the ledger holds at least every granted charge (at most those plus calls of unknown outcome).

Local mode (default) builds an index of N synthetic unit vectors (``dprdm.index.build_from_vectors``)
in a temp dir and starts one server subprocess per cell on 127.0.0.1 port 0 (real SQLite ledger,
``hash-<d>-gen`` test bundle with its tiny generator), so the server has its own GIL and a fresh
ledger. ``--address``/``--token`` target a running server instead (its budget, its index).

Only public facts and receipts are printed or written; never a release, a neighbour or a count of
the private data. The load generator runs in ``--client-procs`` spawned processes, each an asyncio
loop over one ``AsyncClient`` channel; its own CPU time per request is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LoadSettings",
    "BudgetPlan",
    "synthetic_index",
    "plan_budget",
    "LocalServer",
    "run_cell",
    "check_cell",
    "run_load",
    "format_table",
    "add_load_arguments",
    "load_command",
    "BenchError",
]



class BenchError(ValueError):
    """A bad benchmark flag or setting (the command line prints it as one line, exit status 2)."""


TOKEN_ENV = "DPRDM_BENCH_TOKEN"
DOMAIN = "bench-load"
INDEX = "load"
PROFILE = "default"
BUDGET_REFUSALS = ("PRIVACY_BUDGET_EXHAUSTED", "TENANT_QUOTA_EXHAUSTED")
Record = tuple[float, float, str, str, float, float, str, bool]  # end, latency, code, reason, charged, spent, id, reused


@dataclass(frozen=True)
class LoadSettings:
    """Options of one benchmark run (every field has a CLI flag of the same name)."""

    n: int = 1_000_000
    d: int = 64
    k: int = 16
    q: float = 0.001
    sigma: float = 0.2
    lam: float = 0.5
    methods: tuple[str, ...] = ("retrieve", "generate")
    clients: tuple[int, ...] = (1, 4, 16, 64)
    queries: int = 2000
    generate_queries: int = 200
    steps: int = 2
    max_requests: int = 0
    max_seconds: float = 60.0
    timeout: float = 30.0
    client_procs: int = 1
    noise: str = "auto"
    group_commit: bool = True
    query_threads: int = 32  # the server default (ServerConfig.query_threads)
    generation_workers: int = 1
    generation_queue: int = 8
    overload_backoff: float = 0.1
    index_path: str | None = None
    address: str | None = None
    token: str | None = None
    index: str = INDEX
    profile: str = PROFILE
    tmp: str | None = None
    seed: int = 0

    def admits(self, method: str) -> int:
        """Queries the budget of a ``method`` cell admits (local mode)."""
        return self.queries if method == "retrieve" else self.generate_queries


@dataclass(frozen=True)
class BudgetPlan:
    """A budget that admits exactly ``admits`` queries of one profile (local mode)."""

    epsilon: float
    delta: float
    admits: int
    hardened_dimension: int | None
    curve: list[float] = field(repr=False)

    def composed(self, queries: int) -> float:
        """Epsilon of ``queries`` charges at the budget's delta (min over the shared order grid)."""
        from dprdm.privacy import DEFAULT_ORDERS, epsilon_from_rdp

        if queries <= 0:
            return 0.0
        return float(epsilon_from_rdp(np.asarray(self.curve) * queries, DEFAULT_ORDERS, self.delta).epsilon)


def synthetic_index(directory: Path, *, n: int, d: int, seed: int = 0, block: int = 200_000) -> Path:
    """Build a private flat index of ``n`` random unit vectors (encoder ``FakeEncoder(d)``).

    Args:
        directory: an empty working directory; the index is ``directory/index``.
        n: number of vectors (and the public size N̄).
        d: dimension (the ``hash-<d>-gen`` test bundle serves it).
        seed: vector seed.
        block: rows generated at a time (bounded memory).

    Returns:
        The index directory.
    """
    from dprdm.index import BuildConfig, build_from_vectors
    from dprdm.models.fake import FakeEncoder

    raw = directory / "vectors.npy"
    mm = np.lib.format.open_memmap(raw, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        mm[s : s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    mm.flush()
    del mm
    out = directory / "index"
    cfg = BuildConfig(output=out, corpus_id=DOMAIN, public_size=n, progress=False, existing="overwrite")
    build_from_vectors(np.load(raw, mmap_mode="r"), FakeEncoder(d).identity, cfg)
    raw.unlink()
    return out


def plan_budget(profile: Any, admits: int, delta: float, hardened_dimension: int | None) -> BudgetPlan:
    """The budget epsilon halfway between eps(M) and eps(M + 1), so it admits exactly M queries.

    Args:
        profile: the served ``dprdm.privacy.Profile``.
        admits: M, the number of queries to admit (>= 1).
        delta: the budget's delta.
        hardened_dimension: d when the server releases with the exact discrete Gaussian, else None.

    Returns:
        The plan (epsilon, delta, M, the one-query RDP curve).

    Raises:
        ValueError: M < 1, or eps(M + 1) == eps(M) (a profile too cheap to pin M down).
    """
    from dprdm.privacy import DEFAULT_ORDERS
    from dprdm.privacy.accountant import retrieval_rdp

    if admits < 1:
        raise ValueError(f"queries must be >= 1; found {admits}")
    curve = [float(x) for x in retrieval_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=hardened_dimension)]
    plan = BudgetPlan(0.0, delta, admits, hardened_dimension, curve)
    lo, hi = plan.composed(admits), plan.composed(admits + 1)
    if not hi > lo:
        raise ValueError(f"epsilon does not grow between {admits} and {admits + 1} queries; lower --queries")
    return BudgetPlan(0.5 * (lo + hi), delta, admits, hardened_dimension, curve)


def server_document(settings: LoadSettings, index_path: Path, data_dir: Path, plan: BudgetPlan) -> dict[str, Any]:
    """The server configuration (``parse_config`` form) of one local cell; the token comes from
    ``$DPRDM_BENCH_TOKEN``."""
    index: dict[str, Any] = {
        "path": str(index_path),
        "bundle": f"hash-{settings.d}-gen",
        "profiles": {PROFILE: {"k": settings.k, "q": settings.q, "sigma": settings.sigma, "lambda": settings.lam}},
    }
    if settings.noise != "auto":
        index["noise"] = settings.noise
    if settings.noise == "float":  # the benchmark's corpus is synthetic; the opt-in is logged
        index["allow_float_noise"] = True
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "group_commit": settings.group_commit,
            "query_threads": settings.query_threads,
            "generation_workers": settings.generation_workers,
            "generation_queue": settings.generation_queue,
        },
        "tokens": [{"tenant": "bench", "role": "tenant", "token_env": TOKEN_ENV}],
        "indexes": {INDEX: index},
        "budgets": {DOMAIN: {"epsilon": plan.epsilon, "delta": plan.delta}},
    }


def served_noise(doc: dict[str, Any], token: str) -> str:
    """The noise kind the server will use for the index of ``doc`` (``float`` on servers without
    the option)."""
    from dprdm.server.config import parse_config

    cfg = parse_config(doc, env={TOKEN_ENV: token})
    return str(getattr(cfg.indexes[0], "noise", "float"))


class LocalServer:
    """A ``dprdm`` server subprocess on 127.0.0.1 port 0 (real SQLite ledger, test bundle).

    Args:
        doc: the configuration (``server_document``).
        token: the tenant token (passed through the environment, never on the command line).
        workdir: where the configuration and the server's stderr log go.
        startup_timeout: seconds to wait for the port.

    Raises:
        RuntimeError: the server exited or did not report its port in time (with its log tail).
    """

    def __init__(self, doc: dict[str, Any], token: str, workdir: Path, startup_timeout: float = 300.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "server.json"
        conf.write_text(json.dumps(doc))
        self.log = workdir / "server.log"
        env = {**os.environ, TOKEN_ENV: token}
        cmd = [sys.executable, "-m", "dprdm.benchmarks.load_harness", "--serve-child", str(conf)]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        self.pid = self.proc.pid
        self.port = self._wait_port(startup_timeout)
        self.address = f"127.0.0.1:{self.port}"

    def _wait_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline, buf = time.monotonic() + timeout, b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                buf += os.read(self.proc.stdout.fileno(), 4096)
                for line in buf.decode(errors="replace").splitlines():
                    if "listening on port" in line:
                        return int(line.rsplit(" ", 1)[-1])
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the benchmark server did not start; its log ends with:\n{tail}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux ``/proc``; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> None:
        """SIGTERM (graceful stop), then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
            if err.reason == "OVERLOADED":  # nothing charged; back off (jittered) and retry
                await asyncio.sleep(job.backoff * (0.5 + random.random()))
        i += 1


async def _drive(job: _Job) -> tuple[list[Record], float]:
    from dprdm.clients.client import AsyncClient

    async with AsyncClient(job.address, job.token, timeout=job.timeout) as client:
        await client.list_indexes()  # connect before the start line (not charged)
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        cpu0, out = time.process_time(), list[Record]()
        budget = [job.max_requests]
        await asyncio.gather(*(_client_loop(client, job, cid, budget, out) for cid in job.client_ids))
        return out, time.process_time() - cpu0


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


def _budget_info(address: str, token: str, index: str) -> Any:
    from dprdm.clients.client import Client

    with Client(address, token, timeout=30) as c:
        return c.budget(index)


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg": list(os.getloadavg())}  # fmt: skip


def run_load(settings: LoadSettings, *, log: Any = None) -> dict[str, Any]:
    """Run every (method, clients) cell and return the JSON-ready result.

    Args:
        settings: the run's options.
        log: a file for progress lines (default stderr).

    Returns:
        ``{"benchmark": "load", "settings", "machine", "cells": [...], "ok"}``.
    """
    log = log or sys.stderr
    pool = ProcessPoolExecutor(settings.client_procs, mp_context=_spawn()) if settings.client_procs > 1 else None
    work = Path(tempfile.mkdtemp(prefix="dprdm-load-", dir=settings.tmp))
    cells: list[dict[str, Any]] = []
    result: dict[str, Any] = {"benchmark": "load", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "settings": {**asdict(settings), "token": None}, "machine": _machine()}  # fmt: skip
    try:
        if settings.address:
            _external_cells(settings, cells, pool, log)
        else:
            _local_cells(settings, work, cells, pool, log, result)
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_avg_after"] = list(os.getloadavg())
    result["cells"] = cells
    result["ok"] = all(c["checks"]["ok"] for c in cells)
    return result


def _spawn() -> Any:
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _local_cells(settings: LoadSettings, work: Path, cells: list[dict[str, Any]], pool: Any, log: Any,
                 result: dict[str, Any]) -> None:  # fmt: skip
    from dprdm.privacy import Profile, default_delta

    t0 = time.perf_counter()
    if settings.index_path:
        index_path = Path(settings.index_path)
    else:
        (work / "build").mkdir()
        index_path = synthetic_index(work / "build", n=settings.n, d=settings.d, seed=settings.seed)
    result["index_build_s"] = time.perf_counter() - t0
    print(f"index ready ({settings.n:,} x {settings.d}) in {result['index_build_s']:.1f}s", file=log, flush=True)
    token = secrets.token_urlsafe(24)
    profile = Profile(k=settings.k, q=settings.q, sigma=settings.sigma, lam=settings.lam)
    for method in settings.methods:
        for clients in settings.clients:
            name = f"{method}-{clients}"
            probe = server_document(settings, index_path, work / name / "data", BudgetPlan(1.0, 1e-9, 1, None, []))
            noise = served_noise(probe, token)
            hardened = settings.d if noise == "discrete" else None
            plan = plan_budget(profile, settings.admits(method), default_delta(settings.n), hardened)
            doc = server_document(settings, index_path, work / name / "data", plan)
            with LocalServer(doc, token, work / name) as srv:
                cpu0 = srv.cpu_seconds()
                raw = run_cell(srv.address, token, method, clients, settings, pool)
                server_cpu = srv.cpu_seconds() - cpu0
                info = _budget_info(srv.address, token, INDEX)
            cell = _cell(method, clients, raw, check_cell(raw, info, plan), noise, plan.epsilon, server_cpu)
            cells.append(cell)
            print(format_table([cell], header=not cells[:-1]), file=log, flush=True)
            shutil.rmtree(work / name, ignore_errors=True)


def _external_cells(settings: LoadSettings, cells: list[dict[str, Any]], pool: Any, log: Any) -> None:
    token = settings.token or os.environ.get("DPRDM_TOKEN", "")
    assert settings.address is not None
    for method in settings.methods:
        for clients in settings.clients:
            before = _budget_info(settings.address, token, settings.index)
            raw = run_cell(settings.address, token, method, clients, settings, pool)
            after = _budget_info(settings.address, token, settings.index)
            checks = check_cell(raw, after, None, start_spent=float(before.epsilon_spent))
            cells.append(_cell(method, clients, raw, checks, "server", float(after.epsilon), float("nan")))
            print(format_table([cells[-1]], header=len(cells) == 1), file=log, flush=True)


def _cell(method: str, clients: int, raw: dict[str, Any], checks: dict[str, Any], noise: str, epsilon: float,
          server_cpu: float) -> dict[str, Any]:  # fmt: skip
    s = summarize(raw)
    per_req = server_cpu / s["requests"] * 1e6 if s["requests"] and server_cpu == server_cpu else None
    return {"method": method, "clients": clients, "noise": noise, "budget_epsilon": epsilon, **s,
            "server_cpu_us_per_request": per_req, "checks": checks}  # fmt: skip


def format_table(cells: Sequence[dict[str, Any]], *, header: bool = True) -> str:
    """A Markdown table of cells: throughput, latency, refusals, CPU per request, invariant."""

    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    lines = []
    if header:
        lines += ["| method | clients | noise | granted/M | granted/s | p50 ms | p95 ms | p99 ms | refusals "
                  "| client CPU us/req | server CPU us/req | eps spent / budget | ok |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for c in cells:
        ch, lat = c["checks"], c["latency_ms"]
        refusals = ", ".join(f"{k} {v}" for k, v in c["refusals"].items()) or "-"
        lines.append(
            f"| {c['method']} | {c['clients']} | {c['noise']} | {ch['granted']}/{ch.get('expected_admits', '?')} "
            f"| {c['granted_per_s']:,.0f} | {f(lat['p50'], '.2f')} | {f(lat['p95'], '.2f')} | {f(lat['p99'], '.2f')} "
            f"| {refusals} | {f(c['client_cpu_us_per_request'], '.0f')} | {f(c['server_cpu_us_per_request'], '.0f')} "
            f"| {ch['ledger_epsilon_spent']:.4g} / {ch['budget_epsilon']:.4g} | {'yes' if ch['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; found {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1; found {text!r}")
    return values


def add_load_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """Add the ``bench load`` flags (shared by ``dprdm bench load`` and ``benchmarks/load.py``)."""
    d = LoadSettings()
    a = parser.add_argument
    a("--n", type=lambda s: int(float(s)), default=d.n, help="synthetic vectors (and public size); e.g. 1e6")
    a("--d", type=int, default=d.d, help="dimension (64 or 512; any d works)")
    a("--index-path", default=None, help="serve this index (built for FakeEncoder(d)) instead of building")
    a("--k", type=int, default=d.k)
    a("--q", type=float, default=d.q, help="Poisson subsampling rate of the profile")
    a("--sigma", type=float, default=d.sigma)
    a("--lambda", dest="lam", type=float, default=d.lam)
    a("--methods", default=",".join(d.methods), help="retrieve,generate")
    a("--clients", type=_ints, default=d.clients, help="comma-separated concurrency levels")
    a("--queries", type=int, default=d.queries, help="Retrieve queries the budget of a cell admits")
    a("--generate-queries", type=int, default=d.generate_queries, help="Generate queries a budget admits")
    a("--steps", type=int, default=d.steps, help="Generate diffusion steps")
    a("--max-requests", type=int, default=0, help="per-cell request bound (default 4 M + 16 clients)")
    a("--max-seconds", type=float, default=d.max_seconds, help="per-cell time bound")
    a("--timeout", type=float, default=d.timeout, help="per-call deadline (s)")
    a("--overload-backoff", type=float, default=d.overload_backoff, help="mean retry delay after OVERLOADED (s)")
    a("--client-procs", type=int, default=d.client_procs, help="load-generator processes")
    a("--noise", choices=("auto", "float", "discrete"), default=d.noise, help="index noise (auto: server default)")
    a("--no-group-commit", dest="group_commit", action="store_false")
    a("--query-threads", type=int, default=d.query_threads)
    a("--generation-workers", type=int, default=d.generation_workers)
    a("--generation-queue", type=int, default=d.generation_queue)
    a("--address", default=None, help="target a running server instead (its index and budget)")
    a("--token", default=None, help="tenant token for --address (default $DPRDM_TOKEN)")
    a("--index", default=INDEX, help="index name on --address")
    a("--profile", default=PROFILE, help="profile name on --address")
    a("--tmp", default=None, help="directory for the temp index and ledgers (local disk)")
    a("--seed", type=int, default=0, help="seed of the synthetic vectors")
    a("--out", type=Path, default=default_out, help="results directory")


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    """Validate the parsed flags into :class:`LoadSettings`.

    Raises:
        BenchError: naming the bad flag.
    """
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or set(methods) - {"retrieve", "generate"}:
        raise BenchError(f"--methods: expected retrieve and/or generate; found {args.methods!r}")
    checks = {"--n": args.n >= 1, "--d": args.d >= 1, "--queries": args.queries >= 1,
              "--generate-queries": args.generate_queries >= 1, "--client-procs": args.client_procs >= 1,
              "--max-seconds": 0 < args.max_seconds <= 3600, "--max-requests": args.max_requests >= 0,
              "--steps": args.steps >= 1, "--timeout": args.timeout > 0,
              "--overload-backoff": 0 <= args.overload_backoff <= 10}  # fmt: skip
    for flag, good in checks.items():
        if not good:
            raise BenchError(f"{flag}: out of range")
    if args.address and not (args.token or os.environ.get("DPRDM_TOKEN")):
        raise BenchError("--address needs --token or $DPRDM_TOKEN")
    host = (args.address or "127.0.0.1:0").rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise BenchError(f"--address: the load benchmark runs over loopback only; found {args.address!r}")
    if args.index_path and not Path(args.index_path, "manifest.json").is_file():
        raise BenchError(f"--index-path: no index at {args.index_path!r}")
    return LoadSettings(
        n=args.n, d=args.d, k=args.k, q=args.q, sigma=args.sigma, lam=args.lam, methods=methods,
        clients=tuple(args.clients), queries=args.queries, generate_queries=args.generate_queries,
        steps=args.steps, max_requests=args.max_requests, max_seconds=args.max_seconds, timeout=args.timeout,
        overload_backoff=args.overload_backoff,
        client_procs=args.client_procs, noise=args.noise, group_commit=args.group_commit,
        query_threads=args.query_threads, generation_workers=args.generation_workers,
        generation_queue=args.generation_queue, index_path=args.index_path, address=args.address,
        token=args.token, index=args.index, profile=args.profile, tmp=args.tmp, seed=args.seed,
    )  # fmt: skip


def load_command(args: argparse.Namespace) -> int:
    """Run the load benchmark; write ``load-<time>.json`` to ``--out``; print the table.

    Returns:
        0 if every cell kept the never-overspent invariants, 1 otherwise.

    Raises:
        BenchError: a bad flag.
    """
    settings = settings_from_args(args)
    result = run_load(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result["cells"]))
    for c in result["cells"]:
        for v in c["checks"]["violations"]:
            print(f"INVARIANT VIOLATED ({c['method']}, {c['clients']} clients): {v}", file=sys.stderr)
    print(f"wrote {path}")
    return 0 if result["ok"] else 1


def _serve_child(config_file: str) -> None:
    """Serve a bench configuration: the real index loader and SQLite ledger, the test bundles."""
    from dprdm.server.adapters import load_index
    from dprdm.server.app import serve
    from dprdm.server.catalog import Loaders
    from dprdm.server.config import parse_config
    from dprdm.server.testing import fake_loaders

    path = Path(config_file)
    config = parse_config(json.loads(path.read_text()), base_dir=path.parent)
    asyncio.run(serve(config, loaders=Loaders(index=load_index, bundle=fake_loaders().bundle)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-child":
        _serve_child(sys.argv[2])
    else:
        sys.exit("usage: python -m dprdm.benchmarks.load_harness --serve-child CONFIG.json (internal)")
