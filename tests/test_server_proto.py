"""The generated code is reproducible from proto/ and imports inside the package."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "gen_proto.py"
_spec = importlib.util.spec_from_file_location("gen_proto", _TOOL)
assert _spec is not None and _spec.loader is not None
gen_proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_proto)


def test_generated_code_is_up_to_date(tmp_path):
    generated = gen_proto.generate(tmp_path)
    names = sorted(p.relative_to(tmp_path) for p in generated)
    checked_in = sorted(p.relative_to(gen_proto.OUT_ROOT) for p in gen_proto.OUT_ROOT.rglob("*_pb2*.py*"))
    assert names == checked_in
    for rel in names:
        assert filecmp.cmp(tmp_path / rel, gen_proto.OUT_ROOT / rel, shallow=False), (
            f"{rel} is stale: run gen_proto"
        )


def test_imports_are_rewritten_into_the_package():
    assert gen_proto.rewrite_imports("from dprdm.v1 import types_pb2 as t\n") == (
        "from dprdm.proto.v1 import types_pb2 as t\n"
    )
    for path in gen_proto.OUT_ROOT.rglob("*_pb2*.py"):
        assert "\nfrom dprdm.v1 " not in path.read_text()


def test_services_and_fields():
    from dprdm.proto.v1 import admin_pb2, dprdm_pb2

    assert set(dprdm_pb2.DESCRIPTOR.services_by_name["Dprdm"].methods_by_name) == {
        "Retrieve",
        "Generate",
        "GetBudget",
        "ListIndexes",
    }
    assert dprdm_pb2.DESCRIPTOR.services_by_name["Dprdm"].methods_by_name["Generate"].server_streaming
    assert set(admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name) == {
        "CreateBudget",
        "GetAuditTrail",
        "GetCounts",
        "ListQuotas",
    }
    assert "exact_size" not in dprdm_pb2.IndexInfo.DESCRIPTOR.fields_by_name  # operator-only, admin API
