"""Cost per release of the floating-point-safe (discrete Gaussian) noise vs the float path (issue 8).

Float path: ``dprdm.privacy.release`` (ChaCha20 generator + numpy normal). Hardened path: one
exact lattice noise vector from OpenDP (what the background ``NoisePool`` pre-generates), and the
request-path cost of ``release_hardened`` given a ready vector. Same run, same dimension.

Usage: ``python benchmarks/noise.py [--out benchmarks/results] [--repeats 50]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from dprdm.privacy import Profile, new_dp_generator, release
from dprdm.privacy.discrete import DEFAULT_LATTICE_EXPONENT, OpenDPSampler, release_hardened

DIMENSIONS = [64, 512, 1024]
PROFILE = Profile(k=16, q=0.01, sigma=0.05, lam=0.5)


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run(repeats: int) -> dict[str, object]:
    sampler = OpenDPSampler()
    rows = []
    for d in DIMENSIONS:
        rng = np.random.default_rng(0)
        u = rng.normal(size=d)
        u /= np.linalg.norm(u)
        x = rng.normal(size=(16, d)) / np.sqrt(d)
        noise = sampler.sample(PROFILE.sigma, d, DEFAULT_LATTICE_EXPONENT)
        float_us = _median_us(lambda: release(PROFILE, query=u, selected=x, rng=new_dp_generator()), repeats)
        sample_us = _median_us(lambda: sampler.sample(PROFILE.sigma, d, DEFAULT_LATTICE_EXPONENT), repeats)
        hardened_us = _median_us(lambda: release_hardened(PROFILE, query=u, selected=x, noise=noise), repeats)
        rows.append({
            "dimension": d,
            "float_release_us": float_us,
            "discrete_noise_sample_us": sample_us,
            "hardened_release_request_path_us": hardened_us,
            "noise_sample_over_float": sample_us / float_us,
            "pool_throughput_per_core_per_s": 1e6 / sample_us,
        })
    return {"benchmark": "noise", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "profile": PROFILE.to_dict(), "lattice_exponent": DEFAULT_LATTICE_EXPONENT, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    result = run(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise.json").write_text(json.dumps(result, indent=2))
    print("| d | float release (us) | discrete noise sample (us) | hardened request path (us) | sample/float | pool vectors/s/core |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:  # type: ignore[attr-defined]
        print(f"| {r['dimension']} | {r['float_release_us']:.0f} | {r['discrete_noise_sample_us']:.0f} | "
              f"{r['hardened_release_request_path_us']:.0f} | {r['noise_sample_over_float']:.0f} | "
              f"{r['pool_throughput_per_core_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
