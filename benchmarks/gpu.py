"""GPU checks and timings of the private search (issue 16 item 9): one script, under 5 minutes.

On a machine with a CUDA GPU (``--device cuda``, the default) it checks the device path and
times it, writing JSON:

1. **equality**: the device search (:class:`dprdm.index.device.DeviceSearch`) returns the same
   ids, scores and padded rows, bit for bit, as the host search on fixed coins, over real built
   indexes (flat and IVF, float16 and float32 storage, N̄ > N so filler rows are sampled);
2. **pipelines**: the tiny from-config Kandinsky 2.2 and Stable unCLIP pipelines
   (:mod:`dprdm.models.testing`) generate in bf16 on the device, and concurrent generations
   (4 threads, unequal step counts) equal the same calls run alone, bit for bit;
3. **timing**: host (numpy) vs device search at N = 1e6 and 1e7, d 768, float16 rows, the same
   queries and coins, calls interleaved; medians, the speed-up, and equality of every timed
   result.  Each size is first checked against the free host and GPU memory and skipped with a
   line when it does not fit.

Without a GPU it prints one line and exits 0.  ``--device cpu`` is a dry run of the same code on
torch's CPU device at small N (CI runs it: ``tests/test_bench_gpu.py``); its timing row compares
the device backend on torch's CPU with the numpy backend.

    python benchmarks/gpu.py                                   # GPU machine: everything, JSON
    python benchmarks/gpu.py --device cpu --n 1e5 --parts timing   # torch-CPU vs numpy at N = 1e5

Results: ``benchmarks/results/gpu.json`` (``gpu-cpu.json`` for ``--device cpu``; or ``--out``).
Exit status 1 when a check fails (a difference between the paths is a bug, not noise).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.benchmarks.retrieval import unit_rows
from dprdm.index import BuildConfig, build_from_vectors, load
from dprdm.index.device import DeviceSearch
from dprdm.index.layouts import FlatLayout
from dprdm.index.search import subsampled_topk
from dprdm.models.fake import FakeEncoder

RESULTS = Path(__file__).parent / "results"
PARTS = ("equality", "pipelines", "timing")
STEPS = (2, 5, 3, 4)  # unequal step counts: shared scheduler state would interleave


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a dry run on torch's CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--n", type=float, nargs="+", default=None,
                   help="timing sizes N (default 1e6 1e7 on cuda, 2e4 on cpu)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=18)
    p.add_argument("--q", type=float, default=0.01)
    p.add_argument("--queries", type=int, default=20, help="timed queries per size (after 3 warm-up queries)")
    p.add_argument("--eq-n", type=int, default=4000, help="records of each equality index")
    p.add_argument("--eq-d", type=int, default=None, help="dimension of the equality indexes (default --d)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    a.parts = tuple(x for x in a.parts.split(",") if x)
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown part {bad[0]!r}; expected {', '.join(PARTS)}")
    cpu = a.device == "cpu"
    a.n = [int(x) for x in (a.n or ([2e4] if cpu else [1e6, 1e7]))]
    a.out = a.out or RESULTS / ("gpu-cpu.json" if cpu else "gpu.json")
    return a


def _no_gpu_reason(device: str) -> str | None:
    if device == "cpu":
        return None if importlib.util.find_spec("torch") else "torch is not installed (pip install 'dprdm[models]')"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed, so no CUDA device can be used (pip install 'dprdm[models]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    return None


# -- 1. equality on fixed coins -------------------------------------------------------------


def _built(work: Path, kind: str, dtype: str, n: int, d: int) -> Any:
    """A real index of ``n`` random records (N̄ = 1.25 N), flat or IVF (public quantizer of 16 lists)."""
    out = work / f"{kind}-{dtype}"
    extra: dict[str, Any] = {}
    if kind == "ivf":
        train = work / "public.npy"
        np.save(train, unit_rows(2000, d, seed=7))
        extra = {"index_type": "ivf", "train_vectors": train, "nlist": 16, "nprobe": 4, "min_capacity": 8}
    cfg = BuildConfig(output=out, corpus_id="gpu-bench", public_size=n + n // 4, dtype=dtype, progress=False,
                      existing="overwrite", **extra)
    build_from_vectors(unit_rows(n, d, seed=3), FakeEncoder(d).identity, cfg)
    return load(out, verify_checksums=False)


def _same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.ids, b.ids) and a.scores.tobytes() == b.scores.tobytes()
                and a.padded.tobytes() == b.padded.tobytes())


def check_equality(device: Any, *, n: int, d: int, k: int, queries: int = 20) -> dict[str, Any]:
    """Host vs device search on fixed coins over real indexes; the number of differing results."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dprdm-gpu-") as tmp:
        for kind in ("flat", "ivf"):
            for dtype in ("float16", "float32"):
                idx = _built(Path(tmp), kind, dtype, n, d)
                dev = DeviceSearch(idx.vectors, idx.ids, idx.layout, device)
                us = unit_rows(queries, d, seed=11).astype(np.float64)
                us[::4] = np.asarray(idx.vectors[: len(us[::4])], dtype=np.float64)  # stored rows: exact hits
                differ = 0
                for i, u in enumerate(us):
                    for q in (0.05, 1.0):
                        host = subsampled_topk(idx.vectors, idx.ids, idx.layout, u, k=k, q=q,
                                               rng=np.random.default_rng(i))
                        differ += not _same(dev.search_subsampled(u, k=k, q=q, rng=np.random.default_rng(i)), host)
                out[f"{kind}-{dtype}"] = {"searches": 2 * len(us), "differ": differ, "ok": differ == 0}
                del dev, idx
    return out


# -- 2. tiny pipelines in bf16, concurrent generation ---------------------------------------


def _generators(device: Any, tmp: Path) -> dict[str, Any]:
    from dprdm.models import testing
    from dprdm.models.pipelines import KandinskyGenerator, UnCLIPGenerator

    return {
        "kandinsky": KandinskyGenerator.from_pipeline(testing.tiny_kandinsky_pipeline(dim=24), size=32,
                                                      device=device, dtype="bfloat16"),
        "unclip": UnCLIPGenerator.from_pipeline(testing.tiny_unclip_pipeline(tmp, dim=32), guidance_scale=2.0,
                                                size=32, device=device, dtype="bfloat16"),
    }


def _concurrent(gen: Any, conds: list[np.ndarray]) -> list[np.ndarray]:
    """The generations of ``conds`` started together on one thread each (a barrier lines them up)."""
    out: list[np.ndarray | None] = [None] * len(conds)
    barrier = threading.Barrier(len(conds))

    def one(i: int) -> None:
        barrier.wait()
        out[i] = np.asarray(gen.generate(conds[i], "a red circle", 1, STEPS[i], 100 + i)[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(conds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for x in out if x is not None]


def check_pipelines(device: Any) -> dict[str, Any]:
    """Each tiny pipeline generates in bf16 on ``device``; 4 concurrent calls equal the calls alone."""
    import torch

    from dprdm.models._torch import bf16_supported_on_cpu

    if device.type == "cpu" and not bf16_supported_on_cpu():
        return {"skipped": "this torch has no bf16 CPU kernels"}
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dprdm-gpu-") as tmp:
        for name, gen in _generators(device, Path(tmp)).items():
            rng = np.random.default_rng(0)
            conds = [rng.standard_normal(gen.conditioning_dimension).astype(np.float32) for _ in STEPS]
            t0 = time.perf_counter()
            alone = [np.asarray(gen.generate(c, "a red circle", 1, s, 100 + i)[0])
                     for i, (c, s) in enumerate(zip(conds, STEPS, strict=True))]
            seconds = time.perf_counter() - t0
            together = _concurrent(gen, conds)
            images_ok = all(im.ndim == 3 and im.shape[2] == 3 and float(im.std()) > 0 for im in alone)
            equal = [bool(np.array_equal(a, b)) for a, b in zip(alone, together, strict=True)]
            out[name] = {"dtype": str(gen.dtype).removeprefix("torch."), "image_shape": list(alone[0].shape),
                         "images_ok": images_ok, "concurrent_equal": equal, "alone_seconds": round(seconds, 3),
                         "ok": images_ok and all(equal) and gen.dtype == torch.bfloat16}
    return out


# -- 3. timing at scale ------------------------------------------------------------------------


def _host_free_bytes() -> int:
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _rows(n: int, d: int, device: Any) -> np.ndarray:
    """``n`` random unit rows in float16 (on the 2**-24 grid): made on the GPU in blocks when there is one."""
    if device.type != "cuda":
        return unit_rows(n, d, seed=5).astype(np.float16)
    import torch

    out = np.empty((n, d), np.float16)
    gen = torch.Generator(device=device).manual_seed(5)
    step = max(1, (1 << 28) // (4 * d))  # 256 MiB of float32 per block
    for s in range(0, n, step):
        x = torch.randn((min(step, n - s), d), generator=gen, device=device)
        out[s : s + x.shape[0]] = torch.nn.functional.normalize(x, dim=1).half().cpu().numpy()
    return out


def _fits(n: int, d: int, device: Any) -> str | None:
    need_host = int(1.1 * n * d * 2 + 16 * n)
    if need_host > _host_free_bytes():
        return f"needs {need_host / 2**30:.1f} GiB of host memory, {_host_free_bytes() / 2**30:.1f} GiB free"
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        need = int(n * d * 2 + 56 * n + (1 << 28))
        if need > free:
            return f"needs {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free"
    return None


def time_search(device: Any, *, n: int, d: int, k: int, q: float, queries: int, warmup: int = 3) -> dict[str, Any]:
    """Host vs device search on the same ``n`` float16 rows, queries and coins; calls interleaved."""
    row: dict[str, Any] = {"N": n, "d": d, "k": k, "q": q, "dtype": "float16"}
    why = _fits(n, d, device)
    if why is not None:
        print(f"timing N = {n:.0e}: skipped: {why}", file=sys.stderr)
        return {**row, "skipped": why}
    t0 = time.perf_counter()
    x = _rows(n, d, device)
    ids = np.arange(n, dtype=np.int64)
    layout = FlatLayout(public_size=n)
    dev = DeviceSearch(x, ids, layout, device)
    row["setup_seconds"] = round(time.perf_counter() - t0, 2)
    us = unit_rows(queries + warmup, d, seed=17).astype(np.float64)
    order = np.random.default_rng(0)
    times: dict[str, list[float]] = {"host": [], "device": []}
    differ = 0
    for i, u in enumerate(us):
        got = {}
        for name in (("host", "device") if order.random() < 0.5 else ("device", "host")):
            rng = np.random.default_rng(1000 + i)  # the same coins for both
            start = time.perf_counter()
            if name == "host":
                got[name] = subsampled_topk(x, ids, layout, u, k=k, q=q, rng=rng)
            else:
                got[name] = dev.search_subsampled(u, k=k, q=q, rng=rng)  # returns host arrays: synchronised
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        differ += not _same(got["host"], got["device"])
    host_ms, dev_ms = (statistics.median(times[s]) * 1e3 for s in ("host", "device"))
    return {**row, "queries": queries, "host_median_ms": round(host_ms, 3), "device_median_ms": round(dev_ms, 3),
            "speedup": round(host_ms / dev_ms, 2), "differ": differ, "ok": differ == 0}


# -- driver ------------------------------------------------------------------------------------


def _machine(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _all_ok(doc: dict[str, Any]) -> bool:
    checks = [*doc.get("equality", {}).values(), *doc.get("pipelines", {}).values(), *doc.get("timing", [])]
    return all(c.get("ok", True) for c in checks if isinstance(c, dict))


def _print(doc: dict[str, Any]) -> None:
    for case, r in doc.get("equality", {}).items():
        print(f"equality {case}: {r['searches'] - r['differ']}/{r['searches']} identical")
    for name, r in doc.get("pipelines", {}).items():
        print(f"pipeline {name}: {r}" if not isinstance(r, dict) or "ok" not in r else
              f"pipeline {name}: {r['dtype']} images_ok={r['images_ok']} concurrent_equal={r['concurrent_equal']}")
    if doc.get("timing"):
        print("| N | d | q | k | host median (ms) | device median (ms) | speed-up | identical |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in doc.get("timing", []):
        if "skipped" in r:
            print(f"| {r['N']:.0e} | {r['d']} | {r['q']:g} | {r['k']} | skipped: {r['skipped']} | | | |")
        else:
            print(f"| {r['N']:.0e} | {r['d']} | {r['q']:g} | {r['k']} | {r['host_median_ms']:.2f} "
                  f"| {r['device_median_ms']:.2f} | {r['speedup']:.2f} | {r['queries'] + 3 - r['differ']}"
                  f"/{r['queries'] + 3} |")


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    why = _no_gpu_reason(a.device)
    if why is not None:
        print(f"benchmarks/gpu.py: {why}; nothing to check (--device cpu runs a dry run on torch's CPU)")
        return 0
    import torch

    device = torch.device(a.device)
    started = time.perf_counter()
    doc: dict[str, Any] = {"benchmark": "gpu", "date": _dt.date.today().isoformat(), "machine": _machine(device),
                           "parts": list(a.parts)}
    if "equality" in a.parts:
        doc["equality"] = check_equality(device, n=a.eq_n, d=a.eq_d or a.d, k=a.k)
    if "pipelines" in a.parts:
        doc["pipelines"] = check_pipelines(device)
    if "timing" in a.parts:
        doc["timing"] = [time_search(device, n=n, d=a.d, k=a.k, q=a.q, queries=a.queries) for n in a.n]
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["ok"] = _all_ok(doc)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    _print(doc)
    print(f"{'all checks passed' if doc['ok'] else 'A CHECK FAILED'} in {doc['seconds']} s; JSON: {a.out}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
