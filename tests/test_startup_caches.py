"""The start-up caches of issue 13 item 11 are correct: a verified-checksum cache that still detects a
changed vector file, and a disk cache of discrete-noise RDP curves that returns exactly the fresh
curve and rejects an edited entry. (No wall-clock assertions.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dprdm.index import BuildConfig, build_from_vectors
from dprdm.index.checksum_cache import CACHE_FILE, ChecksumCache
from dprdm.index.errors import IndexFormatError
from dprdm.index.format import load
from dprdm.models.fake import FakeEncoder
from dprdm.privacy import DEFAULT_ORDERS, Profile, mechanism_rdp
from dprdm.server.curve_cache import cached_charge


def _index(tmp_path: Path, n: int = 50, d: int = 8) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = tmp_path / "idx"
    build_from_vectors(x, FakeEncoder(d).identity, BuildConfig(output=out, corpus_id="c", public_size=64, progress=False))
    return out


def test_checksum_cache_skips_rehash_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    idx, cache_dir = _index(tmp_path), tmp_path / "data"
    load(idx, checksum_cache=cache_dir)
    entries = json.loads((cache_dir / CACHE_FILE).read_text())
    vec = os.path.realpath(idx / "vectors.npy")
    assert vec in entries and len(entries[vec]["sha256"]) == 64
    cache = ChecksumCache(cache_dir)
    assert cache.sha256(idx / "vectors.npy") == entries[vec]["sha256"] and cache.hits == 1
    # Same size, one byte changed (a new mtime/ctime): re-hashed and refused.
    raw = bytearray((idx / "vectors.npy").read_bytes())
    raw[-1] ^= 0x01
    (idx / "vectors.npy").write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum mismatch"):
        load(idx, checksum_cache=cache_dir)


def test_checksum_cache_detects_a_write_with_the_mtime_put_back(tmp_path: Path) -> None:
    idx, cache_dir = _index(tmp_path), tmp_path / "data"
    load(idx, checksum_cache=cache_dir)
    path = idx / "vectors.npy"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves: the entry is stale
    with pytest.raises(IndexFormatError, match="checksum mismatch"):
        load(idx, checksum_cache=cache_dir)


def test_checksum_cache_entry_with_a_forged_digest_is_still_compared_with_the_manifest(tmp_path: Path) -> None:
    idx, cache_dir = _index(tmp_path), tmp_path / "data"
    load(idx, checksum_cache=cache_dir)
    entries = json.loads((cache_dir / CACHE_FILE).read_text())
    vec = os.path.realpath(idx / "vectors.npy")
    entries[vec]["sha256"] = "0" * 64
    (cache_dir / CACHE_FILE).write_text(json.dumps(entries))
    with pytest.raises(IndexFormatError, match="checksum mismatch"):
        load(idx, checksum_cache=cache_dir)


@pytest.mark.parametrize("group", [1, 2])
def test_cached_curve_equals_a_fresh_one_and_an_edited_entry_is_rejected(tmp_path: Path, group: int) -> None:
    profile = Profile(k=16, q=0.2, sigma=0.43, lam=1.0)
    fresh = mechanism_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=32, group_size=group)
    first = cached_charge(profile, orders=DEFAULT_ORDERS, hardened_dimension=32, group_size=group, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    again = cached_charge(profile, orders=DEFAULT_ORDERS, hardened_dimension=32, group_size=group, cache_dir=tmp_path)
    assert np.array_equal(first, fresh) and np.array_equal(again, fresh)
    doc = json.loads(entry.read_text())
    doc["curve"] = [float(v * 0.5).hex() for v in fresh]  # a lowered charge
    entry.write_text(json.dumps(doc))
    assert np.array_equal(
        cached_charge(profile, orders=DEFAULT_ORDERS, hardened_dimension=32, group_size=group, cache_dir=tmp_path), fresh
    )
    assert np.array_equal(np.array([float.fromhex(v) for v in json.loads(entry.read_text())["curve"]]), fresh)


def test_curve_cache_is_keyed_by_the_mechanism(tmp_path: Path) -> None:
    a, b = Profile(k=16, q=0.2, sigma=0.43, lam=1.0), Profile(k=16, q=0.2, sigma=0.5, lam=1.0)
    for profile, dim in ((a, 32), (b, 32), (a, 64)):
        got = cached_charge(profile, orders=DEFAULT_ORDERS, hardened_dimension=dim, group_size=1, cache_dir=tmp_path)
        assert np.array_equal(got, mechanism_rdp(profile, orders=DEFAULT_ORDERS, hardened_dimension=dim))
    assert len(list(tmp_path.glob("*.json"))) == 3
