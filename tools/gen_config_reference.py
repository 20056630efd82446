"""Generate ``docs/CONFIG.md``, the reference of every ``dprdm serve`` configuration key, from the code.

Keys, types and defaults come from the frozen dataclasses of :mod:`dprdm.server.config` (and
:class:`dprdm.privacy.Profile` for a profile's numbers); descriptions from each field's attribute
docstring (a string literal right after the field) or its class docstring's ``Attributes:`` entry;
examples from the module docstring's example configuration (else the default). The few TOML keys
that are not one field each (a token's three sources, ``lambda``) are named in ``SECTIONS`` below.
``tests/test_config_reference.py`` checks that the committed file equals this output and that the
documented keys are exactly the keys ``parse_config`` reads.

Usage (from the repo root)::

    .venv/bin/python tools/gen_config_reference.py           # write docs/CONFIG.md
    .venv/bin/python tools/gen_config_reference.py --check   # exit 1 if docs/CONFIG.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "CONFIG.md"


@dataclass(frozen=True)
class Section:
    """One TOML table of the configuration and the dataclass its keys come from."""

    header: str
    """The table as written in TOML (``<name>`` marks a name the operator chooses)."""
    cls: str
    """``module:Class`` of the dataclass."""
    about: str
    skip: tuple[str, ...] = ()
    """Fields that are not keys of this table (names, sub-tables)."""
    renamed: tuple[tuple[str, str], ...] = ()
    """(field, TOML key) where the key is spelled differently."""
    extra: tuple[tuple[str, str, str, str], ...] = ()
    """Keys that are not one field each: (key, type, default, description)."""
    also: tuple[str, ...] = ()
    """``module:Class`` whose fields are keys of this table too (a profile's numbers)."""
    defaults: tuple[tuple[str, str], ...] = ()
    """(key, default) where the parser supplies a default the dataclass field cannot have."""


CONFIG = "dprdm.server.config"
SECTIONS: tuple[Section, ...] = (
    Section("[server]", f"{CONFIG}:ServerConfig", "The server process.",
            skip=("limits", "ledger", "tls", "tokens", "indexes", "budgets")),
    Section("[ledger]", f"{CONFIG}:LedgerConfig",
            "Optional; absent = the SQLite ledger in `data_dir`. A PostgreSQL URL lets several servers and hosts spend one budget."),
    Section("[limits]", f"{CONFIG}:Limits", "Request bounds; a request outside them is `INVALID_ARGUMENT` naming the field."),
    Section("[tls]", f"{CONFIG}:TlsConfig", "Optional; absent = plaintext. `client_ca` turns on mTLS."),
    Section(
        "[[tokens]]", f"{CONFIG}:TokenConfig",
        "Bearer tokens, one table each. Exactly one of `token`, `token_env`, `token_sha256`; only the SHA-256 is kept in memory.",
        skip=("token_sha256",), defaults=(("role", '"tenant"'),),
        extra=(
            ("token", "string", "", "The bearer token itself (>= 16 characters). Prefer `token_env` or `token_sha256`: the file then holds no secret."),
            ("token_env", "string", "", "Name of the environment variable holding the token (>= 16 characters)."),
            ("token_sha256", "string", "", "The token's SHA-256 as 64 hex digits (`dprdm.server.config.hash_token`)."),
        ),
    ),
    Section("[indexes.<name>]", f"{CONFIG}:IndexConfig", "One served index (at least one is required).",
            skip=("name", "profiles")),
    Section(
        "[indexes.<name>.profiles.<profile>]", f"{CONFIG}:ProfileConfig",
        "A retrieval profile clients choose by name (at least one per index).",
        skip=("name", "profile"), renamed=(("lam", "lambda"),), also=("dprdm.privacy:Profile",),
    ),
    Section("[budgets.<domain>]", f"{CONFIG}:BudgetConfig",
            "A privacy domain's budget (the domain is the index manifests' corpus id), created in the ledger if it has none.",
            skip=("domain",)),
)

_TYPES = {"str": "string", "int": "integer", "float": "float", "bool": "boolean",
          "frozenset[str]": "array of strings", "tuple[tuple[str, float], ...]": "table of floats"}


def _import(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field docstrings: a string literal right after an annotated field, else the class docstring's Attributes."""
    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    for stmt, nxt in zip(body.body, body.body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    match = re.search(r"Attributes:\n(.*?)(\n\s*\n|$)", inspect.getdoc(cls) or "", re.S)
    if match:
        for entry in re.split(r"\n(?=\s{4}\w+:)", match.group(1)):
            name, _, text = entry.strip().partition(":")
            docs.setdefault(name.strip(), " ".join(text.split()))
    return docs


def _examples() -> dict[tuple[str, str], str]:
    """``(table, key) -> value`` from the example configuration in the config module's docstring."""
    doc = inspect.getdoc(importlib.import_module(CONFIG)) or ""
    out: dict[tuple[str, str], str] = {}
    table = ""
    for raw in doc.splitlines():
        line = raw.strip().lstrip("#").strip()
        head = re.fullmatch(r"\[\[?([^\]]+)\]\]?(\s+#.*)?", line)
        if head:
            table = re.sub(r"^indexes\.[^.]+\.profiles\.[^.]+$", "indexes.<name>.profiles.<profile>", head.group(1))
            table = re.sub(r"^indexes\.[^.]+$", "indexes.<name>", table)
            table = re.sub(r"^budgets\.[^.]+$", "budgets.<domain>", table)
            continue
        kv = re.fullmatch(r"([a-z_0-9]+)\s*=\s*(.+?)(\s+#.*)?", line)
        if kv and table:
            out.setdefault((table, kv.group(1)), kv.group(2).strip())
    return out


def _toml(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, frozenset | tuple) and not value:
        return "(absent)" if isinstance(value, frozenset) else "{}"
    return repr(value)


def _type(annotation: str) -> str:
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    return _TYPES.get(base, base) + (" (optional)" if optional else "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def rows(section: Section) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, example, description) of every key of ``section``, in field order."""
    examples = _examples()
    table = section.header.strip("[]")
    renamed = dict(section.renamed)
    out = []
    classes = [_import(section.cls), *(_import(c) for c in section.also)]
    for cls in classes:
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in section.skip:
                continue
            key = renamed.get(f.name, f.name)
            if f.default is not dataclasses.MISSING:
                default = _toml(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _toml(f.default_factory())
            else:
                default = dict(section.defaults).get(key, "required")
            example = examples.get((table, key), "" if default == "required" else default)
            out.append((key, _type(str(f.type)), default, example, docs.get(f.name, "")))
    for key, kind, default, text in section.extra:
        out.append((key, kind, default or "(one of the three)", examples.get((table, key), ""), text))
    return out


def render() -> str:
    """The whole of ``docs/CONFIG.md``."""
    config_module = importlib.import_module(CONFIG)
    lines = [
        "# Configuration reference (`dprdm serve --config FILE.toml`)",
        "",
        "<!-- Generated by tools/gen_config_reference.py from dprdm/server/config.py: do not edit;",
        "     run `.venv/bin/python tools/gen_config_reference.py` after changing the configuration. -->",
        "",
        "Every key but `[indexes.<name>]` (and a profile and a token) is optional. Relative paths are",
        "relative to the configuration file. An unknown key is an error naming it. `--listen`,",
        "`--data-dir`, `--metrics-port` and `--no-reuse` override the file; `--check` validates it and exits.",
        "A `(absent)` default means the key is unset unless given.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## `{section.header}`", "", section.about, "",
                  "| key | type | default | example | description |", "|---|---|---|---|---|"]
        for key, kind, default, example, text in rows(section):
            lines.append(f"| `{key}` | {kind} | {_cell(default)} | {_cell(f'`{example}`' if example else '')} | {_cell(text)} |")
        lines.append("")
    lines += ["## Example", "", "```toml", textwrap.dedent(_example_block(inspect.getdoc(config_module) or "")).strip("\n"), "```", ""]
    return "\n".join(lines)


def _example_block(doc: str) -> str:
    """The indented example configuration of the config module's docstring."""
    block = doc.split("::", 1)[1] if "::" in doc else ""
    out = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith(" "):
            break
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) ``docs/CONFIG.md``; returns the exit status."""
    ap = argparse.ArgumentParser(description="generate docs/CONFIG.md from dprdm.server.config")
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run tools/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
