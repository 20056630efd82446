"""Server load benchmark (SPEC §10): ``Retrieve`` and ``Generate`` over loopback, 1..64 clients, until
the budget refuses; throughput, p50/p95/p99, refusals, epsilon over time, never-overspent checks.

A thin runner of :mod:`dprdm.benchmarks.load_harness` (also ``dprdm bench load``). Exits 1 if an invariant
is violated. Writes ``load-<time>.json`` to ``--out`` (default ``benchmarks/results/``).

    python benchmarks/load.py                                  # N = 1e6, d = 64, both methods
    python benchmarks/load.py --n 1e5 --methods retrieve --clients 16 --queries 5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dprdm.benchmarks.load_harness import BenchError, add_load_arguments, load_command


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the benchmark. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, Path(__file__).resolve().parent / "results")
    try:
        return int(load_command(parser.parse_args(argv)))
    except BenchError as exc:
        print(f"benchmarks/load.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
