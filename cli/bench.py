"""``dprdm bench load``: the flags and the run live in :mod:`dprdm.benchmarks.load_harness`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import CliError

__all__ = ["register"]


def _load(args: argparse.Namespace) -> int:
    from dprdm.benchmarks.load_harness import BenchError, load_command

    try:
        return load_command(args)
    except BenchError as exc:
        raise CliError(str(exc)) from None


def register(subparsers: Any) -> None:
    """Add ``dprdm bench load`` to the ``dprdm`` command line."""
    from dprdm.benchmarks import load_harness

    bench = subparsers.add_parser("bench", help="load benchmarks against a server (query-budget drain)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    load = sub.add_parser(
        "load",
        help="drain budgets with 1..64 concurrent clients; check they hold",
        description=load_harness.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load_harness.add_load_arguments(load, Path("benchmarks") / "results")
    load.set_defaults(func=_load)
