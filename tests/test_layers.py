"""The layering, stated and checked statically: every arrow points down (DEVELOPERS.md, issue 11).

    cli > clients, server, baselines > ledger, index, models > privacy
    clients > proto; server > proto

Each package's syntax tree is walked, imports inside functions (lazy ones) included, and also
``importlib.import_module("dprdm....")`` / ``__import__`` calls with a constant name, so a lazy or
dynamic import cannot hide an upward arrow (a runtime ``sys.modules`` check cannot see those).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> folder (as in pyproject's package-dir)
FOLDERS = {
    "dprdm": "_dprdm",
    "privacy": "privacy",
    "ledger": "ledger",
    "index": "index",
    "models": "models",
    "proto": "proto/dprdm",
    "clients": "clients",
    "server": "server",
    "baselines": "baselines",
    "benchmarks": "benchmarks",
    "cli": "cli",
}

# The sub-packages of dprdm each package may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "privacy": set(),
    "proto": set(),
    "ledger": {"privacy"},
    "models": {"privacy"},
    "index": {"privacy", "models"},
    "clients": {"proto"},
    "server": {"privacy", "ledger", "index", "models", "proto"},
    "baselines": {"privacy", "ledger", "models"},
    "benchmarks": {"privacy", "ledger", "index", "models", "server", "clients", "proto", "baselines", "dprdm"},
    "cli": set(FOLDERS) - {"cli"},
    "dprdm": {"cli"},  # the root package: `python -m dprdm` runs the command line
}

# Third-party modules a package must never import (lazily included).
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "privacy": {"torch", "faiss", "grpc", "diffusers", "open_clip", "transformers", "peft", "opacus", "PIL"},
    "ledger": {"torch", "faiss", "grpc", "diffusers", "open_clip", "transformers"},
    "proto": {"torch", "faiss", "diffusers"},
    "clients": {"torch", "faiss", "diffusers", "open_clip", "transformers", "opendp"},
    "index": {"grpc"},
    "models": {"grpc", "faiss"},
}


def _imports(path: Path, package: str, folder: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(folder).with_suffix("")
    parts = ["dprdm"] + ([] if package == "dprdm" else [package]) + list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x, y
                    for alias in node.names:
                        yield node.lineno, f"{name}.{alias.name}"
                    continue
                yield node.lineno, name
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__", "find_spec") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value


def _violations(package: str, folder: Path | None = None) -> list[str]:
    folder = folder or ROOT / FOLDERS[package]
    found = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in _imports(path, package, folder):
            where = f"{path.relative_to(folder.parent)}:{line}"
            top = module.split(".")[0]
            if top == "dprdm":
                sub = module.split(".")[1] if module.count(".") else "dprdm"
                if sub not in FOLDERS:  # dprdm.extras and other root modules
                    sub = "dprdm"
                if sub != package and sub not in ALLOWED[package]:
                    found.append(f"{where}: {package} imports {module}")
            elif top in FORBIDDEN_THIRD_PARTY.get(package, set()):
                found.append(f"{where}: {package} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_arrow_points_down(package: str) -> None:
    assert _violations(package) == []


def test_nothing_imports_the_command_line() -> None:
    users = {p for p, allowed in ALLOWED.items() if "cli" in allowed}
    assert users == {"dprdm"}, "only `python -m dprdm` may import dprdm.cli"


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The walker itself: an upward import inside a function, a relative one and a dynamic one."""
    folder = tmp_path / "privacy"
    folder.mkdir()
    (folder / "probe.py").write_text(
        "def f():\n    from dprdm.index import search\n    import torch\n"
        "def g():\n    from ..server import app\n"
        "def h():\n    import importlib\n    importlib.import_module('dprdm.cli.main')\n"
    )
    (folder / "fine.py").write_text("from . import orders\nfrom .rdp import x\nimport numpy\n")
    found = _violations("privacy", folder)
    assert len(found) == 4, found
    assert any("imports dprdm.index" in v for v in found)
    assert any("imports torch" in v for v in found)
    assert any("imports dprdm.server" in v for v in found)
    assert any("imports dprdm.cli.main" in v for v in found)


def test_every_package_folder_is_covered() -> None:
    """A new package folder must be given its place in the layers."""
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = set(doc["tool"]["setuptools"]["package-dir"].values())
    assert mapped <= set(FOLDERS.values()), f"folders without a layer: {mapped - set(FOLDERS.values())}"
