"""The optional, validated fields of a bundle file, and its one variable mechanism (SPEC §8).

Parsed by :func:`dprdm.models.registry.read_bundle`; torch-free.

- ``recommended_profiles``: a list of ``{epsilon, queries, k, q, sigma, lambda, dimension}`` (and
  optionally ``delta``), release profiles measured to keep a useful release at that dimension for a
  budget of ``epsilon`` over ``queries`` queries (filled in by ``benchmarks/fidelity.py``);
  ``k, q, sigma, lambda`` are checked as a server profile is (:class:`dprdm.privacy.Profile`).
- ``sources``: a list of ``{repo, local_dir, include}``: where each publisher's files come from.
- ``${NAME}`` in a bundle path or encoder spec: the environment variable ``NAME`` (:func:`expand_vars`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dprdm.privacy import Profile

__all__ = ["PROFILE_KEYS", "RecommendedProfile", "Source", "parse_profiles", "parse_sources", "expand_vars"]


@dataclass(frozen=True)
class RecommendedProfile:
    """A release profile recommended for a bundle: ``profile`` (k, q, sigma, lambda; what a server
    profile takes) for a budget of ``epsilon`` (at ``delta``, when given) spread over ``queries``
    queries, at embedding ``dimension``. Filled in by the fidelity benchmark (``benchmarks/fidelity.py``).
    """

    profile: Profile
    epsilon: float
    queries: int
    dimension: int
    delta: float | None = None


@dataclass(frozen=True)
class Source:
    """Where some of a bundle's files come from: a Hugging Face ``repo``, the files to fetch from it
    (``include``, glob patterns relative to the repository) and the folder they go to (``local_dir``)."""

    repo: str
    local_dir: str
    include: tuple[str, ...]


PROFILE_KEYS = ("epsilon", "queries", "k", "q", "sigma", "lambda", "dimension")
_BUDGET_RULES: dict[str, tuple[str, Any]] = {  # k, q, sigma, lambda: checked by privacy.Profile
    "epsilon": ("a finite number > 0", lambda v: _num(v) and 0 < v < math.inf),
    "queries": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "dimension": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "delta": ("a number in (0, 1)", lambda v: _num(v) and 0 < v < 1),
}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_profiles(raw: Any, where: str, dimension: Any) -> tuple[RecommendedProfile, ...]:
    """Validate ``recommended_profiles``: a list of objects with exactly :data:`PROFILE_KEYS` (and
    optionally ``delta``), each value in its range, ``dimension`` equal to the generator's declared
    ``conditioning_dimension`` when there is one.

    Args:
        raw: the field's JSON value. where: the bundle, prefixed to every message.
        dimension: the generator's declared ``conditioning_dimension`` (None or other: not compared).

    Raises:
        ValueError: one line naming the entry, the field and the bad value.
    """
    if not isinstance(raw, list):
        raise ValueError(f"{where}: recommended_profiles must be a list; found {raw!r}")
    out = []
    for i, p in enumerate(raw):
        at = f"{where}: recommended_profiles[{i}]"
        if not isinstance(p, dict):
            raise ValueError(f"{at} must be an object with {', '.join(PROFILE_KEYS)}; found {p!r}")
        missing = [k for k in PROFILE_KEYS if k not in p]
        unknown = sorted(set(p) - set(PROFILE_KEYS) - {"delta"})
        if missing or unknown:
            raise ValueError(
                f"{at}: missing {missing}, unknown {unknown}; expected {', '.join(PROFILE_KEYS)} "
                "(and optionally delta)"
            )
        for key, (what, ok) in _BUDGET_RULES.items():
            if key in p and not ok(p[key]):
                raise ValueError(f"{at}.{key} must be {what}; found {p[key]!r}")
        if _int(dimension) and p["dimension"] != dimension:
            raise ValueError(
                f"{at}.dimension {p['dimension']} != generator.conditioning_dimension {dimension}"
            )
        from dprdm.privacy import Profile  # lazily: most bundles have no profiles

        try:
            profile = Profile(k=p["k"], q=p["q"], sigma=p["sigma"], lam=p["lambda"])
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
        delta = float(p["delta"]) if "delta" in p else None
        out.append(RecommendedProfile(profile, float(p["epsilon"]), p["queries"], p["dimension"], delta))
    return tuple(out)


def parse_sources(raw: Any, where: str) -> tuple[Source, ...]:
    """Validate ``sources``: a list of ``{repo: "org/name", local_dir: str, include: [glob, ...]}``.

    Raises:
        ValueError: one line naming the entry, the field and the bad value (``where`` first).
    """
    if not isinstance(raw, list):
        raise ValueError(f"{where}: sources must be a list; found {raw!r}")
    out = []
    for i, s in enumerate(raw):
        at = f"{where}: sources[{i}]"
        if not isinstance(s, dict) or set(s) != {"repo", "local_dir", "include"}:
            raise ValueError(f"{at} must be an object with exactly repo, local_dir, include; found {s!r}")
        repo, local_dir, include = s["repo"], s["local_dir"], s["include"]
        if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"{at}.repo must be 'org/name'; found {repo!r}")
        if not isinstance(local_dir, str) or not local_dir:
            raise ValueError(f"{at}.local_dir must be a non-empty string; found {local_dir!r}")
        if not isinstance(include, list) or not include or not all(isinstance(g, str) and g for g in include):
            raise ValueError(f"{at}.include must be a non-empty list of glob patterns; found {include!r}")
        out.append(Source(repo=repo, local_dir=local_dir, include=tuple(include)))
    return tuple(out)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: str) -> str:
    """Replace each ``${NAME}`` in a bundle path or encoder spec with the environment variable ``NAME``.

    The one variable mechanism of bundle files: the example bundles name their weights under
    ``${DPRDM_MODELS}`` (the folder ``models/README.md`` fetches them into). ``~`` is expanded
    separately, for paths only.

    Raises:
        ValueError: naming the variable and the value when the variable is unset or empty, or a
            ``$`` that does not start a well-formed ``${NAME}``.
    """

    def value_of(m: re.Match[str]) -> str:
        found = os.environ.get(m.group(1), "")
        if not found:
            raise ValueError(
                f"{value!r} uses ${{{m.group(1)}}}, which is not set; set it to the folder holding the "
                "model files (see models/README.md)"
            )
        return found

    if "$" in _VARIABLE.sub("", value):
        raise ValueError(f"{value!r}: a '$' must start a variable written ${{NAME}}")
    return _VARIABLE.sub(value_of, value)
