"""Shard sets (issue 15): the sharded search has the unsharded mechanism's law (chi-square against
the naive sampler), equals it bit for bit on the same survivors, and the split / load / verify rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_index_search import assert_selection_law_matches_naive

from dprdm.index import BuildConfig, IndexBuildError, IndexFormatError, build_from_vectors, load
from dprdm.index import format as F
from dprdm.index.sharded import ShardTopK, check_part, merge_topk, shard_topk
from dprdm.index.shardset import (
    ID_LIMIT,
    default_boundaries,
    default_shard_public_size,
    load_shard_set,
    read_shard_set,
    split_index,
    verify_shard_set,
)
from dprdm.index.testing import random_unit_vectors
from dprdm.models.fake import FakeEncoder


def _build(out: Path, x: np.ndarray, ids: np.ndarray, nbar: int, corpus: str = "corpus-s", **kw) -> Path:
    build_from_vectors(x, FakeEncoder(x.shape[1]).identity,
                       BuildConfig(output=out, corpus_id=corpus, public_size=nbar, progress=False, **kw), ids=ids)
    return out


def _hash_ids(n: int, seed: int) -> np.ndarray:
    """``n`` distinct ids spread over [0, 2**63), like the content-hash record ids."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.unique(rng.integers(0, ID_LIMIT, size=2 * n, dtype=np.int64)))[:n]


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    """200 records with 63-bit hash-like ids (N̄ 260, d 8), some exact duplicate vectors (score
    ties across shards), split by the default rule into 3 shards."""
    root = tmp_path_factory.mktemp("hashed")
    x = random_unit_vectors(200, 8, seed=5)
    x[100:120] = x[0:20]  # ties: the same vector under two ids, usually in different shards
    ids = _hash_ids(200, seed=6)
    src = _build(root / "src", x, ids, 260)
    split_index(src, root / "set", shards=3)
    return root


def test_selection_law_matches_the_naive_sampler(tmp_path):
    """The flat law case of test_index_search (10 records, N̄ 14, k 3, q 0.3), split into 3 shards
    (one of them empty), against the naive sampler's N̄ coins over the UNSHARDED index."""
    x0 = random_unit_vectors(10, 6, seed=3)
    ids0 = np.arange(10, dtype=np.int64) * 7 + 3
    src = _build(tmp_path / "src", x0, ids0, 14)
    split_index(src, tmp_path / "set", shards=3, boundaries=[30, 10**6], shard_public_sizes=[6, 10, 4])
    sharded, whole = load_shard_set(tmp_path / "set"), load(src)
    assert [int(np.count_nonzero(s.ids >= 0)) for s in sharded.shards] == [4, 6, 0]
    query = random_unit_vectors(1, 6, seed=9)[0]
    counts = assert_selection_law_matches_naive(sharded.search_subsampled, whole.vectors, whole.ids, whole.layout,
                                                query, k=3, q=0.3, trials=12000, seeds=(21, 22))
    assert all(set(t) <= set(ids0.tolist()) for t in counts)  # never a dummy or -1 id
    assert () in counts  # no survivor at all happens ((0.7)^10 ~ 3%) and gives no row


def test_same_bits_as_the_unsharded_search_on_the_same_survivors(hashed):
    sharded, whole = load_shard_set(hashed / "set"), load(hashed / "src")
    for i in range(8):
        u = random_unit_vectors(1, 8, seed=100 + i)[0] if i else random_unit_vectors(200, 8, seed=5)[0]
        for k in (1, 5, 40):
            a = sharded.search_subsampled(u, k=k, q=1.0, rng=np.random.default_rng(0))
            b = whole.search_subsampled(u, k=k, q=1.0, rng=np.random.default_rng(0))
            assert np.array_equal(a.ids, b.ids) and a.padded.tobytes() == b.padded.tobytes()
            assert a.scores.tobytes() == b.scores.tobytes() and a.aggregate().tobytes() == b.aggregate().tobytes()
    # query 0 is record 0's vector, stored twice (records 0 and 100): an exact tie, broken by id across shards
    top = sharded.search_subsampled(random_unit_vectors(200, 8, seed=5)[0], k=2, q=1.0, rng=np.random.default_rng(0))
    home = [next(i for i, s in enumerate(sharded.shards) if r in set(s.ids.tolist())) for r in top.ids]
    assert top.scores[0] == top.scores[1] and top.ids[0] < top.ids[1] and home[0] != home[1]


def test_merge_equals_topk_of_the_union_with_ties_and_short_parts():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k, parts, pool = int(rng.integers(1, 6)), [], []
        for s in range(3):
            n = int(rng.integers(0, 8))
            sc = rng.choice([0.5, 0.25, -0.125, 0.75], size=n)  # many exact ties
            ids = s * 1000 + rng.choice(1000, size=n, replace=False)
            pool += list(zip(sc.tolist(), ids.tolist(), strict=True))
            top = sorted(zip(sc.tolist(), ids.tolist(), strict=True), key=lambda t: (-t[0], t[1]))[:k]
            scores, pids = np.full(k, -np.inf), np.full(k, -1, np.int64)
            vecs = np.zeros((k, 2))
            for j, (a, b) in enumerate(top):
                scores[j], pids[j], vecs[j] = a, b, (a, b / 1e4)
            parts.append(ShardTopK(scores=scores, ids=pids, vectors=vecs))
        want = sorted(pool, key=lambda t: (-t[0], t[1]))[:k]
        got = merge_topk(parts, k)
        assert got.ids.tolist() == [b for _a, b in want] and got.padded.shape == (k, 2)
        assert np.all(got.padded[len(want):] == 0) and "redacted" in repr(parts[0])


def test_check_part_refuses_what_a_misrouted_or_broken_shard_sends(hashed):
    sharded = load_shard_set(hashed / "set")
    entry = sharded.manifest["shards"][1]
    u = random_unit_vectors(1, 8, seed=3)[0]
    part = shard_topk(sharded.shards[1], u, k=4, q=1.0, rng=np.random.default_rng(0))
    check_part(part, k=4, dimension=8, first_id=entry["id_first"], last_id=entry["id_last"])
    other = sharded.manifest["shards"][0]
    with pytest.raises(ValueError, match="outside this shard's range"):
        check_part(part, k=4, dimension=8, first_id=other["id_first"], last_id=other["id_last"])
    swapped = ShardTopK(scores=part.scores[::-1].copy(), ids=part.ids[::-1].copy(), vectors=part.vectors)
    with pytest.raises(ValueError, match="strict order"):
        check_part(swapped, k=4, dimension=8, first_id=0, last_id=ID_LIMIT - 1)
    with pytest.raises(ValueError, match="expected 5 rows"):
        check_part(part, k=5, dimension=8, first_id=0, last_id=ID_LIMIT - 1)
    holes = ShardTopK(scores=np.array([0.5, -np.inf, 0.1, -np.inf]), ids=np.array([1, -1, 2, -1]),
                      vectors=np.zeros((4, 8)))
    with pytest.raises(ValueError, match="prefix"):
        check_part(holes, k=4, dimension=8, first_id=0, last_id=ID_LIMIT - 1)


def test_default_split_rule_and_manifest(hashed):
    m = read_shard_set(hashed / "set")
    assert [e["id_first"] for e in m["shards"]] == default_boundaries(3) == [0, ID_LIMIT // 3, 2 * ID_LIMIT // 3]
    assert [e["public_size"] for e in m["shards"]] == [default_shard_public_size(260, 3)] * 3 == [143] * 3
    assert m["public_size"] == 260 and m["count"] == 200 and m["corpus_id"] == "corpus-s"
    sharded = verify_shard_set(hashed / "set")
    assert sum(s.count for s in sharded.shards) == 200 and sharded.public_info()["public_size"] == 260
    assert all(40 < s.count < 100 for s in sharded.shards)  # hash ids spread over the even ranges
    assert "count" not in sharded.public_info()


def test_split_refusals(tmp_path, hashed):
    small = _build(tmp_path / "seq", random_unit_vectors(50, 4, seed=1), np.arange(50), 60)
    with pytest.raises(IndexBuildError, match="shard 0 .* holds 50 records .* more than its public size 30"):
        split_index(small, tmp_path / "a", shards=2, shard_public_sizes=[30])  # ids 0..49: all in shard 0
    assert not (tmp_path / "a").exists()
    with pytest.raises(IndexBuildError, match="add up to 50 < the index's public size"):
        split_index(small, tmp_path / "b", shards=2, boundaries=[25], shard_public_sizes=[25])
    for bad in ([0], [30, 20], [ID_LIMIT]):
        with pytest.raises(IndexBuildError, match="--boundaries"):
            split_index(small, tmp_path / "c", shards=len(bad) + 1, boundaries=bad, shard_public_sizes=[60])
    with pytest.raises(IndexBuildError, match="--shards must be"):
        split_index(small, tmp_path / "d", shards=0)
    with pytest.raises(IndexBuildError, match="already exists"):
        split_index(small, hashed / "set", shards=2, boundaries=[25], shard_public_sizes=[30])
    ivf = _build(tmp_path / "ivf", random_unit_vectors(40, 4, seed=2), np.arange(40), 60, index_type="ivf",
                 nlist=2, private=False)
    with pytest.raises(IndexBuildError, match="only flat indexes can be split"):
        split_index(ivf, tmp_path / "e", shards=2, boundaries=[20], shard_public_sizes=[40])
    split_index(small, tmp_path / "ok", shards=2, boundaries=[25], shard_public_sizes=[30])  # explicit plan works


@pytest.fixture()
def copy_set(tmp_path, hashed):
    dst = tmp_path / "set"
    shutil.copytree(hashed / "set", dst)
    return dst


def test_missing_shard(copy_set):
    shutil.rmtree(copy_set / "shard-0002")
    with pytest.raises(IndexFormatError, match=r"shard 2 \(shard-0002\) is missing"):
        load_shard_set(copy_set)


def test_checksum_mismatch_of_a_data_file_is_caught_through_the_stamp(copy_set):
    path = copy_set / "shard-0001" / "vectors.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))  # same size, new mtime/ctime: the stamp no longer applies
    with pytest.raises(IndexFormatError, match="vectors.npy: checksum mismatch"):
        load_shard_set(copy_set, prefault=False)


def test_a_shard_of_another_corpus_or_another_split_is_refused(copy_set, tmp_path):
    other = tmp_path / "other"
    x = random_unit_vectors(30, 8, seed=7)
    _build(other / "src", x, _hash_ids(30, seed=8), 60, corpus="corpus-t")
    split_index(other / "src", other / "set", shards=3)
    shutil.rmtree(copy_set / "shard-0001")
    shutil.copytree(other / "set" / "shard-0001", copy_set / "shard-0001")
    with pytest.raises(IndexFormatError, match="corpus id 'corpus-t' differs from the shard set's 'corpus-s'"):
        load_shard_set(copy_set)
    shutil.rmtree(copy_set / "shard-0001")
    shutil.copytree(copy_set / "shard-0000", copy_set / "shard-0001")  # the same corpus, the wrong shard
    with pytest.raises(IndexFormatError, match="shard-0001/manifest.json: checksum mismatch: manifest seal"):
        load_shard_set(copy_set)


def test_edited_set_manifest_is_refused(copy_set):
    path = copy_set / "shardset.json"
    m = json.loads(path.read_text())
    m["public_size"] = 10**6
    path.write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match="edited after the split"):
        load_shard_set(copy_set)
    with pytest.raises(IndexFormatError, match="is not a shard set"):
        load_shard_set(copy_set / "shard-0000")


def test_start_uses_the_verified_at_build_stamp_and_verify_rehashes(copy_set, monkeypatch):
    hashed_files: list[str] = []
    real = F.sha256_file
    monkeypatch.setattr(F, "sha256_file", lambda p, *a: hashed_files.append(Path(p).name) or real(p, *a))
    load_shard_set(copy_set)  # a copy: new inodes, so each file is hashed once and re-stamped
    first = len(hashed_files)
    hashed_files.clear()
    load_shard_set(copy_set)
    assert first == 6 and hashed_files == []  # 3 shards x (vectors, ids); then nothing re-hashed
    load_shard_set(copy_set, use_stamp=False)
    assert sorted(hashed_files) == ["ids.npy"] * 3 + ["vectors.npy"] * 3


def test_split_and_verify_set_commands(tmp_path, hashed, capsys):
    from dprdm.cli.main import main

    assert main(["index", "split", str(hashed / "src"), str(tmp_path / "s"), "--shards", "2",
                 "--shard-public-size", "150,150"]) == 0
    assert "shard public sizes 150, 150 (set public size 260)" in capsys.readouterr().out
    assert main(["index", "verify-set", str(tmp_path / "s")]) == 0
    assert "2 shards: every manifest seal, file checksum and stored row verified" in capsys.readouterr().out
    assert main(["index", "split", str(hashed / "src"), str(tmp_path / "t"), "--shards", "2",
                 "--shard-public-size", "100"]) == 2
    assert "add up to 200 < the index's public size" in capsys.readouterr().err
