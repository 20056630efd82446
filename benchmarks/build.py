"""Index build throughput (issue 15): the local and Ray engines, and where the time goes.

Generates ``--n`` synthetic JPEG photos once into ``--workdir`` (smooth gradients with shapes and
mild noise, ``--size`` pixels a side, quality 90: ~10-20 kB each, reused by later runs), then:

* ``local``: ``dprdm index build``'s local engine (one process) with the default encoder
  (``dprdm-mini`` on the CPU) at torch threads = 1 and 2 (the only width the local engine has);
* ``ray``: ``--engine ray`` on a local Ray started with ``num_cpus`` = 1 and 2 (Ray start-up timed
  apart; the build itself includes loading the encoder in the actors);
* each build is repeated on the first 1,000 photos: ``marginal images/s`` = the extra images over
  the extra seconds, so fixed costs (Ray: loading the encoder in a probe task and in each actor)
  cancel out, and ``fixed cost`` is what remains;
* ``stages``: one thread over the first ``--stage-items`` images, timing each stage of both
  engines apart: read (file bytes), hash (SHA-256), decode (PIL, to RGB), preprocess (the
  encoder's CPU half: resize to the tower's input), encode (fixed-size batches of 64), write
  (committing checkpoint shards).

Every ray index is compared with the local one (:func:`dprdm.index.compare.compare_indexes`):
the engines must agree byte for byte.  Writes JSON (``--out``) and prints a table.  The machine
is shared: the load average at the start is recorded.  Run from the repo root:
``.venv/bin/python benchmarks/build.py [--n 10000]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["make_photos", "run_local", "run_ray", "stage_split", "main"]

BATCH = 64
SHARD = 4096


def make_photos(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """``n`` distinct synthetic JPEG photos under ``root`` (written once; reused when complete)."""
    from PIL import Image, ImageDraw

    done = root / f".complete-{n}-{size}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
        arr = np.clip(c0 + (c1 - c0) * t + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = rng.integers(0, size, 2)
            w = rng.integers(size // 10, size // 3)
            draw.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + w)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(sub / f"img{i:07d}.jpg", quality=90)
    done.write_text("ok\n")
    return root


def _cfg(out: Path, n: int) -> Any:
    from dprdm.index import BuildConfig

    return BuildConfig(output=out, corpus_id="bench-build", public_size=n + n // 4 + 16, progress=False,
                       batch_size=BATCH, shard_size=SHARD, existing="overwrite")


def run_local(images: Path, out: Path, threads: int) -> dict[str, Any]:
    """One local-engine build at ``threads`` torch threads; wall time and images/s."""
    import torch

    from dprdm.index import build_index
    from dprdm.index.readers import FolderReader
    from dprdm.models.registry import load_encoder

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = load_encoder("dprdm-mini", device="cpu")
        reader = FolderReader(images)
        t0 = time.perf_counter()
        res = build_index(reader, encoder, _cfg(out, reader.total() or 0))
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    n = res.manifest["dedup"]["items_seen"]
    return {"engine": "local", "workers": threads, "items": n, "seconds": wall, "images_per_s": n / wall}


def run_ray(images: Path, out: Path, workers: int) -> dict[str, Any]:
    """One ray-engine build on a fresh local Ray of ``workers`` CPUs (start-up timed apart)."""
    import ray

    from dprdm.index.ray_build import build_index_ray, registry_encoder
    from dprdm.index.readers import FolderReader

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        reader = FolderReader(images)
        res = build_index_ray(reader, registry_encoder("dprdm-mini", "cpu"), _cfg(out, reader.total() or 0))
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    n = res.manifest["dedup"]["items_seen"]
    return {"engine": "ray", "workers": workers, "items": n, "seconds": wall, "images_per_s": n / wall,
            "ray_startup_s": startup}


def stage_split(images: Path, items: int, workdir: Path) -> dict[str, Any]:
    """Seconds per stage over the first ``items`` images on one thread (both engines' stages)."""
    import torch

    from dprdm.index.readers import FolderReader
    from dprdm.index.shards import Shard, decode_image, embed_fixed
    from dprdm.models.preprocess import split_encoder
    from dprdm.models.registry import load_encoder

    torch.set_num_threads(1)
    encoder = load_encoder("dprdm-mini", device="cpu")
    pre, encode = split_encoder(encoder)
    entries = FolderReader(images)._entries[:items]
    t = dict.fromkeys(("read", "hash", "decode", "preprocess", "encode", "write"), 0.0)
    pixels, digests, vectors = [], [], []
    for _key, path, _owner in entries:
        t0 = time.perf_counter()
        data = Path(path).read_bytes()
        t1 = time.perf_counter()
        digests.append(hashlib.sha256(data).hexdigest())
        t2 = time.perf_counter()
        image = decode_image(data)
        t3 = time.perf_counter()
        pixels.append(pre([image])[0])
        t4 = time.perf_counter()
        t["read"] += t1 - t0
        t["hash"] += t2 - t1
        t["decode"] += t3 - t2
        t["preprocess"] += t4 - t3
    t0 = time.perf_counter()
    for s in range(0, len(pixels), BATCH):
        vectors.append(embed_fixed(encode, pixels[s : s + BATCH], BATCH, encoder.dimension)[0])
    t["encode"] = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    for s in range(0, len(vectors), SHARD // BATCH):
        shard = Shard(s, 0)
        shard.vectors = vectors[s : s + SHARD // BATCH]
        n = sum(len(v) for v in shard.vectors)
        shard.keys, shard.digests, shard.owners = [e[0] for e in entries[:n]], digests[:n], [""] * n
        shard.commit(out, n, encoder.dimension, False)
    t["write"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    total = sum(t.values())
    return {"items": len(entries), "seconds": t, "us_per_image": {k: 1e6 * v / len(entries) for k, v in t.items()},
            "share": {k: v / total for k, v in t.items()}, "images_per_s_one_thread": len(entries) / total}


def _table(runs: list[dict[str, Any]], stages: dict[str, Any]) -> str:
    lines = ["| engine | workers | images | seconds | images/s | marginal images/s | fixed cost s | same bytes as local |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        extra = f" (+{r['ray_startup_s']:.1f} Ray start-up)" if "ray_startup_s" in r else ""
        same = {True: "yes", False: "NO"}.get(r.get("byte_identical_to_local"), "-")
        lines.append(f"| {r['engine']} | {r['workers']} | {r['items']} | {r['seconds']:.1f}{extra} | "
                     f"{r['images_per_s']:.0f} | {r['marginal_images_per_s']:.0f} | {r['fixed_cost_s']:.1f} | {same} |")
    lines += ["", f"Per-stage split, one thread, {stages['items']} images "
              f"({stages['images_per_s_one_thread']:.0f} images/s if nothing overlapped):", "",
              "| stage | us/image | share |", "|---|---:|---:|"]
    for k, us in stages["us_per_image"].items():
        lines.append(f"| {k} | {us:.0f} | {100 * stages['share'][k]:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="images (generated once)")
    p.add_argument("--size", type=int, default=256, help="side of the generated photos, pixels")
    p.add_argument("--workers", default="1,2", help="comma-separated widths")
    p.add_argument("--stage-items", type=int, default=2000)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dprdm-bench-build")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/build.json"))
    args = p.parse_args(argv)
    from dprdm.index.compare import compare_indexes

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = make_photos(args.workdir / f"photos-{args.size}", args.n, args.size)
    gen = time.perf_counter() - t0
    widths = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()[0]
    runs = []
    small = next(p for p in sorted(images.iterdir()) if p.is_dir())  # the first 1,000 photos
    for engine, run in (("local", run_local), ("ray", run_ray)):
        for w in widths:
            full = run(images, args.workdir / f"{engine}-{w}", w)
            part = run(small, args.workdir / f"{engine}-{w}-small", w)
            # fixed costs (Ray: the encoder loaded in a probe task and in the actor) cancel out
            full["marginal_images_per_s"] = (full["items"] - part["items"]) / max(full["seconds"] - part["seconds"], 1e-9)
            full["fixed_cost_s"] = part["seconds"] - part["items"] / full["marginal_images_per_s"]
            if engine == "ray":
                full["byte_identical_to_local"] = compare_indexes(args.workdir / f"ray-{w}",
                                                                  args.workdir / f"local-{widths[0]}") == []
            runs.append(full)
            print(json.dumps(full), file=sys.stderr, flush=True)
    stages = stage_split(images, min(args.stage_items, args.n), args.workdir)
    result = {"n": args.n, "size": args.size, "encoder": "dprdm-mini (cpu, fp32)", "batch_size": BATCH,
              "shard_size": SHARD, "generate_s": gen, "loadavg_at_start": load, "cpus": os.cpu_count(),
              "python": platform.python_version(), "runs": runs, "stages": stages}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(runs, stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
