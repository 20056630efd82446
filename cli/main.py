"""The ``dprdm`` command line: one parser, sub-commands registered by each sub-package.

Each entry of ``_COMMAND_MODULES`` names a module with a ``register(subparsers)`` function that
adds its sub-command(s) and sets ``func`` on the parsed namespace, and the extras of
``pyproject.toml`` the command needs. Every command is always listed; modules are imported lazily so
``dprdm privacy ...`` never imports torch, faiss or grpc. A command whose extra is not installed
prints one line naming it (exit status 2), e.g. ``dprdm serve: needs the 'server' and 'models'
extras: pip install 'dprdm[server,models]' (missing modules grpc_health, torch)``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from dprdm.extras import MissingExtraError, extra_for_module, faiss_conflict, require

from .args import CliError

# (command name, module defining `register`, extras it needs, one-line help)
_COMMAND_MODULES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("privacy", "dprdm.cli.privacy", (), "privacy accounting: epsilon, calibration, max queries, empirical audit"),
    ("index", "dprdm.cli.index", (), "build, inspect and verify private indexes"),
    ("serve", "dprdm.cli.serve", ("server", "models"), "run the gRPC server"),
    ("serve-shard", "dprdm.cli.serve_shard", (), "serve one shard of a shard set to the main server (internal)"),
    ("retrieve", "dprdm.cli.client", (), "ask the server for a private conditioning vector"),
    ("generate", "dprdm.cli.client", (), "generate images from a prompt"),
    ("budget", "dprdm.cli.client", (), "show a privacy budget"),
    ("admin", "dprdm.cli.client", (), "administer budgets and read the audit trail"),
    ("demo", "dprdm.cli.demo", ("server", "build", "models"), "run the end-to-end demo on the embedded default bundle"),
    ("train-default", "dprdm.cli.train_default", ("models",), "retrain the embedded default bundle"),
    ("models", "dprdm.cli.models", ("models",), "list model bundles and check their encoder/generator pairing"),
    ("baseline", "dprdm.cli.baseline", ("baselines",), "train and sample the DP fine-tuning baselines"),
    ("bench", "dprdm.cli.bench", ("server",), "load benchmarks against a server (query-budget drain)"),
)

# Sub-commands needing more than their command (`dprdm index info/verify` need only the base install).
_SUBCOMMAND_EXTRAS: dict[tuple[str, str], tuple[str, ...]] = {
    ("index", "build"): ("build", "models"),
    ("index", "near-duplicates"): ("build",),
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the bad argument (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _wanted(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _extras_of(command: str | None, argv: Sequence[str]) -> tuple[str, ...]:
    """The extras ``dprdm COMMAND [SUBCOMMAND]`` needs (the sub-command is the word after the command)."""
    extras: tuple[str, ...] = ()
    for name, _module, needs, _help in _COMMAND_MODULES:
        if name == command:
            extras = needs
    if command is not None and command in argv:
        rest = list(argv)[list(argv).index(command) + 1 :]
        if rest and not rest[0].startswith("-"):
            extras += _SUBCOMMAND_EXTRAS.get((command, rest[0]), ())
    return tuple(dict.fromkeys(extras))


def _missing_extra(exc: ModuleNotFoundError, command: str | None, extras: tuple[str, ...]) -> str | None:
    """The one-line message for an optional package missing at run time, or None (not an extra's)."""
    where = f"dprdm {command}" if command else "dprdm"
    if isinstance(exc, MissingExtraError):
        return str(MissingExtraError(exc.extras, exc.modules, where))
    top = (exc.name or "").split(".")[0]
    extra = extra_for_module(top, extras) if top and top != "dprdm" else None
    if extra is None:
        return None
    try:  # name every missing extra of the command at once, so one install is enough
        require(*dict.fromkeys((*extras, extra)), command=where)
    except MissingExtraError as err:
        if extra in err.extras:  # the module that failed stands for its extra
            modules = [top if e == extra else m for e, m in zip(err.extras, err.modules)]
            return str(MissingExtraError(err.extras, modules, where))
    return str(MissingExtraError([extra], [top], where))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser, importing only the module of the requested sub-command.

    Every command is listed; the others get a placeholder (no module imported).

    Raises:
        ModuleNotFoundError: the requested command's module needs a package that is not installed.
    """
    parser = _Parser(prog="dprdm", description="dprdm: differentially private retrieval-augmented generation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _wanted(argv)
    for name, module, _extras, _help in _COMMAND_MODULES:
        if wanted == name:
            importlib.import_module(module).register(sub)
            break
    for name, _module, _extras, help_text in _COMMAND_MODULES:
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _broken_pipe() -> int:
    """The reader went away (``dprdm index info | head``): stop quietly with 141 (128 + SIGPIPE).

    Standard output is pointed at ``os.devnull`` so the interpreter's final flush raises nothing
    (the recipe of the Python documentation, "Note on SIGPIPE").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured output)
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dprdm`` console script. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    wanted = _wanted(args_list)
    extras = _extras_of(wanted, args_list)
    try:
        parser = build_parser(args_list)
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc, wanted, extras)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    func = getattr(args, "func", None)
    if func is None:
        if args.command is None:
            parser.print_help()
            return 2
        print(f"dprdm {args.command}: error: missing sub-command (see dprdm {args.command} --help)", file=sys.stderr)
        return 2
    try:
        require(*extras, command=f"dprdm {args.command}")
    except MissingExtraError as exc:
        print(exc, file=sys.stderr)
        return 2
    if "build" in extras and (conflict := faiss_conflict()):
        print(conflict, file=sys.stderr)
    try:
        status = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except BrokenPipeError:
        return _broken_pipe()
    except CliError as exc:
        print(f"dprdm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc, args.command, extras)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dprdm: interrupted", file=sys.stderr)
        return 130
