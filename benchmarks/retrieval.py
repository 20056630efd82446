"""Retrieval benchmark: our exact subsampled k-NN vs the naive method, same vectors and queries.

Naive = the DP-RDM authors' approach: draw N Bernoulli(q) coins per query, then search with a
faiss ``IDSelectorBatch`` of the survivors (flat: ``IndexFlatIP`` / fp16 ``IndexScalarQuantizer``;
ivf: ``IndexIVFFlat`` with the same public centroids and lists).  This baseline is what is timed,
so it lives here; the tests' reference of the same law (numpy coins and a full sort, for the
distributional checks) is ``tests/oracles.py``.  Ours = ``search_subsampled`` on the stored,
memory-mapped index (geometric-gap survivors over the padded candidate set, gather, exact
scores, strict top-k).

Also reported: the memory floor (the survivors' bytes over the gather bandwidth measured in the
same run: ``np.take`` of as many fresh random rows into a preallocated buffer), ratios, and the
peak Python/numpy allocation per query (``tracemalloc``; faiss's C++ allocations are not seen)
plus the process max RSS.  Both methods run single-threaded.

    python benchmarks/retrieval.py                       # full sweep (N up to 1e7: hours, ~12 GB disk)
    python benchmarks/retrieval.py --n 1e4 1e5 1e6 --kinds flat --queries 40

Results: JSON in ``benchmarks/results/retrieval.json`` (or ``--out``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.index import BuildConfig, build_from_vectors, load
from dprdm.models.fake import FakeEncoder


def unit_rows(n: int, d: int, seed: int, out: np.ndarray | None = None, block: int = 200_000) -> np.ndarray:
    out = np.empty((n, d), np.float32) if out is None else out
    rng = np.random.default_rng(seed)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + x.shape[0]] = x
    return out


def _make_rng(kind: str, seed: int) -> np.random.Generator:
    if kind == "chacha":
        from randomgen import ChaCha

        return np.random.Generator(ChaCha(seed=seed, rounds=20))
    return np.random.default_rng(seed)


def _stats(times: list[float]) -> dict[str, float]:
    a = np.array(times) * 1e3
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": len(times)}


def _peak_bytes(fn: Any, reps: int = 3) -> int:
    tracemalloc.start()
    peak = 0
    for _ in range(reps):
        tracemalloc.reset_peak()
        fn()
        peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    return peak


def _faiss_flat(vectors: np.ndarray) -> Any:
    import faiss

    d = vectors.shape[1]
    if vectors.dtype == np.float16:
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(d)
    for s in range(0, vectors.shape[0], 262_144):
        index.add(np.ascontiguousarray(vectors[s : s + 262_144], dtype=np.float32))
    return index


_KEEP_ALIVE: list[Any] = []


def _faiss_ivf(idx: Any) -> Any:
    """IndexIVFFlat with exactly our public centroids and our list contents (ids = storage rows)."""
    import faiss

    lay = idx.layout
    d = idx.dimension
    quant = faiss.IndexFlatIP(d)
    quant.add(lay.centroids.astype(np.float32))
    ivf = faiss.IndexIVFFlat(quant, d, lay.centroids.shape[0], faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True
    for li in range(lay.centroids.shape[0]):
        a = int(lay.starts[li])
        b = a + int(np.count_nonzero(idx.ids[a : a + int(lay.capacities[li])] >= 0))  # real prefix of the list
        if b > a:
            codes = np.ascontiguousarray(idx.vectors[a:b], dtype=np.float32).view(np.uint8)
            rows = np.arange(a, b, dtype=np.int64)
            ivf.invlists.add_entries(li, b - a, faiss.swig_ptr(rows), faiss.swig_ptr(codes))
    ivf.ntotal = int(idx.count)
    _KEEP_ALIVE.append(quant)  # the IVF index does not own its quantizer
    return ivf


def _naive_query(index: Any, n: int, u: np.ndarray, k: int, q: float, rng: np.random.Generator,
                 nprobe: int | None) -> None:
    import faiss

    keep = np.flatnonzero(rng.random(n) < q).astype(np.int64)
    sel = faiss.IDSelectorBatch(keep.size, faiss.swig_ptr(keep))
    params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe) if nprobe else faiss.SearchParameters(sel=sel)
    index.search(u.reshape(1, -1).astype(np.float32), k, params=params)


def _gather_floor(vectors: np.ndarray, m: int, reps: int, rng: np.random.Generator) -> dict[str, float]:
    """Time to gather ``m`` fresh random rows (sorted) into a preallocated buffer."""
    if m == 0:
        return {"median_ms": 0.0, "gbps": float("nan")}
    buf = np.empty((m, vectors.shape[1]), vectors.dtype)
    times = []
    for _ in range(reps):
        rows = np.sort(rng.choice(vectors.shape[0], size=m, replace=False))
        t0 = time.perf_counter()
        np.take(vectors, rows, axis=0, out=buf, mode="clip")
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"median_ms": med * 1e3, "gbps": m * buf.itemsize * buf.shape[1] / med / 1e9}


def bench_one(idx: Any, naive_index: Any, kind: str, queries: np.ndarray, k: int, q: float, rng_kind: str,
              nprobe: int | None) -> dict[str, Any]:
    n = idx.vectors.shape[0] if kind == "ivf" else idx.count  # naive coins: one per faiss id (ivf: storage row)
    ours_rng, naive_rng, floor_rng = _make_rng(rng_kind, 1), _make_rng(rng_kind, 2), np.random.default_rng(3)
    ours_t, naive_t, survivors = [], [], []
    for i, u in enumerate(queries):
        t0 = time.perf_counter()
        idx.search_subsampled(u, k=k, q=q, rng=ours_rng, nprobe=nprobe)
        t1 = time.perf_counter()
        if i >= 2:  # warm-up
            ours_t.append(t1 - t0)
        survivors.append(idx.layout.candidates(u, nprobe).length * q)
    for i, u in enumerate(queries):
        t0 = time.perf_counter()
        _naive_query(naive_index, n, u, k, q, naive_rng, nprobe if kind == "ivf" else None)
        t1 = time.perf_counter()
        if i >= 2:
            naive_t.append(t1 - t0)
    m = int(round(float(np.mean(survivors))))
    floor = _gather_floor(idx.vectors, min(m, n), reps=max(5, len(queries) // 2), rng=floor_rng)
    ours, naive = _stats(ours_t), _stats(naive_t)
    u0 = queries[0]
    return {
        "kind": kind, "N": idx.count, "public_size": idx.public_size, "d": idx.dimension, "dtype": str(idx.vectors.dtype),
        "q": q, "k": k, "nprobe": nprobe, "expected_survivors": m,
        "ours": ours, "naive": naive, "floor": floor,
        "speedup_median": naive["median_ms"] / ours["median_ms"],
        "ours_over_floor": ours["median_ms"] / floor["median_ms"] if floor["median_ms"] > 0 else float("nan"),
        "peak_bytes_ours": _peak_bytes(lambda: idx.search_subsampled(u0, k=k, q=q, rng=ours_rng, nprobe=nprobe)),
        "peak_bytes_naive": _peak_bytes(lambda: _naive_query(naive_index, n, u0, k, q, naive_rng,
                                                             nprobe if kind == "ivf" else None)),
    }


def _build(workdir: Path, kind: str, n: int, d: int, dtype: str, nlist: int, nprobe: int, seed: int) -> Any:
    enc = FakeEncoder(d)
    out = workdir / f"{kind}-{n}-{dtype}"
    if (out / "manifest.json").exists():
        return load(out, verify_checksums=False, prefault=True)
    vec_path = workdir / f"vectors-{n}-{dtype}.npy"
    if not vec_path.exists():
        mm = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
        unit_rows(n, d, seed, out=mm)
        mm.flush()
        del mm
    vectors = np.load(vec_path, mmap_mode="r")
    cfg: dict[str, Any] = {"output": out, "corpus_id": "bench", "public_size": n, "dtype": dtype,
                           "progress": False, "existing": "overwrite"}
    if kind == "ivf":
        train = workdir / f"public-{d}.npy"
        if not train.exists():
            np.save(train, unit_rows(max(40 * nlist, 20_000), d, seed + 1))
        cfg.update(index_type="ivf", nlist=nlist, nprobe=nprobe, train_vectors=train)
    build_from_vectors(vectors, enc.identity, BuildConfig(**cfg))
    return load(out, verify_checksums=False, prefault=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    p.add_argument("--q", nargs="+", type=float, default=[0.1, 0.01, 0.001])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf"])
    p.add_argument("--queries", type=int, default=50, help="queries per configuration (first 2 are warm-up)")
    p.add_argument("--dtype", default="auto", help="float32, float16, or auto (float16 above 2e6 vectors)")
    p.add_argument("--nlist", type=int, default=0, help="ivf lists (default: min(1024, sqrt(N) / 4))")
    p.add_argument("--nprobe-frac", type=float, default=1 / 16, help="ivf nprobe = max(1, nlist * frac)")
    p.add_argument("--rng", default="pcg64", choices=["pcg64", "chacha"], help="coin generator for both methods")
    p.add_argument("--workdir", type=Path, default=None, help="where to store indexes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retrieval.json")
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dprdm-retrieval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in (int(x) for x in args.n):
            dtype = args.dtype if args.dtype != "auto" else ("float16" if n > 2_000_000 else "float32")
            queries = unit_rows(args.queries, args.d, seed=777).astype(np.float64)
            for kind in args.kinds:
                nlist = args.nlist or int(min(1024, max(4, round(n**0.5 / 4))))
                nprobe = max(1, int(nlist * args.nprobe_frac))
                t0 = time.perf_counter()
                idx = _build(workdir, kind, n, args.d, dtype, nlist, nprobe, seed=n % 1000)
                naive_index = _faiss_ivf(idx) if kind == "ivf" else _faiss_flat(idx.vectors[: idx.count])
                print(f"[{kind} N={n} {dtype}] ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                for q in args.q:
                    r = bench_one(idx, naive_index, kind, queries, args.k, q, args.rng,
                                  nprobe if kind == "ivf" else None)
                    results.append(r)
                    print(_row(r), file=sys.stderr)
                del naive_index, idx
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "benchmark": "retrieval", "machine": platform.platform(), "python": platform.python_version(),
        "rng": args.rng, "threads": 1, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(_table(results))
    print(f"\nJSON: {args.out}")
    return 0


_HEAD = ("| kind | N | dtype | q | survivors | ours med (ms) | ours p95 | naive med (ms) | naive p95 | speedup "
         "| floor (ms) | ours/floor | peak ours (MB) | peak naive (MB) |")


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['kind']} | {r['N']:.0e} | {r['dtype']} | {r['q']:g} | {r['expected_survivors']} "
            f"| {r['ours']['median_ms']:.3f} | {r['ours']['p95_ms']:.3f} | {r['naive']['median_ms']:.2f} "
            f"| {r['naive']['p95_ms']:.2f} | {r['speedup_median']:.1f}x | {r['floor']['median_ms']:.3f} "
            f"| {r['ours_over_floor']:.2f} | {r['peak_bytes_ours'] / 2**20:.1f} | {r['peak_bytes_naive'] / 2**20:.1f} |")


def _table(results: list[dict[str, Any]]) -> str:
    return "\n".join([_HEAD, "|" + "---|" * 14, *(_row(r) for r in results)])


if __name__ == "__main__":
    raise SystemExit(main())
