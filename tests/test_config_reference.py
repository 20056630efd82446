"""docs/CONFIG.md is generated from the configuration code (tools/gen_config_reference.py) and
documents exactly the keys ``parse_config`` reads (issue 13 item 12)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from dprdm.server import config as C

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "tools" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _documented() -> set[str]:
    gen = _generator()
    return {f"{s.header.strip('[]')}.{row[0]}" for s in gen.SECTIONS for row in gen.rows(s)}


def _normalize(path: str) -> str:
    path = re.sub(r"^tokens\[\d+\]", "tokens", path)
    path = re.sub(r"^indexes\.[^.]+\.profiles\.[^.]+", "indexes.<name>.profiles.<profile>", path)
    path = re.sub(r"^indexes\.[^.]+(?=\.|$)", "indexes.<name>", path)
    return re.sub(r"^budgets\.[^.]+(?=\.|$)", "budgets.<domain>", path)


FULL = {
    "server": {"listen": "127.0.0.1:0", "data_dir": "d", "metrics_port": 1, "fixed_response_seconds": 1.0},
    "limits": {"max_images": 2},
    "ledger": {"url": "postgresql://dprdm@db:5432/dprdm"},
    "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"},
    "tokens": [
        {"tenant": "a", "token": "a" * 16, "indexes": ["x"]},
        {"tenant": "b", "token_env": "TOK_B", "domains": ["corpus"]},
        {"tenant": "c", "role": "admin", "token_sha256": "0" * 64},
    ],
    "indexes": {"x": {"path": "p", "bundle": "b", "private": True, "noise": "discrete",
                      "profiles": {"p": {"k": 2, "q": 0.5, "sigma": 1.0, "lambda": 1.0, "nprobe": 2}}}},
    "budgets": {"corpus": {"epsilon": 1.0, "delta": 1e-6, "rule": "filter", "filter_order": 8.0,
                           "quotas": {"a": 0.5}}},
}


def _keys_read(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every (table, key) parse_config asks for while parsing a configuration that uses every branch."""
    seen: set[str] = set()
    get, sub = C._Table.get, C._Table.sub

    def record(self: C._Table, name: str) -> None:
        if not self.path.endswith(".quotas"):  # quotas' keys are tenant names
            seen.add(_normalize(self.key(name)))

    def spy_get(self: C._Table, name: str, *args: object, **kwargs: object) -> object:
        record(self, name)
        return get(self, name, *args, **kwargs)

    def spy_sub(self: C._Table, name: str) -> C._Table:
        named = self.path in ("indexes", "budgets") or self.path.endswith(".profiles")  # operator's names
        if not named and name not in ("server", "limits", "ledger", "tls", "indexes", "budgets", "profiles"):
            record(self, name)
        return sub(self, name)

    monkeypatch.setattr(C._Table, "get", spy_get)
    monkeypatch.setattr(C._Table, "sub", spy_sub)
    C.parse_config(FULL, env={"TOK_B": "b" * 16})
    return {k if "." in k else f"server.{k}" if k != "tokens" else k for k in seen} - {"tokens"}


def test_committed_reference_is_the_generators_output() -> None:
    committed = (ROOT / "docs" / "CONFIG.md").read_text()
    assert committed == _generator().render(), "docs/CONFIG.md is stale: run tools/gen_config_reference.py"


def test_documented_keys_are_exactly_the_keys_parse_config_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    read = _keys_read(monkeypatch)
    documented = _documented()
    assert read - documented == set(), "keys parse_config accepts but docs/CONFIG.md lacks"
    assert documented - read == set(), "keys documented but not read by parse_config"


def test_every_key_has_a_type_default_and_description() -> None:
    gen = _generator()
    for section in gen.SECTIONS:
        for key, kind, default, _example, text in gen.rows(section):
            assert kind and default and text.strip(), f"{section.header} {key}: add an attribute docstring"
