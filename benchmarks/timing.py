"""Timing benchmark (issue 12 item 2, SPEC §3 "Timing is a release"): per-query time of the flat
subsampled k-NN at a small private size N = N̄/200 vs N = N̄, same public size N̄, measured in the
same run, interleaved.

Two flat indexes share N̄, d, dtype, k and q; they differ only in the private count N.  Query i of
both indexes uses the same query vector and the same coins (a generator seeded with i), so the
sampled slots are identical and any time difference comes from the private data alone (e.g. dummy
reads folded into a cache-resident prefix when N << N̄).  The order of the two calls alternates
randomly per pair; the first pairs are warm-up.  Reported: medians, the median of the per-pair
ratios small/full, and a bootstrap 95 % interval of the ratio of medians.

Where the page cache puts each index's pages (hence the build order) moves a ratio by a few per
cent either way on its own, so by default the measurement is made twice, with the two indexes
built in either order, and the headline is the geometric mean of the two ratios.

    OMP_NUM_THREADS=1 python benchmarks/timing.py                      # N̄ 100k, d 512 (~1 min)
    OMP_NUM_THREADS=1 python benchmarks/timing.py --public-size 400000 --pairs 600

Results: JSON in ``benchmarks/results/timing.json`` (or ``--out``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.benchmarks.retrieval import unit_rows
from dprdm.index import BuildConfig, build_from_vectors, load
from dprdm.models.fake import FakeEncoder


def _build(workdir: Path, n: int, public_size: int, d: int, dtype: str) -> Any:
    out = workdir / f"flat-{n}-of-{public_size}-{d}-{dtype}"
    cfg = BuildConfig(output=out, corpus_id="timing", public_size=public_size, dtype=dtype, progress=False,
                      existing="overwrite")
    build_from_vectors(unit_rows(n, d, seed=n % 9973), FakeEncoder(d).identity, cfg)
    return load(out, verify_checksums=False, prefault=True)


def measure(small: Any, full: Any, *, pairs: int, k: int, q: float, warmup: int = 5,
            seed: int = 0) -> dict[str, Any]:
    """Interleaved paired timings; returns medians, ratios and a bootstrap interval."""
    d = full.dimension
    queries = unit_rows(pairs + warmup, d, seed=10_000 + seed).astype(np.float64)
    order_rng = np.random.default_rng(seed)
    t_small, t_full = [], []
    for i in range(pairs + warmup):
        times = {}
        for name in (("small", "full") if order_rng.random() < 0.5 else ("full", "small")):
            idx = small if name == "small" else full
            rng = np.random.default_rng(1_000_000 + i)  # same coins for both indexes
            t0 = time.perf_counter()
            idx.search_subsampled(queries[i], k=k, q=q, rng=rng)
            times[name] = time.perf_counter() - t0
        if i >= warmup:
            t_small.append(times["small"])
            t_full.append(times["full"])
    a, b = np.array(t_small) * 1e3, np.array(t_full) * 1e3
    boot = np.random.default_rng(seed + 1)
    picks = boot.integers(0, a.size, size=(2000, a.size))
    ratios = np.median(a[picks], axis=1) / np.median(b[picks], axis=1)
    return {
        "pairs": int(a.size),
        "small_median_ms": float(np.median(a)), "full_median_ms": float(np.median(b)),
        "small_p90_ms": float(np.percentile(a, 90)), "full_p90_ms": float(np.percentile(b, 90)),
        "ratio_of_medians": float(np.median(a) / np.median(b)),
        "median_pair_ratio": float(np.median(a / b)),
        "ratio_ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--public-size", type=int, default=100_000, help="N̄ (the full index has N = N̄)")
    p.add_argument("--small-fraction", type=float, default=1 / 200, help="small N = N̄ * fraction")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--q", type=float, default=0.02)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--build-order", default="both", choices=["both", "small", "full"],
                   help="which index is built first (both: one round each)")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'before', 'after')")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "timing.json")
    args = p.parse_args(argv)

    nbar = args.public_size
    n_small = max(1, int(round(nbar * args.small_fraction)))
    rounds = []
    for order in (("small", "full") if args.build_order == "both" else (args.build_order,)):
        workdir = Path(tempfile.mkdtemp(prefix="dprdm-timing-"))
        try:
            t0 = time.perf_counter()
            built = {}
            for name in (("small", "full") if order == "small" else ("full", "small")):
                built[name] = _build(workdir, n_small if name == "small" else nbar, nbar, args.d, args.dtype)
            print(f"built ({order} first) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            res = measure(built["small"], built["full"], pairs=args.pairs, k=args.k, q=args.q)
            res["built_first"] = order
            res["stored_rows"] = {name: int(idx.vectors.shape[0]) for name, idx in built.items()}
            rounds.append(res)
            del built
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    headline = float(np.exp(np.mean([np.log(r["ratio_of_medians"]) for r in rounds])))
    doc = {
        "benchmark": "timing", "date": _dt.date.today().isoformat(), "label": args.label,
        "machine": platform.platform(), "python": platform.python_version(),
        "public_size": nbar, "n_small": n_small, "n_full": nbar, "d": args.d, "dtype": args.dtype,
        "q": args.q, "k": args.k, "ratio_geomean": headline, "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| N̄ | N small | d | q | built first | small med (ms) | full med (ms) | ratio of medians | 95% CI "
          "| median pair ratio |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---|---:|")
    for r in rounds:
        print(f"| {nbar} | {n_small} | {args.d} | {args.q:g} | {r['built_first']} | {r['small_median_ms']:.3f} "
              f"| {r['full_median_ms']:.3f} | {r['ratio_of_medians']:.3f} "
              f"| [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {r['median_pair_ratio']:.3f} |")
    print(f"\nratio small/full (geometric mean over build orders): {headline:.3f}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
