"""Per-query admission cost of our accountant vs Opacus and dp-accounting (SPEC §10, issue 6).

For each history size H in {1, 1e3, 1e5} queries of 3 mixed profiles (round-robin), we time ONE
admission decision: add the next query's cost and decide whether the budget still holds.

* ours: ``Budget.admits(spent_curve, charge_curve)`` with the running curve kept (what the ledger
  does): O(#orders), independent of H. The charge curve of a profile is computed once per
  profile (``profile_rdp`` is cached), as the server does.
* Opacus ``RDPAccountant``: ``step()`` + ``get_epsilon(delta)``; its history list is recomputed
  on every call, so the cost grows with H (mixed profiles defeat its run-length merging).
* dp-accounting ``RdpAccountant``: ``compose(event)`` + ``get_epsilon(delta)``; it keeps a running
  curve but recomputes the event's RDP on every compose.

A library whose projected time for one measurement exceeds ``--max-seconds`` is not run at that H;
the row then reports the projection (linear in H, from the largest H measured) and says so.

Second table (issue 17): queries a single-profile budget admits by RDP vs by PLD
(``dprdm.privacy.pld``) at SPEC §4's reference profiles and the DP-RDM paper's settings, with the
time to compute each T_max (cold caches) and the PLD budget's receipts table. Discrete-noise rows
use the lattice pair of ``privacy.pld`` item 4 (``privacy.lattice_gdp``); the column "PLD z / (sigma
k/2)" is its multiplier relative to the float one (what the lattice costs).

Usage: ``python benchmarks/accountant.py [--out benchmarks/results] [--repeats 5] [--part admission|pld|all]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from dprdm.privacy import DEFAULT_ORDERS, Budget, Profile, max_queries, profile_rdp
from dprdm.privacy import pld as pld_mod

PROFILES = [
    Profile(k=16, q=0.01, sigma=0.2, lam=0.5),
    Profile(k=8, q=0.02, sigma=0.5, lam=0.7),
    Profile(k=32, q=0.005, sigma=0.1, lam=1.0),
]
HISTORY_SIZES = [1, 1_000, 100_000]
DELTA = 1e-6


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ours(history: int, repeats: int) -> float:
    budget = Budget.renyi_filter(1e6, DELTA, PROFILES)
    charges = [profile_rdp(p, DEFAULT_ORDERS) for p in PROFILES]
    spent = np.zeros(len(DEFAULT_ORDERS))
    for i, c in enumerate(charges):
        spent += c * len(range(i, history, len(PROFILES)))
    nxt = charges[history % len(PROFILES)]
    reps = max(repeats, 200)
    return _median_ms(lambda: budget.admits(spent, nxt), reps)


def bench_opacus(history: int, repeats: int) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for i in range(history):
        p = PROFILES[i % len(PROFILES)]
        acc.history.append((p.noise_multiplier, p.q, 1))
    nxt = PROFILES[history % len(PROFILES)]

    def admit() -> None:
        acc.step(noise_multiplier=nxt.noise_multiplier, sample_rate=nxt.q)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.get_epsilon(DELTA)
        acc.history.pop()

    return _median_ms(admit, repeats)


def bench_dp_accounting(history: int, repeats: int) -> float:
    import dp_accounting
    from dp_accounting import rdp

    events = [dp_accounting.PoissonSampledDpEvent(p.q, dp_accounting.GaussianDpEvent(p.noise_multiplier)) for p in PROFILES]
    acc = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS))
    for i, e in enumerate(events):
        n = len(range(i, history, len(PROFILES)))
        if n:
            acc.compose(e, n)
    nxt = events[history % len(PROFILES)]

    def admit() -> None:
        acc.compose(nxt)
        acc.get_epsilon(DELTA)

    return _median_ms(admit, repeats)


# How the cost of one admission grows with the history, used only to plan repeats and to
# project runs longer than --max-seconds: Opacus recomputes its whole history.
GROWS_WITH_HISTORY = {"dprdm": False, "opacus": True, "dp_accounting": False}


def run(repeats: int, max_seconds: float) -> dict[str, object]:
    libs = {"dprdm": bench_ours, "opacus": bench_opacus, "dp_accounting": bench_dp_accounting}
    rows = []
    last: dict[str, tuple[int, float]] = {}
    for h in HISTORY_SIZES:
        row: dict[str, object] = {"history": h}
        for name, fn in libs.items():
            reps = repeats
            if name in last:
                h0, ms0 = last[name]
                estimate_s = ms0 * (h / h0 if GROWS_WITH_HISTORY[name] else 1.0) / 1e3
                if estimate_s > max_seconds:
                    row[name + "_ms"] = estimate_s * 1e3
                    row[name + "_projected"] = True
                    continue
                reps = max(1, min(repeats, int(max_seconds // max(estimate_s, 1e-9))))
            ms = fn(h, reps)
            last[name] = (h, ms)
            row[name + "_ms"] = ms
            row[name + "_projected"] = False
        rows.append(row)
    for row in rows:
        for name in ("opacus", "dp_accounting"):
            row[f"speedup_vs_{name}"] = float(row[name + "_ms"]) / float(row["dprdm_ms"])  # type: ignore[arg-type]
    return {
        "benchmark": "accountant",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "profiles": [p.to_dict() for p in PROFILES],
        "delta": DELTA,
        "orders": len(DEFAULT_ORDERS),
        "repeats": repeats,
        "rows": rows,
    }


# (name, profile, delta, epsilon, noise dimension or None, source)
PLD_SETTINGS: list[tuple[str, Profile, float, float, int | None, str]] = [
    ("SPEC §4 ref. 2", Profile(k=23, q=0.01, sigma=0.05, lam=1.0), 2e-5, 9.44, None, "RDP epsilon of 1000 queries"),
    ("SPEC §4 ref. 2, discrete d=512", Profile(k=23, q=0.01, sigma=0.05, lam=1.0), 2e-5, 9.44, 512, "private-index default"),
    ("SPEC §4 ref. 2, discrete d=1280", Profile(k=23, q=0.01, sigma=0.05, lam=1.0), 2e-5, 9.44, 1280,
     "private-index default, ViT-bigG width"),
    ("SPEC §4 ref. 1 / DP-RDM notebook", Profile(k=18, q=0.01, sigma=0.2, lam=1.0), 1e-7, 1.00, None,
     "privacy_analysis.ipynb: 1000 queries, N = 1e7"),
    ("SPEC §4 ref. 1, discrete d=768", Profile(k=18, q=0.01, sigma=0.2, lam=1.0), 1e-7, 1.00, 768,
     "private-index default, ViT-L width"),
    ("SPEC §4 ref. 3 (q = 1)", Profile(k=20, q=1.0, sigma=0.05, lam=1.0), 1 / 82800, 10.65, None,
     "one query (10.64 rounded up)"),
    ("DP-RDM paper budget", Profile(k=18, q=0.01, sigma=0.2, lam=1.0), 1e-7, 10.0, None,
     "epsilon 10 (MS-COCO headline) with the notebook's profile"),
    ("DP-RDM paper budget, discrete d=768", Profile(k=18, q=0.01, sigma=0.2, lam=1.0), 1e-7, 10.0, 768,
     "private-index default"),
    ("Opacus test", Profile(k=2, q=0.04, sigma=1.5, lam=1.0), 1e-5, 7.3291, None, "multiplier 1.5, 2250 steps"),
]


def _cold_pld_caches() -> None:
    for fn in (pld_mod._base, pld_mod._epsilon, pld_mod._delta, pld_mod._max_queries, pld_mod._plan):
        fn.cache_clear()


def run_pld() -> dict[str, object]:
    """Queries admitted by RDP vs PLD at each of :data:`PLD_SETTINGS`, and the time to compute them."""
    rows = []
    for name, profile, delta, eps, dim, source in PLD_SETTINGS:
        t0 = time.perf_counter()
        rdp = max_queries(epsilon=eps, delta=delta, profile=profile, hardened_dimension=dim)
        row: dict[str, object] = {"setting": name, "source": source, "profile": profile.to_dict(), "delta": delta,
                                  "epsilon": eps, "noise": "float" if dim is None else f"discrete d={dim}",
                                  "rdp_max_queries": rdp, "rdp_seconds": time.perf_counter() - t0}
        pair = pld_mod.pld_dominating_pair(profile, dim)
        if pair is None:
            row.update(pld_max_queries=None, pld_seconds=None, plan_seconds=None, gain=None,
                       pld_note=pld_mod.pld_refusal(hardened_dimension=dim, profile=profile))
        else:
            _cold_pld_caches()
            t0 = time.perf_counter()
            pld = pld_mod.max_queries_pld(epsilon=eps, delta=delta, profile=profile, hardened_dimension=dim)
            t1 = time.perf_counter()
            plan = pld_mod.pld_plan(epsilon=eps, delta=delta, profile=profile, hardened_dimension=dim)
            t2 = time.perf_counter()
            row.update(pld_max_queries=pld, pld_seconds=t1 - t0, plan_seconds=t2 - t1, table_points=len(plan.table),
                       gain=(pld / rdp - 1.0) if rdp else None, pld_multiplier=pair.noise_multiplier,
                       multiplier_ratio=pair.noise_multiplier / profile.noise_multiplier)
        rows.append(row)
        print(f"  {name}: RDP {row['rdp_max_queries']}, PLD {row['pld_max_queries']}", flush=True)
    return {"benchmark": "accountant-pld", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "dp_accounting": pld_mod.dp_accounting_version(), "discretisation": pld_mod.DISCRETISATION,
            "table_discretisation": pld_mod.TABLE_DISCRETISATION, "rows": rows}


def pld_table(result: dict[str, object]) -> str:
    """Markdown table of :func:`run_pld`."""
    lines = [
        "| setting | k | q | sigma | delta | epsilon | noise | PLD z / (sigma k/2) | RDP queries | PLD queries | gain | RDP s | PLD T_max s | + table s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:  # type: ignore[attr-defined]
        p = r["profile"]
        pld = "n/a" if r["pld_max_queries"] is None else f"{r['pld_max_queries']:,}"
        ratio = "" if r.get("multiplier_ratio") is None else f"{r['multiplier_ratio']:.6f}"
        gain = "" if r["gain"] is None else f"{100 * r['gain']:+.0f} %"
        secs = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['setting']} | {p['k']} | {p['q']:g} | {p['sigma']:g} | {r['delta']:.3g} | {r['epsilon']:g} | "
            f"{r['noise']} | {ratio} | {r['rdp_max_queries']:,} | {pld} | {gain} | {r['rdp_seconds']:.2f} | "
            f"{secs(r['pld_seconds'])} | {secs(r['plan_seconds'])} |"
        )
    return "\n".join(lines)


def table(result: dict[str, object]) -> str:
    lines = [
        "| history | dprdm (ms) | opacus (ms) | dp-accounting (ms) | x opacus | x dp-accounting |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:  # type: ignore[attr-defined]
        star = lambda n: "*" if r[n + "_projected"] else ""  # noqa: E731
        lines.append(
            f"| {r['history']:,} | {r['dprdm_ms']:.4f} | {r['opacus_ms']:.1f}{star('opacus')} | "
            f"{r['dp_accounting_ms']:.2f}{star('dp_accounting')} | {r['speedup_vs_opacus']:,.0f} | "
            f"{r['speedup_vs_dp_accounting']:,.0f} |"
        )
    lines.append("(* projected linearly from the largest history measured; see --max-seconds)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="skip (and project) longer runs")
    parser.add_argument("--part", choices=("admission", "pld", "all"), default="all",
                        help="admission cost (first table), RDP vs PLD queries (second), or both")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("admission", "all"):
        result = run(args.repeats, args.max_seconds)
        path = args.out / "accountant.json"
        path.write_text(json.dumps(result, indent=2))
        print(table(result))
        print(f"wrote {path}")
    if args.part in ("pld", "all"):
        result = run_pld()
        path = args.out / "accountant-pld.json"
        path.write_text(json.dumps(result, indent=2))
        print(pld_table(result))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
