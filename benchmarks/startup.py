"""Server start-up time (issue 13 item 11): time from ``exec`` of ``dprdm serve`` to SERVING, and where it goes.

Builds (once, reused from ``--workdir``) a private flat index of ``--n`` random unit vectors for
the default bundle's encoder identity (``dprdm-mini``, d = 32), then:

* ``restarts``: runs ``dprdm serve --config`` ``--repeats`` times and times each until it prints
  ``listening on port`` (after the health service says SERVING), then stops it with SIGTERM. The
  first start has an empty data dir (no ledger, no caches: a cold start); later ones reuse it (a
  restart after ``kill -9``: the ledger and the caches are there).
* ``phases``: one start in a child process timing each step in order: imports, configuration,
  index load (checksums, pre-faulting), bundle load (the encoder; the generator loads after SERVING), ledger open,
  catalog (the discrete-noise RDP curves), service (noise pool fill), gRPC start.

Every start is bounded by ``--timeout`` seconds. Writes JSON (``--out``) and prints a table.
Run from the repo root: ``.venv/bin/python benchmarks/startup.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_index", "write_config", "time_start", "main"]

TOKEN = "startup-bench-token-0123456789"
DOMAIN = "bench-startup"


def build_index(workdir: Path, n: int, bundle: str = "dprdm-mini", seed: int = 0) -> Path:
    """The index ``workdir/index-<n>`` for ``bundle``'s encoder identity (built once, then reused)."""
    import numpy as np

    from dprdm.index import BuildConfig, build_from_vectors
    from dprdm.models.registry import shared_bundle

    out = workdir / f"index-{n}"
    if (out / "manifest.json").is_file():
        return out
    identity = shared_bundle(bundle).encoder.identity
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, identity.dimension), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = BuildConfig(output=out, corpus_id=DOMAIN, public_size=n, progress=False, existing="overwrite")
    build_from_vectors(x, identity, cfg)
    return out


def write_config(workdir: Path, index: Path, data_dir: Path, bundle: str = "dprdm-mini") -> Path:
    """A server configuration serving ``index`` with the README's example profile."""
    conf = workdir / "server.toml"
    conf.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{data_dir}"\n\n'
        f'[[tokens]]\ntenant = "bench"\ntoken = "{TOKEN}"\n\n'
        f'[indexes.photos]\npath = "{index}"\nbundle = "{bundle}"\n\n'
        "[indexes.photos.profiles.default]\nk = 16\nq = 0.2\nsigma = 0.43\nlambda = 1.0\n\n"
        f"[budgets.{DOMAIN}]\nepsilon = 10.0\n"
    )
    return conf


def time_start(conf: Path, timeout: float, log: Path) -> float:
    """Seconds from starting ``dprdm serve`` to its ``listening on port`` line (then SIGTERM).

    Raises:
        RuntimeError: no such line within ``timeout`` seconds, or the server exited.
    """
    entry = "import sys; from dprdm.cli.main import main; sys.exit(main())"  # what the `dprdm` script runs
    cmd = [sys.executable, "-c", entry, "serve", "--config", str(conf), "--log-level", "WARNING"]
    start = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    buf, took = b"", None
    try:
        while took is None and proc.poll() is None and time.perf_counter() - start < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                buf += os.read(proc.stdout.fileno(), 4096)
                if b"listening on port" in buf:
                    took = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    if took is None:
        raise RuntimeError(f"the server did not start within {timeout} s; log: {log.read_text(errors='replace')[-1500:]}")
    return took


def _phases(conf: str) -> None:
    """Child process: one start, step by step, printing one JSON object of step -> seconds."""
    t0 = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter() - t0 - sum(s for _, s in marks)))

    from dprdm.server import app
    from dprdm.server.adapters import load_bundle, load_index
    from dprdm.server.catalog import Loaders, build_catalog
    from dprdm.server.config import load_config
    from dprdm.server.service import DprdmService, ServiceOptions

    mark("import dprdm.server (grpc, numpy, scipy)")
    cfg = load_config(conf)
    mark("configuration")
    idx = load_index(cfg.indexes[0].path, checksum_cache=cfg.data_dir)
    mark("index load (checksums, pre-fault)")
    import torch  # noqa: F401

    mark("import torch")
    bundle = load_bundle(cfg.indexes[0].bundle, background=True)  # as `serve`: the generator loads later
    mark("bundle load (encoder; the generator loads in the background)")
    ledger = app.open_ledger(cfg)
    mark("ledger open")
    catalog = build_catalog(cfg, ledger, Loaders(index=lambda _p: idx, bundle=lambda _n: bundle))
    mark("catalog (RDP curves)")
    service = DprdmService(catalog, ledger, ServiceOptions(noise_pool_size=cfg.noise_pool_size, limits=cfg.limits))
    mark("service (noise pool fill)")
    service.close()
    running = asyncio.run(_grpc_start(cfg, ledger, idx, bundle))
    mark("gRPC server start (second catalog, pool, ports)")
    del running
    print(json.dumps(dict(marks)))


async def _grpc_start(cfg: Any, ledger: Any, idx: Any, bundle: Any) -> int:
    from dprdm.server.app import start_server
    from dprdm.server.catalog import Loaders

    running = await start_server(cfg, ledger=ledger, loaders=Loaders(index=lambda _p: idx, bundle=lambda _n: bundle))
    port = running.port
    await running.stop(grace=0.0)
    return port


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="index size (vectors)")
    ap.add_argument("--repeats", type=int, default=3, help="starts per run (the first is cold)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per start")
    ap.add_argument("--workdir", default="/tmp/dprdm-startup-bench", help="index and data dir (reused)")
    ap.add_argument("--out", default="benchmarks/results/startup.json")
    ap.add_argument("--phases-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phases_child:
        _phases(args.phases_child)
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    index = build_index(workdir, args.n)
    data_dir = workdir / "data"
    if data_dir.exists():
        import shutil

        shutil.rmtree(data_dir)
    conf = write_config(workdir, index, data_dir)
    starts = [time_start(conf, args.timeout, workdir / f"serve-{i}.log") for i in range(max(1, args.repeats))]
    child = subprocess.run(
        [sys.executable, __file__, "--phases-child", str(conf)],
        capture_output=True, text=True, timeout=args.timeout, check=True,
    )
    phases = json.loads(child.stdout.strip().splitlines()[-1])
    warm = sorted(starts[1:]) or starts
    result = {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "n": args.n,
        "bundle": "dprdm-mini",
        "cold_start_seconds": starts[0],
        "restart_seconds": starts[1:],
        "restart_median_seconds": warm[len(warm) // 2],
        "phases_seconds": phases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"start to SERVING, N = {args.n:,}, bundle dprdm-mini: cold {starts[0]:.2f} s, "
          f"restart median {result['restart_median_seconds']:.2f} s ({', '.join(f'{s:.2f}' for s in starts[1:])})")
    print("| step (one warm start, in order) | seconds |\n|---|---:|")
    for name, sec in phases.items():
        print(f"| {name} | {sec:.3f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
