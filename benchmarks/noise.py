"""Cost per release of the floating-point-safe (discrete Gaussian) noise vs the float path (issue 8),
and the vectorised exact sampler vs OpenDP (issue 12 item 11).

Float path: ``dprdm.privacy.release`` (ChaCha20 generator + numpy normal). Hardened path: one
exact lattice noise vector from OpenDP, and from ``FastExactSampler`` (ChaCha20 keyed from
``os.urandom``, what the server's background ``NoisePool`` uses: one vector, and per vector in the
pool's batches of 64), and the request-path cost of ``release_hardened`` given a ready vector.
Same run, same dimension, one core (run with OMP_NUM_THREADS=1); the samplers are timed
alternately (one OpenDP vector, one fast vector, one fast batch per round) so load drift hits
them alike; ratio = fast batched vectors/s over OpenDP's vectors/s (medians; also the median of
the per-round ratios). Target >= 20x at d = 512.

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
from dprdm.privacy.fast_discrete import FastExactSampler

POOL_BATCH = 64

DIMENSIONS = [64, 512, 1024]
PROFILE = Profile(k=16, q=0.01, sigma=0.05, lam=0.5)


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _paired(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Times (us) of ``fns`` called alternately, ``repeats`` rounds: load drifts hit all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e6)
    return times


def run(repeats: int) -> dict[str, object]:
    sampler = OpenDPSampler()
    fast = FastExactSampler(new_dp_generator())
    k = DEFAULT_LATTICE_EXPONENT
    rows = []
    for d in DIMENSIONS:
        rng = np.random.default_rng(0)
        u = rng.normal(size=d)
        u /= np.linalg.norm(u)
        x = rng.normal(size=(16, d)) / np.sqrt(d)
        noise = sampler.sample(PROFILE.sigma, d, DEFAULT_LATTICE_EXPONENT)
        float_us = _median_us(lambda: release(PROFILE, query=u, selected=x, rng=new_dp_generator()), repeats)
        hardened_us = _median_us(lambda: release_hardened(PROFILE, query=u, selected=x, noise=noise), repeats)
        opendp, single, batch = _paired(
            [
                lambda: sampler.sample(PROFILE.sigma, d, k),
                lambda: fast.sample(PROFILE.sigma, d, k),
                lambda: fast.sample_batch(PROFILE.sigma, d, POOL_BATCH, k),
            ],
            repeats,
        )
        sample_us, fast_us = statistics.median(opendp), statistics.median(single)
        fast_batch_us = statistics.median(batch) / POOL_BATCH
        paired_ratio = statistics.median(o / (b / POOL_BATCH) for o, b in zip(opendp, batch))
        rows.append({
            "dimension": d,
            "float_release_us": float_us,
            "discrete_noise_sample_us": sample_us,
            "hardened_release_request_path_us": hardened_us,
            "noise_sample_over_float": sample_us / float_us,
            "pool_throughput_per_core_per_s": 1e6 / sample_us,
            "opendp_vectors_per_s": 1e6 / sample_us,
            "fast_single_us": fast_us,
            "fast_batched_us_per_vector": fast_batch_us,
            "fast_vectors_per_s": 1e6 / fast_batch_us,
            "fast_over_opendp": sample_us / fast_batch_us,
            "fast_over_opendp_paired_median": paired_ratio,
            "fast_single_over_opendp": sample_us / fast_us,
        })
    return {"benchmark": "noise", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "profile": PROFILE.to_dict(), "lattice_exponent": DEFAULT_LATTICE_EXPONENT,
            "pool_batch": POOL_BATCH, "repeats": repeats, "rows": rows}


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
    print()
    print(f"| d | OpenDP (us/vector) | fast, 1 vector (us) | fast, batch {POOL_BATCH} (us/vector) | "
          "OpenDP vectors/s | fast vectors/s | x OpenDP (batched) | paired median ratio | x OpenDP (1 vector) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:  # type: ignore[attr-defined]
        print(f"| {r['dimension']} | {r['discrete_noise_sample_us']:.0f} | {r['fast_single_us']:.0f} | "
              f"{r['fast_batched_us_per_vector']:.0f} | {r['opendp_vectors_per_s']:.0f} | "
              f"{r['fast_vectors_per_s']:.0f} | {r['fast_over_opendp']:.1f} | "
              f"{r['fast_over_opendp_paired_median']:.1f} | {r['fast_single_over_opendp']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
