"""The package layout: a built wheel (not only the editable install) imports ``dprdm.privacy``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_and_imports_subpackages(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("dprdm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dprdm/__init__.py" in names and "dprdm/privacy/rdp.py" in names
    assert not any(n.startswith("proto/") for n in names)  # proto/ is never a Python package
    # the embedded default bundle ships in the wheel: its registry entry and its weights
    assert "dprdm/models/bundles/dprdm-mini.json" in names
    assert {"dprdm/models/weights/mini_encoder.safetensors", "dprdm/models/weights/mini_decoder.safetensors"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import dprdm.privacy as p;"
        f"assert p.__file__.startswith({str(site)!r}), p.__file__; print(p.DEFAULT_ORDERS[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "1.05"
