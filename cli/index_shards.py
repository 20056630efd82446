"""``dprdm index split`` and ``dprdm index verify-set``: shard sets (:mod:`dprdm.index.shardset`).

Registered by :func:`dprdm.cli.index.register` under ``dprdm index``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import CliError

__all__ = ["register_shard_commands"]


def _ints(text: str) -> list[int]:
    """Comma-separated integers (``1e6`` and ``1_000`` allowed)."""
    out = []
    for item in text.split(","):
        t = item.strip().replace("_", "")
        try:
            value = float(t) if any(c in t for c in "eE.") else int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers; found {text!r}") from None
        if value != int(value):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers; found {text!r}")
        out.append(int(value))
    return out


def register_shard_commands(sub: Any) -> None:
    """Add ``split`` and ``verify-set`` to the ``dprdm index`` sub-parsers."""
    sp = sub.add_parser(
        "split", help="split a flat index into a shard set by record-id range",
        description="Split a flat index into S shards by record-id range, each padded to its own PUBLIC size. "
                    "Default ranges: the 63-bit id space split evenly (right for content-hash ids); default "
                    "shard size: ceil(N̄/S) + ceil(6 sqrt(N̄/S)). The shard sizes must add up to >= N̄, and a "
                    "shard holding more records than its size is refused (nothing is dropped).")
    sp.add_argument("source", type=Path, help="the flat index directory to split")
    sp.add_argument("output", type=Path, help="the shard set directory to create")
    sp.add_argument("--shards", type=int, required=True, help="number of shards S")
    sp.add_argument("--boundaries", type=_ints,
                    help="first record id of shards 1..S-1, comma-separated (public; never quantiles of the ids)")
    sp.add_argument("--shard-public-size", type=_ints,
                    help="public size of every shard (one value) or of each shard (S values)")
    sp.set_defaults(func=_cmd_split)

    vs = sub.add_parser("verify-set", help="re-check a shard set: its manifest, every shard's checksums and rows")
    vs.add_argument("path", type=Path)
    vs.set_defaults(func=_cmd_verify_set)


def _cmd_split(args: argparse.Namespace) -> int:
    from dprdm.index.errors import IndexBuildError, IndexFormatError
    from dprdm.index.shardset import split_index

    try:
        m = split_index(args.source, args.output, shards=args.shards, boundaries=args.boundaries,
                        shard_public_sizes=args.shard_public_size)
    except (IndexBuildError, IndexFormatError) as exc:
        raise CliError(str(exc)) from None
    sizes = ", ".join(str(e["public_size"]) for e in m["shards"])
    print(f"split {args.source} into {len(m['shards'])} shards at {args.output} (set version {m['index_version']}); "
          f"shard public sizes {sizes} (set public size {m['public_size']})")
    return 0


def _cmd_verify_set(args: argparse.Namespace) -> int:
    from dprdm.index.errors import IndexFormatError
    from dprdm.index.shardset import verify_shard_set

    try:
        s = verify_shard_set(args.path)
    except IndexFormatError as exc:
        raise CliError(str(exc)) from None
    print(f"OK {s.path}: shard set {s.index_version}, {len(s.shards)} shards: every manifest seal, file checksum "
          "and stored row verified")
    return 0
