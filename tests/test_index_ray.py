"""Issue 15: index building on REAL Ray Data, ``verify --compare`` and ``--from-embeddings``.

The Ray tests share the session's ``ray_cluster`` (a local Ray with 2 CPUs, see conftest); every
ray build is compared byte for byte with a local build of the same corpus.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dprdm.cli import index as index_cli
from dprdm.cli.main import main
from dprdm.index import BuildConfig, IndexBuildError, build_from_vectors, build_index
from dprdm.index.compare import compare_indexes
from dprdm.index.embeddings_input import build_from_embeddings
from dprdm.index.ray_build import RayOptions, build_index_ray, registry_encoder
from dprdm.index.readers import (
    FolderReader,
    ListReader,
    ParquetReader,
    WebDatasetReader,
    iter_unit,
    plan_units,
)
from dprdm.index.testing import make_image, random_unit_vectors, write_image_folder
from dprdm.models.fake import FakeEncoder

D = 16
FAKE = functools.partial(FakeEncoder, D)


def _cfg(out, **kw):
    kw.setdefault("corpus_id", "ray-test")
    kw.setdefault("public_size", 200)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 5)
    kw.setdefault("shard_size", 8)
    return BuildConfig(output=out, **kw)


def _png(seed, size=16):
    buf = io.BytesIO()
    make_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """57 image files: 52 distinct images (two sizes), exact duplicates within and across read units,
    a corrupt JPEG, an empty PNG and a non-image file."""
    root = tmp_path_factory.mktemp("ray") / "corpus"
    paths = write_image_folder(root, 48)
    for i in range(4):
        (root / "a" / f"big{i}.png").write_bytes(_png(100 + i, 40))
    shutil.copy(paths[0], root / "a" / "img00001_dup.png")  # same unit as paths[0]
    shutil.copy(paths[3], root / "b" / "zz_dup_of_3.png")  # another unit
    shutil.copy(paths[3], root / "b" / "zz_dup_of_3_again.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def _same(a, b):
    """Byte equality of the data files, the operator reports and the dedup counts of two builds."""
    for name in ("vectors.npy", "ids.npy", "sources.tsv"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    assert a.manifest["files"] == b.manifest["files"]
    assert a.manifest["dedup"] == b.manifest["dedup"]
    ra, rb = (json.loads((r.path / "reports" / "build_report.json").read_text()) for r in (a, b))
    key = lambda e: e["key"]  # noqa: E731
    assert sorted(ra.pop("unreadable_or_skipped"), key=key) == sorted(rb.pop("unreadable_or_skipped"), key=key)
    assert ra == rb
    assert compare_indexes(a.path, b.path) == []


def test_ray_and_local_agree_byte_for_byte_with_duplicates_and_corrupt_files(ray_cluster, corpus, tmp_path):
    local = build_index(FolderReader(corpus), FakeEncoder(D), _cfg(tmp_path / "local"))
    ray = build_index_ray(FolderReader(corpus), FAKE, _cfg(tmp_path / "ray"))
    _same(local, ray)
    d = ray.manifest["dedup"]
    assert d["items_seen"] == 57 and d["unreadable_or_skipped"] == 2 and d["exact_duplicates_dropped"] == 3
    assert d["records"] == 52 and ray.manifest["build"]["engine"] == "ray"
    assert ray.stats == {"items_encoded": 57, "items_reused": 0}
    # the same folder through fsspec (file:// URL): same keys, same index
    url = build_index_ray(FolderReader(corpus.resolve().as_uri()), FAKE, _cfg(tmp_path / "url"))
    _same(local, url)


def test_ray_and_local_agree_on_owner_records(ray_cluster, tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(12):
        (img / f"{i}.png").write_bytes(_png(i))
    (img / "copy0.png").write_bytes(_png(0))
    lines = [f"imgs/{i}.png\towner{i % 4}" for i in range(12)]
    lines += ["imgs/copy0.png\towner0", "imgs/0.png\towner1", "imgs/missing.png\towner2", "imgs/5.png\t"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    local = build_index(ListReader(listing), FakeEncoder(D), _cfg(tmp_path / "local", shard_size=4, batch_size=3))
    ray = build_index_ray(ListReader(listing), FAKE, _cfg(tmp_path / "ray", shard_size=4, batch_size=3))
    _same(local, ray)
    assert ray.manifest["record_unit"] == "owner" and ray.manifest["count"] == 4
    assert ray.manifest["dedup"]["exact_duplicates_dropped"] == 1  # copy0 within owner0 only


def test_ray_reads_parquet_and_webdataset_units(ray_cluster, tmp_path):
    files = []
    for f in range(2):
        rows = [{"image": _png(f * 10 + i), "owner": f"o{i % 3}", "id": f"k{f}-{i}"} for i in range(10)]
        rows.append({"image": b"garbage", "owner": "o1", "id": f"bad{f}"})
        path = tmp_path / f"part{f}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
        files.append(path)

    def reader():
        return ParquetReader(files, image_column="image", owner_column="owner", key_column="id")

    units = plan_units(reader(), 3)
    assert [u[1:] for u in units[:5]] == [(0, 0, 0, 3), (0, 0, 3, 6), (0, 0, 6, 9), (0, 0, 9, 11), (1, 11, 0, 3)]
    assert [i.key for u in units for i in iter_unit(reader(), u)] == [i.key for i in reader().iter_from(0)]
    _same(build_index(reader(), FakeEncoder(D), _cfg(tmp_path / "pl", shard_size=3)),
          build_index_ray(reader(), FAKE, _cfg(tmp_path / "pr", shard_size=3)))

    shards = []
    for s in range(2):
        path = tmp_path / f"shard{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(7):
                data = _png(50 + (i if s == 0 or i != 6 else 0))  # the last sample repeats shard 0's first
                info = tarfile.TarInfo(f"s{s}_{i:03d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])  # a truncated shard: one error item at its tail
    _same(build_index(WebDatasetReader(shards), FakeEncoder(D), _cfg(tmp_path / "wl")),
          build_index_ray(WebDatasetReader(shards), FAKE, _cfg(tmp_path / "wr")))


def test_dprdm_mini_split_and_ray_build_are_bytewise_equal_to_local(ray_cluster, tmp_path):
    """The real default encoder is NOT batch-invariant (the last bits depend on the batch size),
    so this checks the fixed-size encoder calls and the preprocess/encode split for real."""
    from dprdm.models.preprocess import split_encoder
    from dprdm.models.registry import load_encoder

    enc = load_encoder("dprdm-mini", device="cpu")
    imgs = [make_image(i, 20 + i % 7) for i in range(30)]
    pre, encode = split_encoder(enc)
    assert encode(pre(imgs)).tobytes() == enc.encode_images(imgs).tobytes()
    root = tmp_path / "imgs"
    paths = write_image_folder(root, 30)
    shutil.copy(paths[2], root / "b" / "zzz.png")
    factory = registry_encoder("dprdm-mini", "cpu")
    local = build_index(FolderReader(root), enc, _cfg(tmp_path / "local", batch_size=8, shard_size=11))
    ray = build_index_ray(FolderReader(root), factory, _cfg(tmp_path / "ray", batch_size=8, shard_size=11))
    _same(local, ray)


def test_ray_resume_reuses_finished_parts(ray_cluster, corpus, tmp_path):
    full = build_index_ray(FolderReader(corpus), FAKE, _cfg(tmp_path / "full"))
    out = tmp_path / "x"
    build_index_ray(FolderReader(corpus), FAKE, _cfg(out, keep_checkpoints=True))
    # simulate an interruption after all but two read units were committed
    for name in ("manifest.json", "vectors.npy", "ids.npy", "sources.tsv"):
        (out / name).unlink()
    shutil.rmtree(out / "reports")
    lost = [json.loads((out / ".build" / f"part-{u:06d}.meta.json").read_text())["end"] for u in (1, 4)]
    for u in (1, 4):
        (out / ".build" / f"part-{u:06d}.meta.json").unlink()  # vectors without meta: half written
    (out / ".build" / "part-000002.vectors.npy.tmp").write_bytes(b"torn")
    with pytest.raises(IndexBuildError, match="already exists; pass --resume"):
        build_index_ray(FolderReader(corpus), FAKE, _cfg(out))
    with pytest.raises(IndexBuildError, match="different inputs or encoder"):
        build_index_ray(FolderReader(corpus), FAKE, _cfg(out, existing="resume", batch_size=6))
    res = build_index_ray(FolderReader(corpus), FAKE, _cfg(out, existing="resume"))
    assert res.stats == {"items_encoded": sum(lost), "items_reused": 57 - sum(lost)}
    _same(full, res)
    assert not (out / ".build").exists()


class _PoisonedEncoder(FakeEncoder):
    """Fails on 40x40 images (the 'big' ones): an actor crash in the middle of a build."""

    def encode_images(self, images):
        if any(im.size == (40, 40) for im in images):
            raise RuntimeError("simulated encoder crash")
        return super().encode_images(images)


def test_ray_task_failure_keeps_committed_parts_then_resumes(ray_cluster, corpus, tmp_path):
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "crash"
    with pytest.raises(IndexBuildError, match="encoder failed: RuntimeError: simulated encoder crash.*rerun with --resume"):
        build_index_ray(FolderReader(corpus), functools.partial(_PoisonedEncoder, D), _cfg(out))
    assert not (out / "manifest.json").exists() and (out / ".build" / "state.json").is_file()
    res = build_index_ray(FolderReader(corpus), FAKE, _cfg(out, existing="resume"))
    assert res.stats["items_encoded"] + res.stats["items_reused"] == 57
    _same(build_index(FolderReader(corpus), FakeEncoder(D), _cfg(tmp_path / "local")), res)


def test_ray_option_and_loader_errors(ray_cluster, corpus, tmp_path):
    with pytest.raises(IndexBuildError, match="--workers must be a positive integer; found 0"):
        RayOptions(workers=0)
    with pytest.raises(IndexBuildError, match="--workers sizes a local Ray; the cluster at --address 'auto'"):
        RayOptions(address="auto", workers=2)
    with pytest.raises(IndexBuildError, match="cannot load the encoder in a Ray worker: .*dimension must be >= 1"):
        build_index_ray(FolderReader(corpus), functools.partial(FakeEncoder, 0), _cfg(tmp_path / "e"))


@pytest.fixture
def fake_factory(monkeypatch):
    monkeypatch.setattr(index_cli, "resolve_encoder", lambda spec, device=None: FakeEncoder(D))
    monkeypatch.setattr(index_cli, "encoder_factory", lambda spec, device=None: FAKE)


def _cli_build(inp, out, *extra):
    return main(["index", "build", "--input", str(inp), "--output", str(out), "--corpus-id", "cli",
                 "--public-size", "100", "--encoder", "fake", "--no-progress", "--shard-size", "9", *extra])


def test_cli_engine_ray_and_verify_compare(ray_cluster, corpus, tmp_path, capsys, fake_factory):
    assert _cli_build(corpus, tmp_path / "local") == 0
    assert _cli_build(corpus, tmp_path / "ray", "--engine", "ray", "--workers", "2") == 0
    assert "52 records" in capsys.readouterr().out
    assert main(["index", "verify", str(tmp_path / "ray"), "--compare", str(tmp_path / "local")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SAME") and "byte-identical" in out
    assert _cli_build(corpus, tmp_path / "x", "--workers", "2") == 2
    assert "--address, --workers and --encoder-actors need --engine ray" in capsys.readouterr().err


def test_verify_compare_names_what_differs(tmp_path, capsys):
    x = random_unit_vectors(20, D, seed=1)
    cfg = dict(corpus_id="cmp", public_size=32, progress=False)
    ident = FakeEncoder(D).identity
    a = build_from_vectors(x, ident, BuildConfig(output=tmp_path / "a", **cfg), ids=np.arange(100, 120))
    y = x.copy()
    y[3] = random_unit_vectors(1, D, seed=9)[0]
    build_from_vectors(y, ident, BuildConfig(output=tmp_path / "b", **cfg), ids=np.arange(100, 120))
    build_from_vectors(x[:19], ident, BuildConfig(output=tmp_path / "c", **cfg), ids=np.arange(100, 119))
    assert main(["index", "verify", str(a.path), "--compare", str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DIFFERENT") and "file vectors.npy differs" in out
    assert "1 of 20 common record(s) have different stored vectors" in out and "ids.npy" not in out
    diffs = compare_indexes(a.path, tmp_path / "c")
    assert any(d.startswith("file ids.npy differs") and "1 record id(s) only in" in d for d in diffs)
    assert main(["index", "verify", str(a.path), "--compare", str(a.path)]) == 0
    assert "SAME" in capsys.readouterr().out


# -- --from-embeddings ---------------------------------------------------------------------------


def _export(build_dir):
    """The (sha256, owner, key, embedding) rows an image build computed, from its checkpoints."""
    digests, owners, keys, vecs = [], [], [], []
    for meta in sorted(build_dir.glob("shard-*.meta.json")):
        m = json.loads(meta.read_text())
        digests += m["digests"]
        owners += m["owners"] or [None] * len(m["digests"])
        keys += m["keys"]
        vecs.append(np.load(build_dir / m["vectors"]))
    return digests, owners, keys, np.concatenate(vecs)


def test_from_embeddings_parquet_and_npy_equal_the_image_build(corpus, tmp_path):
    images = build_index(FolderReader(corpus), FakeEncoder(D), _cfg(tmp_path / "img", keep_checkpoints=True))
    digests, _, keys, vecs = _export(images.path / ".build")
    scaled = vecs.astype(np.float64) * np.linspace(0.5, 3.0, len(vecs))[:, None]  # not unit: normalized on input
    half = len(digests) // 2
    pq.write_table(pa.table({"sha256": digests[:half], "key": keys[:half],
                             "embedding": pa.array(list(scaled[:half]), pa.list_(pa.float64()))}),
                   tmp_path / "e0.parquet")
    np.save(tmp_path / "e1.npy", vecs[half:])
    (tmp_path / "e1.tsv").write_text("sha256\tkey\n" + "".join(f"{d}\t{k}\n" for d, k in zip(digests[half:], keys[half:])))
    dup = tmp_path / "e2.npy"  # exact duplicates of rows already given: set semantics
    np.save(dup, vecs[:3])
    (tmp_path / "e2.tsv").write_text("sha256\n" + "".join(f"{d}\n" for d in digests[:3]))
    res = build_from_embeddings([tmp_path / "e0.parquet", tmp_path / "e1.npy", dup], FakeEncoder(D).identity,
                                _cfg(tmp_path / "emb"))
    for name in ("vectors.npy", "ids.npy", "sources.tsv"):
        assert (res.path / name).read_bytes() == (images.path / name).read_bytes(), name
    assert res.manifest["dedup"]["exact_duplicates_dropped"] == 3
    assert res.manifest["dedup"]["records"] == images.manifest["dedup"]["records"] == 52


def test_from_embeddings_owner_records_via_cli(tmp_path, capsys, fake_factory):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(9):
        (img / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "list.txt").write_text("".join(f"imgs/{i}.png\tp{i % 3}\n" for i in range(9)) + "imgs/0.png\tp1\n")
    images = build_index(ListReader(tmp_path / "list.txt"), FakeEncoder(D), _cfg(tmp_path / "img", keep_checkpoints=True))
    digests, owners, _keys, vecs = _export(images.path / ".build")
    pq.write_table(pa.table({"sha256": digests, "owner": owners,
                             "embedding": pa.array(list(vecs), pa.list_(pa.float32(), D))}), tmp_path / "o.parquet")
    assert main(["index", "build", "--from-embeddings", str(tmp_path / "o.parquet"), "--output", str(tmp_path / "emb"),
                 "--corpus-id", "ray-test", "--public-size", "200", "--encoder", "fake", "--no-progress"]) == 0
    assert "3 records" in capsys.readouterr().out
    for name in ("vectors.npy", "ids.npy", "sources.tsv"):
        assert (tmp_path / "emb" / name).read_bytes() == (images.path / name).read_bytes(), name


def test_from_embeddings_errors_name_file_and_row(tmp_path):
    ident = FakeEncoder(D).identity
    good = "ab" * 32
    cases = []

    def parquet(name, **cols):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(cols), path)
        return path

    x = random_unit_vectors(3, D).astype(np.float64)
    cases.append((parquet("dim", sha256=[good] * 3, embedding=[list(v) for v in x[:2]] + [[1.0] * (D - 1)]),
                  r"dim.parquet row 2: embedding has 15 values; expected dimension 16"))
    nan = x.copy()
    nan[1, 4] = np.nan
    cases.append((parquet("nan", sha256=[good, "cd" * 32, "ef" * 32], embedding=[list(v) for v in nan]),
                  r"nan.parquet row 1: embedding is not finite"))
    cases.append((parquet("zero", sha256=[good], embedding=[[0.0] * D]), r"zero.parquet row 0: embedding is zero"))
    cases.append((parquet("sha", sha256=[good, "xyz"], embedding=[list(v) for v in x[:2]]),
                  r"sha.parquet row 1: sha256 must be 64 hex digits; found 'xyz'"))
    cases.append((parquet("nocol", digest=[good], embedding=[list(x[0])]), r"nocol.parquet: no column 'sha256'"))
    cases.append((parquet("owner", sha256=[good, "cd" * 32], owner=["a", None], embedding=[list(v) for v in x[:2]]),
                  r"owner.parquet row 1: missing owner"))
    np.save(tmp_path / "lonely.npy", x)
    cases.append((tmp_path / "lonely.npy", r"lonely.npy: needs its row table lonely.tsv"))
    np.save(tmp_path / "short.npy", x)
    (tmp_path / "short.tsv").write_text(f"sha256\n{good}\n")
    cases.append((tmp_path / "short.npy", r"short.tsv: 1 rows for 3 embeddings"))
    np.save(tmp_path / "wide.npy", random_unit_vectors(2, D + 1))
    (tmp_path / "wide.tsv").write_text(f"sha256\n{good}\n{good}\n")
    cases.append((tmp_path / "wide.npy", r"wide.npy: array has shape \(2, 17\); expected \(N, 16\)"))
    cases.append((tmp_path / "nothing.npy", r"file '.*nothing.npy' does not exist"))
    for i, (path, message) in enumerate(cases):
        with pytest.raises(IndexBuildError, match=message):
            build_from_embeddings([path], ident, _cfg(tmp_path / f"out{i}"))
    with pytest.raises(IndexBuildError, match="must all have an owner column, or none"):
        build_from_embeddings([tmp_path / "owner.parquet", tmp_path / "short.npy"], ident, _cfg(tmp_path / "mix"))


def test_fsspec_url_inputs_match_local_paths(tmp_path):
    """A folder and a path list behind fsspec URLs (``memory://`` here, ``s3://`` in production) give
    the same keys and the same index as local paths; a missing URL is an error item, not a crash."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        data = _png(i)
        (root / f"{i}.png").write_bytes(data)
        fs.pipe(f"/t15/imgs/{i}.png", data)
    listing = "".join(f"imgs/{i}.png\towner{i % 2}\n" for i in range(6)) + "imgs/gone.png\towner0\n"
    (tmp_path / "list.txt").write_text(listing)
    fs.pipe("/t15/list.txt", listing.encode())
    try:
        local = build_index(FolderReader(root), FakeEncoder(D), _cfg(tmp_path / "a"))
        url = build_index(FolderReader("memory://t15/imgs"), FakeEncoder(D), _cfg(tmp_path / "b"))
        _same(local, url)
        local = build_index(ListReader(tmp_path / "list.txt"), FakeEncoder(D), _cfg(tmp_path / "c"))
        url = build_index(ListReader("memory://t15/list.txt"), FakeEncoder(D), _cfg(tmp_path / "d"))
        _same(local, url)
        report = json.loads((url.path / "reports" / "build_report.json").read_text())
        assert [e["key"] for e in report["unreadable_or_skipped"]] == ["imgs/gone.png"]
        with pytest.raises(IndexBuildError, match="input folder 'memory://t15/nothing' does not exist"):
            FolderReader("memory://t15/nothing")
    finally:
        fs.rm("/t15", recursive=True)
