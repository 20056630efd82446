"""``dprdm.extras.EXTRA_MODULES`` agrees with pyproject.toml's extras: every distribution an extra
installs provides a module listed for it, and every listed module comes from a distribution the
extra installs (checked on the installed ``.[all,test]`` environment; ``gpu`` is ``build`` with
faiss's GPU wheel, which is not installed here, so it must list the same modules as ``build``)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from dprdm.extras import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    """extra -> the distribution names it installs (``dprdm[x]`` self-references expanded)."""
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> list[str]:
        out: list[str] = []
        for req in raw[extra]:
            name = re.match(r"[A-Za-z0-9._-]+", req)
            assert name is not None, req
            if name.group(0) == "dprdm":
                for inner in re.search(r"\[([^\]]+)\]", req).group(1).split(","):  # type: ignore[union-attr]
                    out += names(inner.strip())
            else:
                out.append(name.group(0))
        return out

    return {extra: names(extra) for extra in raw}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_extra_lists_the_modules_of_what_it_installs() -> None:
    extras = _extras()
    assert set(extras) - {"all"} == set(EXTRA_MODULES), "an extra without a module list (or the reverse)"
    providers: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            providers.setdefault(_norm(dist), set()).add(module)
    for extra, dists in extras.items():
        if extra in ("all", "gpu"):
            continue
        listed = set(EXTRA_MODULES[extra])
        for dist in dists:
            modules = providers.get(_norm(dist), set())
            assert modules, f"{dist} (extra {extra}) is not installed in the test environment"
            assert modules & listed, f"extra {extra!r} installs {dist} but lists none of its modules {sorted(modules)}"
        installed = set().union(*(providers.get(_norm(d), set()) for d in dists))
        assert listed <= installed, f"extra {extra!r} lists modules it does not install: {sorted(listed - installed)}"
    assert set(EXTRA_MODULES["gpu"]) == set(EXTRA_MODULES["build"])
    assert [_norm(d) for d in extras["gpu"] if "faiss" not in d] == [_norm(d) for d in extras["build"] if "faiss" not in d]
