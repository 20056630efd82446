"""PostgreSQL ledger benchmark (part of ``benchmarks/ledger.py``): single-domain reservations per
second with 1, 4, 16 and 64 writers spread over 3 OS processes, against raw PostgreSQL single-row
transactions on the same server in the same run (paired: each writer count runs the raw
baselines right before the ledger).

Three workloads per writer count, each writer a thread with its own work loop:

* ``raw-insert``: ``BEGIN; INSERT one row (a 2 KB payload, like a spend); COMMIT`` on the writer's
  own connection: what independent durable transactions cost (PostgreSQL flushes concurrent
  commits together);
* ``raw-hot-row``: ``BEGIN; UPDATE the same row; COMMIT``: one hot row, as one privacy domain's
  row lock makes it: every transaction waits for the previous one's commit;
* ``ledger``: ``PostgresLedger.reserve`` on one domain (group commit, one ledger per process, a
  budget never exhausted): row lock, idempotency check, admission, spend insert, running-curve
  update, durable commit.

Run it through ``benchmarks/ledger.py --postgres auto|URL`` (with the SQLite runs, one JSON), or
alone: ``python benchmarks/ledger_pg.py [--postgres URL] [--seconds 3]`` (``--postgres auto``,
``--skip-sqlite`` of ``ledger.py``). With a URL, each run makes a fresh schema
``dprdm_bench_<pid>_<n>`` in that database and leaves it there for inspection.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time
from typing import Any

import numpy as np

from dprdm.privacy import Budget, Profile

__all__ = ["pg_runs", "splits", "print_pg_table", "main", "WRITERS"]

PROFILE = Profile(k=18, q=0.01, sigma=0.2, lam=0.5)
WRITERS = (1, 4, 16, 64)
PAYLOAD = "x" * 2048


def splits(writers: int, processes: int = 3) -> list[int]:
    """``writers`` threads over at most ``processes`` processes, as evenly as possible (no empty one)."""
    return [n for n in (writers // processes + (i < writers % processes) for i in range(processes)) if n]


def _worker(kind: str, url: str, threads: int, seconds: float, barrier: Any, out: Any) -> None:
    """One process of a run: ``threads`` writers of ``kind`` for ``seconds`` after the barrier."""
    import psycopg

    from dprdm.ledger import open_ledger

    led, conns = None, []
    if kind in ("ledger", "ledger-batch-first"):
        if kind == "ledger-batch-first":  # the baseline: issue 14's order, batch taken BEFORE the writer lock
            from dprdm.ledger.sqlite import SqliteWriter
            from dprdm.ledger.writer import Writer

            SqliteWriter._before_batch = Writer._before_batch  # type: ignore[method-assign]
        led = open_ledger(url)
        charge, profile = Budget.single(1e9, 1e-7, PROFILE).charge(PROFILE), PROFILE.to_dict()
    else:
        conns = [psycopg.connect(url) for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    stop = threading.Event()
    tag = mp.current_process().name

    def work(t: int) -> None:
        lat, i = latencies[t], 0
        while not stop.is_set():
            t0 = time.perf_counter()
            if led is not None:
                led.reserve(domain="bench", tenant=f"{tag}-{t}", request_id=str(i), binding_hash="b",
                            profile=profile, charge_rdp=charge)  # fmt: skip
            elif kind == "raw-insert":
                conns[t].execute("INSERT INTO raw (key, payload) VALUES (%s, %s)", (f"{tag}-{t}-{i}", PAYLOAD))
                conns[t].commit()
            else:
                conns[t].execute("UPDATE hot SET n = n + 1, payload = %s WHERE id = 1", (PAYLOAD,))
                conns[t].commit()
            lat.append(time.perf_counter() - t0)
            i += 1

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    barrier.wait()
    for th in pool:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in pool:
        th.join()
    stats = led.stats() if led is not None else {}
    if led is not None:
        led.close()
    for conn in conns:
        conn.close()
    out.put({"latencies": [x for lat in latencies for x in lat], "stats": stats})


def run_across_processes(ctx: Any, kind: str, url: str, writers: int, seconds: float) -> dict[str, Any]:
    """``writers`` writer threads spread over processes (:func:`splits`) for ``seconds``, on the
    ledger at ``url`` (``kind`` "ledger") or a raw baseline: rate, latency percentiles and stats."""
    parts = splits(writers)
    barrier, out = ctx.Barrier(len(parts) + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, url, n, seconds, barrier, out), name=f"p{i}")
             for i, n in enumerate(parts)]  # fmt: skip
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    lat_ms = np.asarray([x for r in results for x in r["latencies"]]) * 1e3
    tx = sum(r["stats"].get("transactions", 0) for r in results)
    ops = sum(r["stats"].get("operations", 0) for r in results)
    return {
        "kind": kind,
        "writers": writers,
        "processes": len(parts),
        "per_s": lat_ms.size / seconds,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "ops_per_transaction": ops / tx if tx else 1.0,
        "retries": sum(r["stats"].get("retries", 0) for r in results),
    }


def pg_runs(new_url: Any, *, seconds: float, writers: tuple[int, ...] = WRITERS) -> list[dict[str, Any]]:
    """Every workload at every writer count, paired per writer count (raw first, then the ledger).

    Args:
        new_url: returns the URL of a fresh, empty schema (one per run).
        seconds: measurement time per run.
        writers: total writer threads per run (spread over 3 processes).

    Returns:
        One dict per run: kind, writers, processes, per_s, p50_ms, p99_ms, ops_per_transaction, retries.
    """
    import psycopg

    from dprdm.ledger import open_ledger

    ctx = mp.get_context("spawn")
    out = []
    for n in writers:
        raw_url, ledger_url = new_url(), new_url()
        with psycopg.connect(raw_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE raw (id BIGSERIAL PRIMARY KEY, key TEXT UNIQUE, payload TEXT)")
            conn.execute("CREATE TABLE hot (id INT PRIMARY KEY, n BIGINT, payload TEXT)")
            conn.execute("INSERT INTO hot VALUES (1, 0, '')")
        with open_ledger(ledger_url) as led:
            led.create_budget("bench", Budget.single(1e9, 1e-7, PROFILE))  # never exhausted: the write path
        for kind in ("raw-insert", "raw-hot-row", "ledger"):
            out.append(run_across_processes(ctx, kind, ledger_url if kind == "ledger" else raw_url, n, seconds))
        with open_ledger(ledger_url) as led:
            led.verify()
    return out


def print_pg_table(runs: list[dict[str, Any]]) -> None:
    """The PostgreSQL runs as a table (the ledger's rate also over each raw baseline of its pair)."""
    print(f"{'postgres':<12}{'writers':>8}{'procs':>6}{'tx or res/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'ops/tx':>8}{'vs insert':>10}{'vs hot row':>11}")  # fmt: skip
    by = {(r["kind"], r["writers"]): r for r in runs}
    for r in runs:
        vs_insert = r["per_s"] / by[("raw-insert", r["writers"])]["per_s"]
        vs_hot = r["per_s"] / by[("raw-hot-row", r["writers"])]["per_s"]
        print(f"{r['kind']:<12}{r['writers']:>8}{r['processes']:>6}{r['per_s']:>13,.0f}{r['p50_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['ops_per_transaction']:>8.1f}{vs_insert:>9.2f}x{vs_hot:>10.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``benchmarks/ledger.py --postgres auto --skip-sqlite`` with ``argv`` appended (a later
    ``--postgres URL`` wins); returns the result dict written to disk."""
    from dprdm.benchmarks.ledger import main as ledger_main

    result: dict[str, Any] = ledger_main(["--postgres", "auto", "--skip-sqlite", *(sys.argv[1:] if argv is None else argv)])
    return result


if __name__ == "__main__":
    main()
