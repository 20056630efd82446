"""On-disk format: round trip, verified loading, clear errors on corrupt directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dprdm.index import BuildConfig, IndexFormatError, build_from_vectors, load, verify
from dprdm.index.testing import random_unit_vectors
from dprdm.models.base import EncoderIdentity
from dprdm.models.fake import FakeEncoder


@pytest.fixture
def index_dir(tmp_path):
    enc = FakeEncoder(16)
    x = random_unit_vectors(300, 16, seed=1)
    ids = np.random.default_rng(0).permutation(10_000)[:300]
    build_from_vectors(x, enc.identity, BuildConfig(output=tmp_path / "idx", corpus_id="unit-test", public_size=400,
                                                     progress=False), ids=ids)
    return tmp_path / "idx", x, ids


def test_round_trip_and_public_info(index_dir):
    path, x, ids = index_dir
    idx = verify(path)
    assert idx.count == 300 and idx.public_size == 400 and idx.dimension == 16
    assert np.array_equal(idx.ids, np.sort(ids))
    order = np.argsort(ids)
    assert np.allclose(idx.vectors, x[order], atol=1e-7)
    info = idx.public_info()
    assert "count" not in info and info["public_size"] == 400
    assert isinstance(idx.vectors.base, np.memmap) or isinstance(idx.vectors, np.memmap)
    res = idx.search_subsampled(x[order[0]], k=2, q=1.0, rng=np.random.default_rng(0))
    assert res.ids[0] == idx.ids[0]
    m = json.loads((path / "manifest.json").read_text())
    for key in ("format_version", "corpus_id", "encoder", "dimension", "count", "public_size", "faiss_factory",
                "quantizer", "files", "dedup", "index_version"):
        assert key in m
    assert m["files"]["vectors.npy"]["sha256"]


def test_truncated_vectors(index_dir):
    path = index_dir[0]
    data = (path / "vectors.npy").read_bytes()
    (path / "vectors.npy").write_bytes(data[:-100])
    with pytest.raises(IndexFormatError, match="truncated"):
        load(path)


def test_checksum_mismatch(index_dir):
    path = index_dir[0]
    raw = bytearray((path / "vectors.npy").read_bytes())
    raw[-5] ^= 0x01
    (path / "vectors.npy").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum mismatch"):
        load(path)
    load(path, verify_checksums=False)  # sizes still fine


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "unknown format version 99"),
        (lambda m: m.update(dimension=32), "dimension mismatch"),
        (lambda m: m.pop("public_size"), "missing field"),
        (lambda m: m.update(count=500), "count <= public_size"),
        (lambda m: m.update(format="other"), "format is"),
    ],
)
def test_bad_manifest(index_dir, edit, message):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match=message):
        load(path)


def test_missing_manifest_and_encoder_mismatch(index_dir, tmp_path):
    path = index_dir[0]
    with pytest.raises(IndexFormatError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(IndexFormatError, match="encoder"):
        load(path, expected_encoder=EncoderIdentity("other", "0" * 64, 16))
    (path / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        load(path)


def test_verify_detects_off_grid_vectors(tmp_path, index_dir):
    path = index_dir[0]
    vec = np.load(path / "vectors.npy")
    vec[0, 0] = np.float32(2.0**-30)  # representable in float32 but off the 2**-24 grid
    np.save(path / "vectors.npy", vec)
    m = json.loads((path / "manifest.json").read_text())
    from dprdm.index.format import file_entry

    m["files"]["vectors.npy"] = file_entry(path / "vectors.npy")
    (path / "manifest.json").write_text(json.dumps(m))
    load(path)
    with pytest.raises(IndexFormatError, match="grid"):
        verify(path)
