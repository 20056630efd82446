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
ledger. ``--workers 1,2`` runs each cell once per worker count (``dprdm serve --workers N``: a
supervisor and N server processes on one port), ``--repeats R`` R times, alternating the order of
the worker counts between repeats (paired runs, so drift on a shared machine hits both); the
result's ``medians`` hold the per-configuration medians. ``--address``/``--token`` target a
running server instead (its budget, its index).

Only public facts and receipts are printed or written; never a release, a neighbour or a count of
the private data. The load generator runs in ``--client-procs`` spawned processes, each an asyncio
loop over one ``AsyncClient`` channel; its own CPU time per request is reported.

Size (~430 lines, over the ~400 guideline): settings, budget planning, the local and external
runners and the command-line flags of one benchmark; the client processes and the server
subprocess are in ``load_clients`` and ``load_server``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from dprdm.ledger.factory import redact_url

from .load_clients import check_cell, format_table, run_cell, summarize
from .load_profile import NO_PY_SPY, Profiler, py_spy, stage_table
from .load_server import TOKEN_ENV, LocalServer

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
    "medians",
    "format_medians",
    "add_load_arguments",
    "load_command",
    "BenchError",
]



class BenchError(ValueError):
    """A bad benchmark flag or setting (the command line prints it as one line, exit status 2)."""


DOMAIN = "bench-load"
INDEX = "load"
PROFILE = "default"


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
    workers: tuple[int, ...] = (1,)
    repeats: int = 1
    stages: bool = False
    ledger_url: str | None = None

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


def server_document(
    settings: LoadSettings, index_path: Path, data_dir: Path, plan: BudgetPlan, workers: int = 1
) -> dict[str, Any]:
    """The server configuration (``parse_config`` form) of one local cell (``workers`` server
    processes); the token comes from ``$DPRDM_BENCH_TOKEN``."""
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
            "workers": workers,
        },
        "tokens": [{"tenant": "bench", "role": "tenant", "token_env": TOKEN_ENV}],
        "indexes": {INDEX: index},
        # RDP admission, as planned: with float noise a single-profile budget would default to PLD,
        # which admits more queries than the RDP plan's M
        "budgets": {DOMAIN: {"epsilon": plan.epsilon, "delta": plan.delta, "accountant": "rdp"}},
    }


def fresh_ledger_url(url: str, cell: str) -> str:
    """An empty ledger for one cell on the ``--ledger-url`` database: a new PostgreSQL schema
    (``load_<time>_<cell>``, left in place for inspection), its tables created by the server."""
    import psycopg

    schema = re.sub(r"[^a-z0-9_]", "_", f"load_{time.strftime('%Y%m%d%H%M%S')}_{cell}".lower())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"


def served_noise(doc: dict[str, Any], token: str) -> str:
    """The noise kind the server will use for the index of ``doc`` (``float`` on servers without
    the option)."""
    from dprdm.server.config import parse_config

    cfg = parse_config(doc, env={TOKEN_ENV: token})
    return str(getattr(cfg.indexes[0], "noise", "float"))


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
                              "settings": {**asdict(settings), "token": None,
                                           "ledger_url": settings.ledger_url and redact_url(settings.ledger_url)},
                              "machine": _machine()}  # fmt: skip
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
    result["medians"] = medians(cells)
    result["ok"] = all(c["checks"]["ok"] for c in cells)
    return result


def medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, clients, workers): the median granted/s, p50 latency and server CPU per request
    over the repeats, with every run's granted/s."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c["clients"], c.get("workers", 1)), []).append(c)

    def med(xs: list[Any]) -> float | None:
        vals = [float(x) for x in xs if x is not None]
        return float(np.median(vals)) if vals else None

    return [
        {"method": m, "clients": n, "workers": w, "runs": len(cs),
         "granted_per_s": med([c["granted_per_s"] for c in cs]),
         "granted_per_s_runs": [round(c["granted_per_s"], 1) for c in cs],
         "p50_ms": med([c["latency_ms"]["p50"] for c in cs]),
         "server_cpu_us_per_request": med([c["server_cpu_us_per_request"] for c in cs]),
         "ok": all(c["checks"]["ok"] for c in cs)}
        for (m, n, w), cs in groups.items()
    ]  # fmt: skip


def format_medians(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`medians`."""

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = ["| method | clients | workers | runs | median granted/s | runs granted/s | median p50 ms "
             "| median server CPU us/req | ok |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['method']} | {r['clients']} | {r['workers']} | {r['runs']} | {f(r['granted_per_s'], ',.0f')} "
                     f"| {', '.join(f'{x:,.0f}' for x in r['granted_per_s_runs'])} | {f(r['p50_ms'], '.1f')} "
                     f"| {f(r['server_cpu_us_per_request'], '.0f')} | {'yes' if r['ok'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


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
    runs = [(method, clients, rep, workers)
            for method in settings.methods for clients in settings.clients for rep in range(settings.repeats)
            for workers in (settings.workers if rep % 2 == 0 else settings.workers[::-1])]  # fmt: skip
    for method, clients, rep, workers in runs:
        name = f"{method}-{clients}-w{workers}-r{rep}"
        probe = server_document(settings, index_path, work / name / "data", BudgetPlan(1.0, 1e-9, 1, None, []))
        noise = served_noise(probe, token)
        hardened = settings.d if noise == "discrete" else None
        plan = plan_budget(profile, settings.admits(method), default_delta(settings.n), hardened)
        doc = server_document(settings, index_path, work / name / "data", plan, workers)
        if settings.ledger_url:
            doc["ledger"] = {"url": fresh_ledger_url(settings.ledger_url, name)}
        with LocalServer(doc, token, work / name) as srv:
            spy = Profiler(srv.pid, work / name / "py-spy.txt") if settings.stages else None
            cpu0 = srv.cpu_seconds()
            raw = run_cell(srv.address, token, method, clients, settings, pool)
            server_cpu = srv.cpu_seconds() - cpu0
            samples = spy.stop() if spy is not None else None
            info = _budget_info(srv.address, token, INDEX)
        cell = _cell(method, clients, raw, check_cell(raw, info, plan), noise, plan.epsilon, server_cpu)
        cells.append({**cell, "workers": workers, "repeat": rep})
        if spy is not None and samples is not None:
            cells[-1]["stages"] = stage_table(samples, rate=spy.rate, requests=cell["requests"],
                                              server_cpu_us=cell["server_cpu_us_per_request"])  # fmt: skip
        print(format_table([cells[-1]], header=not cells[:-1]), file=log, flush=True)
        if "stages" in cells[-1]:
            print(json.dumps(cells[-1]["stages"], indent=1), file=log, flush=True)
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
    a("--workers", type=_ints, default=d.workers, help="server processes per cell, e.g. 1,2 (dprdm serve --workers)")
    a("--repeats", type=int, default=d.repeats, help="runs of every cell (worker counts alternate: paired)")
    a("--stages", action="store_true", help="sample the server with py-spy: GIL ms per request by stage")
    a("--ledger-url", default=None, help="a PostgreSQL database for the ledgers (a fresh schema per cell); "
      "default: SQLite in the cell's data dir")  # fmt: skip
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
              "--overload-backoff": 0 <= args.overload_backoff <= 10, "--repeats": 1 <= args.repeats <= 100,
              "--workers": max(args.workers) <= 128}  # fmt: skip
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
    if args.stages and py_spy() is None:
        raise BenchError(NO_PY_SPY)
    if args.stages and args.address:
        raise BenchError("--stages samples the local benchmark server; it cannot be used with --address")
    if args.ledger_url and not args.ledger_url.startswith(("postgresql://", "postgres://")):
        raise BenchError(f"--ledger-url: expected postgresql://...; found {args.ledger_url!r}")
    if args.tmp is not None and not Path(args.tmp).is_dir():
        raise BenchError(f"--tmp: {args.tmp!r} is not an existing directory")
    return LoadSettings(
        n=args.n, d=args.d, k=args.k, q=args.q, sigma=args.sigma, lam=args.lam, methods=methods,
        clients=tuple(args.clients), queries=args.queries, generate_queries=args.generate_queries,
        steps=args.steps, max_requests=args.max_requests, max_seconds=args.max_seconds, timeout=args.timeout,
        overload_backoff=args.overload_backoff,
        client_procs=args.client_procs, noise=args.noise, group_commit=args.group_commit,
        query_threads=args.query_threads, generation_workers=args.generation_workers,
        generation_queue=args.generation_queue, index_path=args.index_path, address=args.address,
        token=args.token, index=args.index, profile=args.profile, tmp=args.tmp, seed=args.seed,
        workers=tuple(args.workers), repeats=args.repeats, stages=args.stages, ledger_url=args.ledger_url,
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
    if settings.repeats > 1 or len(settings.workers) > 1:
        print(format_medians(result["medians"]))
    for c in result["cells"]:
        for v in c["checks"]["violations"]:
            print(f"INVARIANT VIOLATED ({c['method']}, {c['clients']} clients): {v}", file=sys.stderr)
    print(f"wrote {path}")
    return 0 if result["ok"] else 1
