"""Ledger benchmark (SPEC §10): durable reservations per second and latency, 1 to 64 writer threads.

Measures, in one run on one local-disk temp directory:

* a raw-SQLite baseline (WAL, ``synchronous=FULL``): single-row transactions per second, and rows
  per second at 32 rows per transaction;
* ``SqliteLedger.reserve`` (admission + durable reservation, committed before returning) with 1, 4,
  16 and 64 concurrent writer threads, with and without group commit: reservations per second,
  p50/p99 latency of one call, mean operations per transaction;
* the CPU cost of one admission decision (``Budget.admits`` vs the ledger's precomputed rule);
* with ``--across-processes``: the same group-commit ledger with 1, 4, 16 and 64 writers spread
  over 3 OS processes (one ``SqliteLedger`` per process on one file; the runner of
  :mod:`dprdm.benchmarks.ledger_pg`), i.e. the issue-14 target "at 64 writers across processes";
* with ``--postgres``: the PostgreSQL ledger's single-domain reservations per second at 1, 4, 16
  and 64 writers over 3 processes, paired with raw PostgreSQL single-row transactions on the same
  server (:mod:`dprdm.benchmarks.ledger_pg`); ``auto`` starts a throw-away server
  (:class:`dprdm.ledger.testing.PgServer`), a URL uses an existing database (a fresh schema per run).

Writes ``ledger-<timestamp>.json`` to ``--out`` and prints a table. Ratios are within one run.

Usage::

    python benchmarks/ledger.py [--out benchmarks/results/] [--seconds 3] [--threads 1,4,16,64]
                                [--postgres auto|off|postgresql://...] [--skip-sqlite]
                                [--across-processes]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.ledger import SqliteLedger
from dprdm.ledger.state import Rule
from dprdm.privacy import Budget, Profile

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
TARGETS = {"p99_ms": 2.0, "group_rps_at_64": 20_000.0, "single_tx_vs_raw_max_ratio": 2.0}


def raw_sqlite(directory: Path, seconds: float, name: str = "raw") -> dict[str, float]:
    """Single-row durable transactions per second (and their latency), rows per second at 32 rows
    per transaction: the floor every durable ledger write pays (one fsync per commit).

    Args:
        directory: where to create the database file.
        seconds: time spent on each of the two measurements.
        name: database file stem.

    Returns:
        ``single_tx_per_s``, ``single_tx_p50_ms``, ``single_tx_p99_ms``, ``rows_per_s_at_32``.
    """
    conn = sqlite3.connect(directory / f"{name}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, key TEXT UNIQUE, payload TEXT)")
    payload = json.dumps([0.001 * i for i in range(101)])  # like a charge curve
    out: dict[str, float] = {}
    for key, rows in (("single_tx_per_s", 1), ("rows_per_s_at_32", 32)):
        n, start, lat = 0, time.perf_counter(), []
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO t (key, payload) VALUES (?, ?)", [(f"{key}{n + i}", payload) for i in range(rows)])
            conn.execute("COMMIT")
            lat.append(time.perf_counter() - t0)
            n += rows
        out[key] = n / (time.perf_counter() - start)
        if rows == 1:
            out["single_tx_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
            out["single_tx_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    conn.close()
    return out


def ledger_run(directory: Path, *, threads: int, group_commit: bool, seconds: float) -> dict[str, Any]:
    """Hammer a fresh ledger with ``threads`` writers for ``seconds``.

    Args:
        directory: where to create the database file.
        threads: concurrent writer threads, each calling ``reserve`` in a loop.
        group_commit: the ledger's mode.
        seconds: measurement time.

    Returns:
        Throughput, latency percentiles (ms), operations per transaction and the counts.
    """
    path = Path(tempfile.mkstemp(suffix=".db", prefix=f"ledger-{threads}-{int(group_commit)}-", dir=directory)[1])
    path.unlink()  # a fresh ledger file per run
    led = SqliteLedger(path, group_commit=group_commit)
    budget = Budget.single(1e9, 1e-7, PROFILE)  # never exhausted: we measure the write path
    led.create_budget("bench", budget)
    charge, profile = budget.charge(PROFILE), PROFILE.to_dict()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(t: int) -> None:
        lat = latencies[t]
        barrier.wait()
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            led.reserve(domain="bench", tenant=f"t{t}", request_id=str(i), binding_hash="b", profile=profile,
                        charge_rdp=charge)  # fmt: skip
            lat.append(time.perf_counter() - t0)
            i += 1

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    before = led.stats()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - start
    after = led.stats()
    led.verify()
    led.close()
    lat_ms = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    tx = after["transactions"] - before["transactions"]
    ops = after["operations"] - before["operations"]
    return {
        "threads": threads,
        "group_commit": group_commit,
        "reservations": int(lat_ms.size),
        "reservations_per_s": lat_ms.size / elapsed,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "ops_per_transaction": ops / tx if tx else 0.0,
    }


def sqlite_across_processes(directory: Path, *, writers: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    """The group-commit SQLite ledger with writer threads spread over 3 OS processes (issue 14).

    Each process opens its own ``SqliteLedger`` (group commit) on one fresh file per writer count;
    their committers serialise on the file's writer lock and ``BEGIN IMMEDIATE``.

    Args:
        directory: where to create the database files.
        writers: total writer threads per run.
        seconds: measurement time per run.

    Returns:
        One dict per writer count: writers, processes, per_s, p50_ms, p99_ms, ops_per_transaction,
        and the paired baseline run (``batch_first``: issue 14's order, the batch taken off the
        queue BEFORE the writer lock) with ``over_batch_first`` = per_s / its per_s.
    """
    import multiprocessing as mp

    from dprdm.benchmarks.ledger_pg import run_across_processes

    ctx = mp.get_context("spawn")

    def one(path: Path, kind: str, n: int) -> dict[str, Any]:
        with SqliteLedger(path) as led:
            led.create_budget("bench", Budget.single(1e9, 1e-7, PROFILE))  # never exhausted: the write path
        run = run_across_processes(ctx, kind, str(path), n, seconds)
        with SqliteLedger(path) as led:
            led.verify()
        return {k: v for k, v in run.items() if k != "kind"}

    out = []
    for n in writers:
        path = Path(tempfile.mkstemp(suffix=".db", prefix=f"ledger-across-{n}-", dir=directory)[1])
        path.unlink()  # a fresh ledger file per run
        row = one(path, "ledger", n)
        row["batch_first"] = one(path.with_name(path.stem + "-batch-first.db"), "ledger-batch-first", n)
        row["over_batch_first"] = row["per_s"] / row["batch_first"]["per_s"]
        out.append(row)
    return out


def paired_single_tx(directory: Path, rounds: int, seconds: float) -> dict[str, float]:
    """Ledger vs raw SQLite, one writer, alternating short rounds (the shared disk's speed drifts
    within seconds, so only a paired comparison is meaningful).

    Args:
        directory: where to create the database files.
        rounds: number of (raw, ledger) pairs.
        seconds: time per measurement.

    Returns:
        Medians of the raw rate, the ledger rate (``group_commit=False``) and their per-round ratio.
    """
    raws, leds = [], []
    for r in range(rounds):
        raws.append(raw_sqlite(directory, seconds, f"paired-raw-{r}")["single_tx_per_s"])
        leds.append(ledger_run(directory, threads=1, group_commit=False, seconds=seconds)["reservations_per_s"])
    ratios = [led / raw for led, raw in zip(leds, raws, strict=True)]
    return {
        "rounds": rounds,
        "raw_single_tx_per_s": float(np.median(raws)),
        "ledger_single_tx_per_s": float(np.median(leds)),
        "ledger_over_raw": float(np.median(ratios)),
    }


def admission_cost(repeats: int = 2000) -> dict[str, float]:
    """Microseconds per admission decision: ``Budget.admits`` and the ledger's ``Rule.admits``."""
    budget = Budget.single(1.0, 1e-7, PROFILE)
    rule = Rule(budget)
    charge = budget.charge(PROFILE)
    spent = charge * 100
    out = {}
    for name, fn in (("budget_admits_us", budget.admits), ("ledger_rule_admits_us", rule.admits)):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(spent, charge)
        out[name] = (time.perf_counter() - start) / repeats * 1e6
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON result, print the table.

    Args:
        argv: command line (default ``sys.argv[1:]``).

    Returns:
        The result dict written to disk.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per configuration")
    parser.add_argument("--threads", default="1,4,16,64", help="comma-separated writer thread counts")
    parser.add_argument("--tmp", type=Path, default=None, help="local-disk directory for the databases")
    parser.add_argument("--postgres", default="off",
                        help="auto (a throw-away local server), off, or a postgresql:// URL of an existing database")
    parser.add_argument("--skip-sqlite", action="store_true", help="only the PostgreSQL runs")
    parser.add_argument("--across-processes", action="store_true",
                        help="also run the group-commit SQLite ledger with the writers spread over 3 processes")
    args = parser.parse_args(argv)
    thread_counts = [int(x) for x in args.threads.split(",")]
    directory = Path(tempfile.mkdtemp(prefix="dprdm-ledger-bench-", dir=args.tmp))
    raw_before = raw_after = paired = {}
    runs: list[dict[str, Any]] = []
    across: list[dict[str, Any]] = []
    try:
        if not args.skip_sqlite:
            raw_before = raw_sqlite(directory, args.seconds, "raw-before")
            runs = [
                ledger_run(directory, threads=n, group_commit=group, seconds=args.seconds)
                for group in (False, True)
                for n in thread_counts
            ]
            raw_after = raw_sqlite(directory, args.seconds, "raw-after")  # the disk is shared: bracket the runs
            paired = paired_single_tx(directory, rounds=5, seconds=min(1.0, args.seconds))
            if args.across_processes:
                across = sqlite_across_processes(directory, writers=tuple(thread_counts), seconds=args.seconds)
        postgres = _postgres(args.postgres, args.seconds, tuple(thread_counts))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result = {
        "benchmark": "ledger",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version, "load_avg": os.getloadavg()},
        "seconds_per_config": args.seconds,
        "raw_sqlite": {k: (raw_before[k] + raw_after[k]) / 2 for k in raw_before},
        "postgres": postgres,
        "raw_sqlite_before": raw_before,
        "raw_sqlite_after": raw_after,
        "paired_single_writer": paired,
        "admission": admission_cost(),
        "ledger": runs,
        "ledger_across_processes": across,
        "targets": TARGETS,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {out_file}")
    return result


def _postgres(where: str, seconds: float, writers: tuple[int, ...]) -> dict[str, Any] | None:
    """The PostgreSQL runs (``where``: auto, off or a URL), or None when off."""
    if where == "off":
        return None
    from dprdm.benchmarks.ledger_pg import pg_runs

    server = None
    if where == "auto":
        from dprdm.ledger.testing import PgServer

        server = PgServer()
        new_url = server.new_url
    else:
        import itertools
        import os
        from urllib.parse import quote

        import psycopg

        counter = itertools.count()

        def new_url() -> str:
            schema = f"dprdm_bench_{os.getpid()}_{next(counter)}"
            with psycopg.connect(where, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            return where + ("&" if "?" in where else "?") + "options=" + quote(f"-csearch_path={schema}")

    try:
        import psycopg

        with psycopg.connect(new_url()) as conn:
            names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "commit_delay")
            settings = {k: str((conn.execute(f"SHOW {k}").fetchone() or ("?",))[0]) for k in names}
            version = settings.pop("server_version")
        runs = pg_runs(new_url, seconds=seconds, writers=writers)
    finally:
        if server is not None:
            server.close()
    return {"server": "throw-away local cluster" if server else "given URL", "version": version,
            "settings": settings, "runs": runs}  # fmt: skip


def _print_table(result: dict[str, Any]) -> None:
    if result.get("postgres"):
        from dprdm.benchmarks.ledger_pg import print_pg_table

        pg = result["postgres"]
        print(f"PostgreSQL {pg['version']} ({pg['server']}; {pg['settings']}), 3 processes:")
        print_pg_table(pg["runs"])
    if not result["ledger"]:
        return
    raw, adm, pair = result["raw_sqlite"], result["admission"], result["paired_single_writer"]
    print(f"raw SQLite (WAL, synchronous=FULL, mean of before/after): {raw['single_tx_per_s']:,.0f} single-row tx/s "
          f"(p50 {raw['single_tx_p50_ms']:.2f} ms, p99 {raw['single_tx_p99_ms']:.2f} ms); "
          f"{raw['rows_per_s_at_32']:,.0f} rows/s at 32 rows/tx")  # fmt: skip
    print(f"paired, 1 writer, {pair['rounds']} alternating rounds: raw {pair['raw_single_tx_per_s']:,.0f} tx/s, "
          f"ledger {pair['ledger_single_tx_per_s']:,.0f} res/s, median ratio {pair['ledger_over_raw']:.2f}")  # fmt: skip
    print(f"admission decision: Budget.admits {adm['budget_admits_us']:.1f} us, "
          f"ledger rule {adm['ledger_rule_admits_us']:.1f} us")  # fmt: skip
    print(f"{'mode':<8}{'threads':>8}{'res/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ops/tx':>8}{'vs raw 1-row tx':>17}")
    for r in result["ledger"]:
        ratio = r["reservations_per_s"] / raw["single_tx_per_s"]
        mode = "group" if r["group_commit"] else "single"
        print(f"{mode:<8}{r['threads']:>8}{r['reservations_per_s']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['ops_per_transaction']:>8.1f}{ratio:>16.2f}x")  # fmt: skip
    for r in result.get("ledger_across_processes", []):
        ratio = r["per_s"] / raw["single_tx_per_s"]
        mode = f"group/{r['processes']}p"
        b = r["batch_first"]
        print(f"{mode:<8}{r['writers']:>8}{r['per_s']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['ops_per_transaction']:>8.1f}{ratio:>16.2f}x   (batch taken before the lock: "
              f"{b['per_s']:,.0f} res/s, {b['ops_per_transaction']:.1f} ops/tx; x{r['over_batch_first']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
