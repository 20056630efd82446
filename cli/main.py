"""The ``dprdm`` command line: one parser, sub-commands registered by each sub-package.

Each entry of ``_COMMAND_MODULES`` names a module with a ``register(subparsers)`` function that
adds its sub-command(s) and sets ``func`` on the parsed namespace. Modules are imported lazily so
``dprdm privacy ...`` never imports torch, faiss or grpc.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .args import CliError

# (command name, module defining `register`, one-line help)
_COMMAND_MODULES: tuple[tuple[str, str, str], ...] = (
    ("privacy", "dprdm.cli.privacy", "privacy accounting: epsilon, calibration, max queries"),
    ("index", "dprdm.cli.index", "build, inspect and verify private indexes"),
    ("serve", "dprdm.cli.serve", "run the gRPC server"),
    ("retrieve", "dprdm.cli.client", "ask the server for a private conditioning vector"),
    ("generate", "dprdm.cli.client", "generate images from a prompt"),
    ("budget", "dprdm.cli.client", "show a privacy budget"),
    ("admin", "dprdm.cli.client", "administer budgets and read the audit trail"),
    ("demo", "dprdm.cli.demo", "run the end-to-end demo on the embedded default bundle"),
    ("train-default", "dprdm.cli.train_default", "retrain the embedded default bundle"),
    ("baseline", "dprdm.cli.baseline", "train and sample the DP fine-tuning baselines"),
    ("audit", "dprdm.cli.audit", "empirical privacy audit of the retrieval mechanism"),
    ("bench", "dprdm.cli.bench", "load benchmarks against a server (query-budget drain)"),
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the bad argument (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser, importing only the module of the requested sub-command."""
    parser = _Parser(prog="dprdm", description="dprdm: differentially private retrieval-augmented generation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, _help in _COMMAND_MODULES:
        if wanted == name and _module_available(module):
            importlib.import_module(module).register(sub)
            break
    for name, _module, help_text in _COMMAND_MODULES:
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dprdm`` console script. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    func = getattr(args, "func", None)
    if func is None:
        if args.command is None:
            parser.print_help()
            return 2
        print(f"dprdm: command {args.command!r} is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except CliError as exc:
        print(f"dprdm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dprdm: interrupted", file=sys.stderr)
        return 130
