"""``dprdm index build|info|verify|near-duplicates`` through the real ``dprdm`` entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dprdm.cli import index as index_cli
from dprdm.cli.main import main
from dprdm.index.testing import write_image_folder
from dprdm.models.fake import FakeEncoder


@pytest.fixture
def index_fake_encoder(monkeypatch):
    enc = FakeEncoder(16)
    monkeypatch.setattr(index_cli, "resolve_encoder", lambda spec, device=None: enc)
    return enc


def _build(tmp_path, *extra):
    return main(["index", "build", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "idx"),
                 "--corpus-id", "cli-test", "--public-size", "1e2", "--encoder", "fake", "--no-progress", *extra])


def test_build_info_verify_near_duplicates(tmp_path, capsys, index_fake_encoder):
    paths = write_image_folder(tmp_path / "imgs", 12)
    shutil.copy(paths[3], tmp_path / "imgs" / "a" / "zz_copy.png")
    assert _build(tmp_path) == 0
    assert "12 records" in capsys.readouterr().out
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "cli-test" in out and "public size N̄  100" in out and "operator-only" in out
    assert "group size     1\n" in out  # flat: one record changes one stored record
    assert main(["index", "info", "--json", str(tmp_path / "idx")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    assert main(["index", "verify", str(tmp_path / "idx")]) == 0
    assert capsys.readouterr().out.startswith("OK")
    assert main(["index", "near-duplicates", str(tmp_path / "idx"), "--threshold", "0.9999"]) == 0
    report = json.loads((tmp_path / "idx" / "reports" / "near_duplicates.json").read_text())
    assert report["pairs"] == 0 and "group size" in report["group_privacy"]  # exact copy was dropped
    assert main(["index", "verify", str(tmp_path / "idx")]) == 0  # the report changed nothing


def test_user_errors_are_one_line_exit_2(tmp_path, capsys, index_fake_encoder):
    write_image_folder(tmp_path / "imgs", 4)
    assert _build(tmp_path) == 0
    capsys.readouterr()
    assert _build(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists; pass --resume" in err and "\n" not in err
    assert _build(tmp_path, "--overwrite", "--index-type", "hnsw") == 2
    assert "amplification" in capsys.readouterr().err
    assert _build(tmp_path, "--overwrite", "--index-type", "ivf", "--nlist", "2") == 2
    assert "--train-vectors" in capsys.readouterr().err
    raw = bytearray((tmp_path / "idx" / "ids.npy").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "idx" / "ids.npy").write_bytes(bytes(raw))
    assert main(["index", "verify", str(tmp_path / "idx")]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ivf_build_via_cli(tmp_path, capsys, index_fake_encoder):
    write_image_folder(tmp_path / "imgs", 20)
    public = np.random.default_rng(0).standard_normal((64, 16))
    np.save(tmp_path / "public.npy", public)
    assert _build(tmp_path, "--index-type", "ivf", "--nlist", "4", "--nprobe", "2",
                  "--train-vectors", str(tmp_path / "public.npy"), "--dtype", "float16") == 0
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "IVF4,Flat" in out and "trained on public" in out and "float16" in out
    assert "group size     2  (one record can change two stored records" in out  # capacities < N̄


def test_unknown_encoder_spec_is_a_clear_error(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", 2)
    assert _build(tmp_path) == 2  # real resolver: "fake" is not a registry spec
    assert "--encoder 'fake'" in capsys.readouterr().err


def test_verify_refuses_edited_manifest_fields_and_seals_old_ones(tmp_path, capsys, index_fake_encoder):
    """Issue 13 item 7: `verify` no longer says OK after `private`/`corpus_id`/`public_size` edits."""
    write_image_folder(tmp_path / "imgs", 6)
    assert _build(tmp_path) == 0
    idx, mpath = tmp_path / "idx", tmp_path / "idx" / "manifest.json"
    original = mpath.read_text()
    assert main(["index", "info", str(idx)]) == 0
    assert "sealed sha256" in capsys.readouterr().out
    for key, value in (("private", False), ("corpus_id", "other"), ("public_size", 10_000)):
        m = json.loads(original)
        m[key] = value
        mpath.write_text(json.dumps(m, indent=2))
        assert main(["index", "verify", str(idx)]) == 2
        err = capsys.readouterr().err.strip()
        assert "edited after the build" in err and "\n" not in err
    m = json.loads(original)
    m.pop("manifest_sha256")
    mpath.write_text(json.dumps(m))  # an index built before manifests were sealed
    assert main(["index", "verify", str(idx)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "NOT sealed" in out and "dprdm index seal" in out
    assert main(["index", "seal", str(idx)]) == 0
    assert "sealed" in capsys.readouterr().out
    assert main(["index", "verify", str(idx)]) == 0
    assert "sealed manifest" in capsys.readouterr().out
    assert main(["index", "seal", str(idx)]) == 0
    assert "already sealed" in capsys.readouterr().out


def test_info_into_a_closed_pipe_is_quiet(tmp_path, capsys, index_fake_encoder):
    """`dprdm index info | head`: no BrokenPipe traceback, exit status 141 (128 + SIGPIPE)."""
    write_image_folder(tmp_path / "imgs", 3)
    assert _build(tmp_path) == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "dprdm", "index", "info", "--json", str(tmp_path / "idx")],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
