"""On-disk format: round trip, verified loading, clear errors on corrupt directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dprdm.index import BuildConfig, IndexFormatError, build_from_vectors, load, verify
from dprdm.index.format import SEAL_FIELD, index_version_of, is_sealed, seal, write_manifest
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
    assert idx.vectors.shape == (400, 16) and idx.group_size == 1  # padded to N̄ (format 2)
    assert np.array_equal(idx.ids[:300], np.sort(ids)) and np.all(idx.ids[300:] == -1)
    order = np.argsort(ids)
    assert np.allclose(idx.vectors[:300], x[order], atol=1e-7)
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
    _save(path, m)
    load(path)
    with pytest.raises(IndexFormatError, match="grid"):
        verify(path)


def _rewrite(path, name, arr, m):
    from dprdm.index.format import file_entry

    np.save(path / name, arr)
    m["files"][name] = file_entry(path / name)


def _save(path, m, *, sealed=True):
    """Write a consistent manifest (index version and, unless an old unsealed one, the seal), as
    a build or someone rewriting every checksum would."""
    m["index_version"] = index_version_of(m["corpus_id"], m["files"])
    if sealed:
        write_manifest(path, m)
    else:
        m.pop(SEAL_FIELD, None)
        (path / "manifest.json").write_text(json.dumps(m))


def test_verify_detects_private_data_in_filler(index_dir):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    vec = np.load(path / "vectors.npy")
    vec[350] = vec[0]  # a filler row (id -1) holding a record's vector
    _rewrite(path, "vectors.npy", vec, m)
    _save(path, m)
    with pytest.raises(IndexFormatError, match="public filler"):
        verify(path)


def test_bad_filler_ids_refused(index_dir):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    ids = np.load(path / "ids.npy")
    ids[399] = 12345  # a 301st "record" where the filler is
    _rewrite(path, "ids.npy", ids, m)
    _save(path, m)
    with pytest.raises(IndexFormatError, match="expected 300 record ids"):
        load(path)


def test_format_1_index_still_loads_padded(index_dir):
    """An index written by format 1 (N unpadded rows) loads, padded in memory, with the same results."""
    path, x, ids = index_dir
    new = load(path)
    new_vectors, new_ids = np.array(new.vectors), np.array(new.ids)
    u = x[3].astype(np.float64)
    b = new.search_subsampled(u, k=5, q=0.5, rng=np.random.default_rng(4))
    del new  # its memory map is about to be replaced
    m = json.loads((path / "manifest.json").read_text())
    _rewrite(path, "vectors.npy", np.load(path / "vectors.npy")[:300], m)
    _rewrite(path, "ids.npy", np.load(path / "ids.npy")[:300], m)
    for key in ("storage_rows", "group_size", "storage"):
        m.pop(key)
    m["format_version"] = 1
    _save(path, m, sealed=False)  # format 1 predates the seal
    old = verify(path)
    assert old.vectors.shape == (400, 16) and np.array_equal(old.ids, new_ids)
    assert np.array_equal(old.vectors, new_vectors) and old.group_size == 1
    a = old.search_subsampled(u, k=5, q=0.5, rng=np.random.default_rng(4))
    assert a.ids.tolist() == b.ids.tolist()


def test_format_1_ivf_index_still_loads_padded(tmp_path):
    enc = FakeEncoder(16)
    np.save(tmp_path / "public.npy", random_unit_vectors(300, 16, seed=5))
    x = random_unit_vectors(120, 16, seed=6)
    cfg = BuildConfig(output=tmp_path / "ivf", corpus_id="unit-test", public_size=150, index_type="ivf", nlist=4,
                      nprobe=2, train_vectors=tmp_path / "public.npy", progress=False)
    path = build_from_vectors(x, enc.identity, cfg).path
    new = load(path)
    vec, ids, lay = np.array(new.vectors), np.array(new.ids), new.layout
    u = x[7].astype(np.float64)
    want = new.search_subsampled(u, k=6, q=0.6, rng=np.random.default_rng(2)).ids.tolist()
    del new
    real_rows = np.flatnonzero(ids >= 0)  # storage order (list, id): the format 1 order too
    sizes = [int(np.count_nonzero(ids[s : s + c] >= 0)) for s, c in zip(lay.starts, lay.capacities, strict=True)]
    m = json.loads((path / "manifest.json").read_text())
    _rewrite(path, "vectors.npy", vec[real_rows], m)
    _rewrite(path, "ids.npy", ids[real_rows], m)
    _rewrite(path, "list_offsets.npy", np.r_[0, np.cumsum(sizes)].astype(np.int64), m)
    for key in ("storage_rows", "group_size", "storage"):
        m.pop(key)
    m["format_version"] = 1
    _save(path, m, sealed=False)  # format 1 predates the seal
    old = verify(path)
    assert np.array_equal(old.ids, ids) and np.array_equal(old.vectors, vec) and old.group_size == 2
    assert old.search_subsampled(u, k=6, q=0.6, rng=np.random.default_rng(2)).ids.tolist() == want


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(private=False),
        lambda m: m.update(corpus_id="another-domain"),
        lambda m: m.update(public_size=m["public_size"] + 1000),
        lambda m: m.update(record_unit="owner"),
        lambda m: m["files"]["vectors.npy"].update(sha256="0" * 64),
    ],
)
def test_manifest_fields_are_covered_by_the_seal(index_dir, edit):
    """Issue 13 item 7: editing the manifest's own fields is refused like a changed data file."""
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    assert is_sealed(m)
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2))
    for check in (load, verify):
        with pytest.raises(IndexFormatError, match="edited after the build"):
            check(path)


def test_seal_is_canonical_json_and_reformatting_keeps_it(index_dir):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(reversed(list(m.items())))))  # key order, spacing
    verify(path)


def test_old_unsealed_manifest_loads_and_seal_seals_it(index_dir):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    m.pop(SEAL_FIELD)
    (path / "manifest.json").write_text(json.dumps(m))
    assert not is_sealed(verify(path).manifest)  # still loadable; the CLI reports it as unsealed
    assert seal(path) is True
    assert is_sealed(verify(path).manifest) and seal(path) is False
    sealed = json.loads((path / "manifest.json").read_text())
    sealed["private"] = False
    (path / "manifest.json").write_text(json.dumps(sealed))
    with pytest.raises(IndexFormatError, match="edited after the build"):
        seal(path)  # a sealed manifest that was edited is never re-sealed


def test_unsealed_corpus_id_edit_is_caught_by_the_index_version(index_dir):
    path = index_dir[0]
    m = json.loads((path / "manifest.json").read_text())
    m.pop(SEAL_FIELD)
    m["corpus_id"] = "another-domain"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match="was corpus_id edited"):
        verify(path)
    with pytest.raises(IndexFormatError, match="was corpus_id edited"):
        seal(path)
