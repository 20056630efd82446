"""``dprdm train-default``: the flags of :func:`dprdm.models.train_default.run`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]

# The package's weights folder, found without importing dprdm.models (torch) to build the parser.
_WEIGHTS_DIR = Path(__import__("importlib.util").util.find_spec("dprdm.models").submodule_search_locations[0]) / "weights"


def _run(args: argparse.Namespace) -> int:
    from dprdm.models.train_default import run

    return run(args)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``train-default`` sub-command (``func`` returns the exit status)."""
    p = subparsers.add_parser("train-default", help="retrain the embedded default bundle (dprdm-mini)")
    p.add_argument(
        "--out", type=Path, default=_WEIGHTS_DIR, help="output directory (default: package weights/)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--public-size", type=int, default=20000, help="public training images (default 20000)")
    p.add_argument("--encoder-steps", type=int, default=700)
    p.add_argument("--encoder-seconds", type=float, default=600.0)
    p.add_argument("--decoder-steps", type=int, default=8000)
    p.add_argument("--decoder-seconds", type=float, default=1800.0, help="wall-clock cap for the decoder")
    p.add_argument("--dim", type=int, default=32, help="shared embedding dimension (default 32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.set_defaults(func=_run)


