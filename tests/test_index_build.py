"""Index building: readers, 1-stable dedup, owners, corrupt files, resume, IVF policy."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dprdm.index import (
    BuildConfig,
    IndexBuildError,
    PrivacyPolicyError,
    build_from_vectors,
    build_index,
    load,
    verify,
)
from dprdm.index.readers import FolderReader, ListReader, ParquetReader, WebDatasetReader, open_reader
from dprdm.index.records import owner_record_id, record_id_from_digest
from dprdm.index.testing import make_image, random_unit_vectors, write_image_folder
from dprdm.models.fake import FakeEncoder

D = 16


def _cfg(out, **kw):
    kw.setdefault("corpus_id", "test-corpus")
    kw.setdefault("public_size", 100)
    kw.setdefault("progress", False)
    return BuildConfig(output=out, **kw)


def _png(seed):
    buf = io.BytesIO()
    make_image(seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    paths = write_image_folder(root, 24)
    shutil.copy(paths[0], root / "a" / "dup_of_0.png")  # exact duplicate
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root, paths


def _embed(enc, path):
    return enc.encode_images([Image.open(path).convert("RGB")])[0].astype(np.float64)


def test_folder_build_dedup_and_unreadable(tmp_path, corpus):
    root, paths = corpus
    enc = FakeEncoder(D)
    res = build_index(FolderReader(root), enc, _cfg(tmp_path / "idx", batch_size=5, shard_size=7))
    idx = verify(res.path)
    m = res.manifest
    assert idx.count == 24 and m["dedup"]["exact_duplicates_dropped"] == 1
    assert m["dedup"]["unreadable_or_skipped"] == 2 and m["dedup"]["items_seen"] == 27
    report = json.loads((res.path / "reports" / "build_report.json").read_text())
    assert sorted(e["key"] for e in report["unreadable_or_skipped"]) == ["a/broken.jpg", "b/empty.png"]
    rid = record_id_from_digest(hashlib.sha256(paths[5].read_bytes()).digest())
    row = int(np.flatnonzero(idx.ids == rid)[0])
    assert np.allclose(idx.vectors[row], _embed(enc, paths[5]), atol=1e-6)
    assert not (res.path / ".build").exists()
    assert "1-stable" in m["preprocessing"]
    hit = idx.search_subsampled(_embed(enc, paths[5]), k=1, q=1.0, rng=np.random.default_rng(0))
    assert hit.ids.tolist() == [rid]


class _Crash(Exception):
    pass


class _CrashingEncoder(FakeEncoder):
    def __init__(self, crash_at: int) -> None:
        super().__init__(D)
        self.crash_at = crash_at

    def encode_images(self, images):
        if self.calls + 1 == self.crash_at:
            raise _Crash()
        return super().encode_images(images)


def test_resume_after_crash_gives_identical_index(tmp_path, corpus):
    root, _ = corpus
    fresh = build_index(FolderReader(root), FakeEncoder(D), _cfg(tmp_path / "fresh", batch_size=3, shard_size=6))
    out = tmp_path / "crashy"
    with pytest.raises(_Crash):
        build_index(FolderReader(root), _CrashingEncoder(5), _cfg(out, batch_size=3, shard_size=6))
    assert not (out / "manifest.json").exists() and list((out / ".build").glob("shard-*.meta.json"))
    with pytest.raises(IndexBuildError, match="already exists; pass --resume"):
        build_index(FolderReader(root), FakeEncoder(D), _cfg(out, batch_size=3, shard_size=6))
    enc = FakeEncoder(D)
    build_index(FolderReader(root), enc, _cfg(out, batch_size=3, shard_size=6, existing="resume"))
    assert enc.calls < 9  # only the remaining shards were embedded
    for name in ("vectors.npy", "ids.npy"):
        assert (out / name).read_bytes() == (fresh.path / name).read_bytes()
    assert json.loads((out / "manifest.json").read_text())["dedup"] == fresh.manifest["dedup"]
    with pytest.raises(IndexBuildError, match="finished index"):
        build_index(FolderReader(root), FakeEncoder(D), _cfg(out, existing="resume"))


def test_resume_refuses_changed_inputs_and_overwrite_rules(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "x"
    with pytest.raises(_Crash):
        build_index(FolderReader(root), _CrashingEncoder(3), _cfg(out, batch_size=2, shard_size=4))
    with pytest.raises(IndexBuildError, match="different inputs or encoder"):
        build_index(FolderReader(root), FakeEncoder(D + 1), _cfg(out, existing="resume"))
    build_index(FolderReader(root), FakeEncoder(D), _cfg(out, existing="overwrite"))
    load(out)
    stranger = tmp_path / "precious"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("keep me")
    with pytest.raises(IndexBuildError, match="not an index directory"):
        build_index(FolderReader(root), FakeEncoder(D), _cfg(stranger, existing="overwrite"))
    assert (stranger / "thesis.tex").exists()


def test_public_size_must_cover_records(tmp_path, corpus):
    with pytest.raises(IndexBuildError, match="--public-size 10 is smaller"):
        build_index(FolderReader(corpus[0]), FakeEncoder(D), _cfg(tmp_path / "i", public_size=10))


def test_owner_records_are_mean_of_distinct_images(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(4):
        (img / f"{i}.png").write_bytes(_png(i))
    (img / "copy0.png").write_bytes(_png(0))
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/0.png\talice\nimgs/1.png\talice\nimgs/copy0.png\talice\n"
                       "imgs/0.png\tbob\nimgs/2.png\tbob\n# comment\nimgs/3.png\tcarol\n")
    enc = FakeEncoder(D)
    res = build_index(ListReader(listing), enc, _cfg(tmp_path / "idx"))
    idx = load(res.path)
    assert idx.count == 3 and res.manifest["record_unit"] == "owner"
    assert res.manifest["dedup"]["exact_duplicates_dropped"] == 1  # copy0 within alice only
    e = {i: _embed(enc, img / f"{i}.png") for i in range(4)}
    for owner, members in {"alice": [0, 1], "bob": [0, 2], "carol": [3]}.items():
        mean = sum(e[i] for i in members)
        row = int(np.flatnonzero(idx.ids == owner_record_id(owner))[0])
        assert np.allclose(idx.vectors[row], mean / np.linalg.norm(mean), atol=1e-6)


def test_parquet_inputs(tmp_path):
    rows = [_png(i) for i in range(6)]
    table = pa.table({"img": [{"bytes": b} for b in rows[:5]] + [{"bytes": None}],
                      "who": ["u1", "u1", "u2", "u3", "u3", "u4"]})
    pq.write_table(table, tmp_path / "a.parquet")
    res = build_index(open_reader([str(tmp_path / "a.parquet")], image_column="img", owner_column="who"),
                      FakeEncoder(D), _cfg(tmp_path / "i1"))
    assert load(res.path).count == 3 and res.manifest["dedup"]["unreadable_or_skipped"] == 1
    for i, b in enumerate(rows):
        (tmp_path / f"p{i}.png").write_bytes(b)
    pq.write_table(pa.table({"path": [f"p{i}.png" for i in range(6)] + ["missing.png"]}), tmp_path / "b.parquet")
    reader = ParquetReader([tmp_path / "b.parquet"], path_column="path")
    res2 = build_index(reader, FakeEncoder(D), _cfg(tmp_path / "i2"))
    assert load(res2.path).count == 6 and res2.manifest["dedup"]["unreadable_or_skipped"] == 1
    assert [it.key for it in reader.iter_from(5)] == ["p5.png", "missing.png"]
    with pytest.raises(IndexBuildError, match="no column 'nope'"):
        ParquetReader([tmp_path / "b.parquet"], path_column="nope")


def test_webdataset_input_with_corrupt_tail(tmp_path):
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            for ext, data in (("png", _png(i)), ("owner", f"o{i % 2}".encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    good = shard.read_bytes()
    bad = tmp_path / "s-001.tar"
    bad.write_bytes(good[: len(good) // 2])
    items = list(WebDatasetReader([shard, bad], owner_field="owner").iter_from(0))
    assert [it.owner for it in items[:5]] == ["o0", "o1", "o0", "o1", "o0"]
    assert items[-1].error is not None and "corrupt" in items[-1].error
    res = build_index(WebDatasetReader([shard, bad]), FakeEncoder(D), _cfg(tmp_path / "w"))
    assert load(res.path).count == 5 and res.manifest["dedup"]["unreadable_or_skipped"] >= 1


# -- IVF ---------------------------------------------------------------------------------------


def test_ivf_build_matches_exact_search_when_all_lists_probed(tmp_path):
    enc = FakeEncoder(D)
    public = random_unit_vectors(400, D, seed=7)
    np.save(tmp_path / "public.npy", public)
    private = random_unit_vectors(150, D, seed=8)
    flat = build_from_vectors(private, enc.identity, _cfg(tmp_path / "flat", public_size=200))
    ivf = build_from_vectors(private, enc.identity, _cfg(tmp_path / "ivf", public_size=200, index_type="ivf",
                                                          train_vectors=tmp_path / "public.npy", nlist=6, nprobe=2))
    m = ivf.manifest
    assert m["faiss_factory"] == "IVF6,Flat" and m["quantizer"]["trained_on"] == "public"
    assert m["quantizer"]["kind"] == "npy" and m["ivf"]["total_capacity"] >= 400  # slack 2 * N̄
    a, b = verify(flat.path), verify(ivf.path)
    assert "list_offsets" not in json.dumps(b.public_info())
    for qi in range(5):
        u = random_unit_vectors(1, D, seed=100 + qi)[0]
        r1 = a.search_subsampled(u, k=7, q=1.0, rng=np.random.default_rng(0))
        r2 = b.search_subsampled(u, k=7, q=1.0, rng=np.random.default_rng(0), nprobe=6)
        assert r1.ids.tolist() == r2.ids.tolist()
        part = b.search_subsampled(u, k=7, q=1.0, rng=np.random.default_rng(0))  # nprobe 2
        lists = set(b.layout.probe(u).tolist())
        starts, caps = b.layout.starts, b.layout.capacities
        allowed = {int(b.ids[r]) for li in lists for r in range(starts[li], starts[li] + caps[li]) if b.ids[r] >= 0}
        assert set(part.ids.tolist()) <= allowed
    assert b.vectors.shape[0] == m["ivf"]["total_capacity"] == m["storage_rows"]  # padded to the capacities
    assert m["group_size"] == 2 and b.group_size == 2


def test_ivf_policy_refusals(tmp_path):
    enc = FakeEncoder(D)
    x = random_unit_vectors(50, D, seed=1)
    with pytest.raises(PrivacyPolicyError, match="PUBLIC vectors.*amplification"):
        _cfg(tmp_path / "a", index_type="ivf", nlist=4)
    with pytest.raises(PrivacyPolicyError, match="refused for a private index.*amplification"):
        _cfg(tmp_path / "a", index_type="hnsw")
    with pytest.raises(PrivacyPolicyError, match="refused for a private index"):
        _cfg(tmp_path / "a", index_type="HNSW32")
    private = build_from_vectors(x, enc.identity, _cfg(tmp_path / "priv"))
    with pytest.raises(PrivacyPolicyError, match="is a PRIVATE index"):
        build_from_vectors(x, enc.identity, _cfg(tmp_path / "b", index_type="ivf", nlist=2,
                                                 train_vectors=private.path))
    public = build_from_vectors(random_unit_vectors(80, D, 3), enc.identity, _cfg(tmp_path / "pub", private=False))
    ok = build_from_vectors(x, enc.identity, _cfg(tmp_path / "c", index_type="ivf", nlist=2,
                                                  train_vectors=public.path))
    assert ok.manifest["quantizer"]["kind"] == "index"


def _stored(path):
    idx = load(path)
    return {int(i) for i in idx.ids if i >= 0}


def test_ivf_overflow_never_fails_and_neighbours_differ_in_at_most_two_records(tmp_path):
    """Lists over their public capacity keep their smallest ids; the build completes; adding one
    record changes the stored set by at most one addition and one removal (ivf docstring)."""
    enc = FakeEncoder(D)
    one_sided = np.tile(np.eye(D)[:1], (40, 1)) + random_unit_vectors(40, D, 4) * 0.01
    np.save(tmp_path / "skewed.npy", np.vstack([one_sided, -one_sided]))
    x = np.tile(np.eye(D)[:1], (50, 1)) + random_unit_vectors(50, D, 1) * 0.01  # all in one list
    ids = np.random.default_rng(0).permutation(10**6)[:50] + 1
    cfg = dict(index_type="ivf", nlist=2, public_size=60, capacity_slack=1.0, min_capacity=4,
               train_vectors=tmp_path / "skewed.npy")
    base = build_from_vectors(x, enc.identity, _cfg(tmp_path / "base", **cfg), ids=ids[:50])
    report = json.loads((tmp_path / "base" / "reports" / "build_report.json").read_text())
    cap = int(max(np.load(tmp_path / "base" / "capacities.npy")))
    assert report["ivf_overflow"]["lists"] == 1 and report["ivf_overflow"]["records_dropped"] == 50 - cap
    assert base.manifest["count"] == cap and base.manifest["group_size"] == 2
    kept = _stored(base.path)
    assert kept == set(np.sort(ids[:50])[:cap].tolist())  # the cap smallest ids of the list
    verify(base.path)
    # neighbours: add one record whose id is small (pushes one out), or large (changes nothing)
    for new_id, expect in ((0, 2), (10**7, 0)):  # ids[:50] are in [1, 10**6]
        out = tmp_path / f"plus{new_id}"
        build_from_vectors(np.vstack([x, x[:1] * 0.999 + 0.001]), enc.identity, _cfg(out, **cfg),
                           ids=np.r_[ids[:50], new_id])
        after = _stored(out)
        assert len(kept ^ after) == expect and len(after - kept) <= 1 and len(kept - after) <= 1
        assert (new_id in after) == (expect == 2)
    # exact search over what is stored: q = 1, all lists probed = brute-force top-k of the kept records
    idx = load(base.path)
    u = random_unit_vectors(1, D, seed=3)[0].astype(np.float64)
    res = idx.search_subsampled(u, k=5, q=1.0, rng=np.random.default_rng(0), nprobe=2)
    real = np.flatnonzero(idx.ids >= 0)
    from dprdm.index.search import exact_scores, quantize_query

    sc = exact_scores(idx.vectors, real, quantize_query(u, D))
    top = real[np.lexsort((idx.ids[real], -sc))[:5]]
    assert res.ids.tolist() == idx.ids[top].tolist()


def test_place_records_neighbour_property():
    """Randomized check of the proof: one added record changes at most one other record's membership."""
    from dprdm.index.ivf import place_records

    rng = np.random.default_rng(0)
    for _ in range(300):
        nlist, n = int(rng.integers(1, 5)), int(rng.integers(0, 40))
        caps = rng.integers(1, 12, size=nlist)
        ids = np.sort(rng.choice(1000, size=n + 1, replace=False))
        lists = rng.integers(0, nlist, size=n + 1)
        drop = int(rng.integers(0, n + 1))  # the neighbour without record `drop`
        keep = np.r_[0:drop, drop + 1 : n + 1]

        def stored(sel, ids=ids, lists=lists, caps=caps):
            src, _ = place_records(lists[sel], caps)
            assert src.size == caps.sum()
            return {int(ids[sel][i]) for i in src if i >= 0}

        a, b = stored(np.arange(n + 1)), stored(keep)
        assert len(a - b) <= 2 and len(b - a) <= 1 and len(a ^ b) <= 2
        assert all(len({i for i in a if lists[np.searchsorted(ids, i)] == li}) <= caps[li] for li in range(nlist))


# -- partitioned finalize --------------------------------------------------------------------------


def _random_metas(rng, owner_mode, shards=5):
    """Shard metas with duplicates inside and across shards (and, with owners, shared images)."""
    pool = [hashlib.sha256(bytes([i])).hexdigest() for i in range(12)]
    metas, start = [], 0
    for s in range(shards):
        k = int(rng.integers(0, 9))
        digests = [pool[int(i)] for i in rng.integers(0, len(pool), size=k)]
        owners = [f"owner-{int(i)}" for i in rng.integers(0, 4, size=k)] if owner_mode else None
        metas.append({"shard": s, "start": start, "end": start + k + 1, "vectors": f"shard-{s:06d}.vectors.npy",
                      "keys": [f"k{start + i}\tx" for i in range(k)], "digests": digests, "owners": owners,
                      "errors": [{"key": f"bad{s}", "error": "e"}], "duplicates": 0})
        start += k + 1
    return metas


@pytest.mark.parametrize("owner_mode", [False, True])
def test_partitioned_dedup_equals_the_in_memory_reference(tmp_path, owner_mode):
    from dprdm.index.records import deduplicate, deduplicate_partitioned

    rng = np.random.default_rng(3)
    for trial in range(30):
        metas = _random_metas(rng, owner_mode)
        ref = deduplicate(metas, owner_mode)
        for rows in (1, 2, 5, 1 << 20):
            got = deduplicate_partitioned(tmp_path, metas, owner_mode, partition_rows=rows)
            assert got["ids"].tolist() == ref["ids"].tolist(), (trial, rows)
            assert got["dest"].tolist() == ref["dest"].tolist(), (trial, rows)
            assert (got["images"], got["late_duplicates"]) == (ref["images"], ref["late_duplicates"])
            lines = got["sources"].read_text(encoding="utf-8")
            assert lines == "".join(f"{r}\t{s}\n" for r, s in sorted(ref["sources"].items()))
            assert got["errors"] == [e for m in metas for e in m["errors"]]
    with pytest.raises(IndexBuildError, match="partition_rows must be >= 1; found 0"):
        deduplicate_partitioned(tmp_path, metas, owner_mode, partition_rows=0)


def test_partitioned_dedup_detects_record_id_collisions(tmp_path):
    from dprdm.index.records import deduplicate_partitioned

    a = "ab" * 32
    b = "ab" * 8 + "cd" * 24  # same first 63 bits, another image
    meta = {"shard": 0, "start": 0, "end": 2, "vectors": "v", "keys": ["a", "b"], "digests": [a, b],
            "owners": None, "errors": [], "duplicates": 0}
    for rows in (1, 1 << 20):
        with pytest.raises(IndexBuildError, match="record id collision"):
            deduplicate_partitioned(tmp_path, [meta], False, partition_rows=rows)


def _index_files(path):
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    for volatile in ("created_utc", "manifest_sha256"):
        manifest.pop(volatile)
    return files, manifest


def test_tiny_finalize_partitions_give_the_same_index_byte_for_byte(tmp_path, corpus):
    root, _ = corpus
    default = build_index(FolderReader(root), FakeEncoder(D), _cfg(tmp_path / "a", batch_size=4, shard_size=5))
    tiny = build_index(FolderReader(root), FakeEncoder(D),
                       _cfg(tmp_path / "b", batch_size=4, shard_size=5, partition_rows=1))
    assert _index_files(default.path) == _index_files(tiny.path)
    assert default.manifest["dedup"]["exact_duplicates_dropped"] == 1 and default.manifest["count"] == 24
    with pytest.raises(IndexBuildError, match="partition_rows must be a positive integer; found 0"):
        _cfg(tmp_path / "c", partition_rows=0)


def test_tiny_finalize_partitions_owner_build(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(6):
        (img / f"{i}.png").write_bytes(_png(i))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"imgs/{i % 6}.png\towner{i % 3}\n" for i in range(17)))  # with duplicates
    a = build_index(ListReader(listing), FakeEncoder(D), _cfg(tmp_path / "a", shard_size=4))
    b = build_index(ListReader(listing), FakeEncoder(D), _cfg(tmp_path / "b", shard_size=4, partition_rows=1))
    assert _index_files(a.path) == _index_files(b.path) and a.manifest["count"] == 3
    assert a.manifest["dedup"]["exact_duplicates_dropped"] == 11


# -- parquet and webdataset inputs behind fsspec URLs -------------------------------------------------


def _same_index(a, b):
    for name in ("vectors.npy", "ids.npy", "sources.tsv"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name


def _wds_shard(path, n, seed=0):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", _png(seed + i)), ("owner", f"o{i % 2}".encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_parquet_and_webdataset_inputs_through_fsspec_urls(tmp_path):
    """memory:// and file:// parquet/webdataset inputs give the same items and index as local paths."""
    import fsspec

    from dprdm.index.readers import iter_unit, plan_units

    fs = fsspec.filesystem("memory")
    rows = [_png(i) for i in range(5)]
    pq.write_table(pa.table({"img": [{"bytes": b} for b in rows] + [{"bytes": None}],
                             "who": ["u1", "u1", "u2", "u3", "u3", "u4"]}), tmp_path / "a.parquet", row_group_size=2)
    for i, b in enumerate(rows):
        (tmp_path / f"p{i}.png").write_bytes(b)
        fs.pipe(f"/t15c/p{i}.png", b)
    pq.write_table(pa.table({"path": [f"p{i}.png" for i in range(5)] + ["missing.png"]}), tmp_path / "b.parquet")
    good = _wds_shard(tmp_path / "s-000.tar", 4)
    (tmp_path / "s-001.tar").write_bytes(good[: len(good) // 2])  # truncated: one error item at its end
    for name in ("a.parquet", "b.parquet", "s-000.tar", "s-001.tar"):
        fs.pipe(f"/t15c/{name}", (tmp_path / name).read_bytes())
    try:
        for kw, names in (({"image_column": "img", "owner_column": "who"}, ["a.parquet"]),
                          ({"path_column": "path"}, ["b.parquet"]),
                          ({"owner_column": "owner"}, ["s-000.tar", "s-001.tar"])):
            local = open_reader([str(tmp_path / n) for n in names], **kw)
            want = [(it.key, it.owner, it.data, it.error) for it in local.iter_from(0)]
            assert any(w[3] for w in want) and any(w[2] for w in want)
            ref = build_index(local, FakeEncoder(D), _cfg(tmp_path / f"local-{names[0]}"))
            for prefix in ("memory://t15c/", f"file://{tmp_path}/"):
                reader = open_reader([prefix + n for n in names], **kw)
                assert [(it.key, it.owner, it.data, it.error) for it in reader.iter_from(0)] == want
                units = [it for u in plan_units(reader, 2) for it in iter_unit(reader, u)]
                assert [(it.key, it.owner, it.data, it.error) for it in units] == want
                assert reader.describe()["kind"] in ("parquet", "webdataset")
                _same_index(ref, build_index(reader, FakeEncoder(D), _cfg(tmp_path / f"u{len(prefix)}-{names[0]}")))
        with pytest.raises(IndexBuildError, match="parquet input 'memory://t15c/none.parquet' does not exist"):
            ParquetReader(["memory://t15c/none.parquet"], image_column="img")
        with pytest.raises(IndexBuildError, match="webdataset shard 'memory://t15c/none.tar' does not exist"):
            WebDatasetReader(["memory://t15c/none.tar"])
    finally:
        fs.rm("/t15c", recursive=True)
