"""``dprdm models``: list bundles and check that a bundle's encoder and generator belong together."""

from __future__ import annotations

import argparse
from typing import Any

from .args import CliError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``models`` command and its sub-commands to the ``dprdm`` parser."""
    parser = subparsers.add_parser("models", help="list and check model bundles",
                                   description="List and check encoder/generator bundles (SPEC §8).")
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("check", help="load a bundle and run its pairing checks (exit 2 on a refusal)")
    c.add_argument("bundle", help="bundle name or bundle JSON file")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: fp32 on CPU, bf16/fp16 on a GPU")
    c.set_defaults(func=_cmd_check)
    ls = sub.add_parser("list", help="list known bundles (DPRDM_BUNDLE_PATH, then the package)")
    ls.set_defaults(func=_cmd_list)


def _cmd_check(args: argparse.Namespace) -> int:
    """Print one line per check; 0 when all pass, 2 when the bundle would be refused."""
    from dprdm.models.registry import load_bundle

    try:
        bundle = load_bundle(args.bundle, device=args.device, dtype=args.dtype, refuse=False)
    except (ValueError, OSError) as exc:
        raise CliError(f"bundle {args.bundle!r}: {exc}") from None
    enc, gen = bundle.encoder, bundle.generator
    ident = enc.identity
    print(f"bundle     {bundle.name}  ({bundle.spec.path})")
    print(f"encoder    {ident.name}  dim {ident.dimension}  sha256 {ident.weights_sha256[:16]}...  "
          f"{_where(enc)}")
    line = f"generator  {bundle.spec.generator.get('type')}  dim {gen.conditioning_dimension}  {_where(gen)}"
    if hasattr(gen, "embedding_scale"):
        line += f"  embedding_scale {gen.embedding_scale:.4g} ({getattr(gen, 'embedding_scale_source', '')})"
    if hasattr(gen, "noise_level"):
        line += f"  noise_level {gen.noise_level}"
    print(line)
    for check in bundle.checks:
        print(f"{'ok' if check.ok else 'REFUSED':<10} {check.name}: {check.detail}")
    return 0 if all(c.ok for c in bundle.checks) else 2


def _where(model: Any) -> str:
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    return f"on {device} {str(dtype).removeprefix('torch.')}" if device is not None else ""


def _cmd_list(args: argparse.Namespace) -> int:
    from dprdm.models.registry import list_bundles

    for spec in list_bundles():
        print(f"{spec.name:<24} {spec.generator.get('type'):<14} {spec.encoder}  ({spec.path})")
    return 0
