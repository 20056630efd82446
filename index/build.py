"""Offline index building: stream a corpus through an encoder into an index directory (SPEC §3, §5).

Stages: a :mod:`reader <dprdm.index.readers>` yields raw items in a fixed order; each is hashed
(SHA-256 of its bytes), decoded and embedded in batches; every ``shard_size`` items a checkpoint
shard (vectors + keys/digests/errors) is committed under ``OUTPUT/.build`` by atomic rename.  A
crash or Ctrl-C loses at most the current shard: ``--resume`` continues after the last one.
Finalizing deduplicates, orders, quantizes and writes the index, ``manifest.json`` last.

Preprocessing is 1-stable (neighbouring corpora give indexes differing in at most one record):

* image records: exact duplicates (same SHA-256 of the bytes) are one record (set semantics);
  the record id is the first 63 bits of that hash, a key of the record alone;
* owner records: one vector per owner, the re-normalized mean of the embeddings of the owner's
  distinct images (duplicates removed within the owner only, so one owner's record never
  depends on another owner); the record id is a hash of the owner name;
* no similarity-threshold collapsing (see :mod:`dprdm.index.audit` for the operator-only report).

Memory: the images of one batch, one shard of vectors, and O(N) small per-item metadata
(hashes, ids); vectors are written through memory maps.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index import ivf as _ivf
from dprdm.index.errors import IndexBuildError, PrivacyPolicyError
from dprdm.index.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    atomic_write_json,
    file_entry,
    index_version_of,
)
from dprdm.index.readers import CorpusItem, CorpusReader
from dprdm.index.search import QUERY_GRID_BITS, STORE_GRID_BITS, quantize_store
from dprdm.models.base import Encoder, EncoderIdentity

__all__ = ["BuildConfig", "BuildResult", "build_index", "build_from_vectors", "record_id_from_digest", "owner_record_id"]

BUILD_DIR = ".build"
_CORPUS_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REFUSED_TYPES_WHY = {
    "hnsw": "a graph index's structure (which records link to which) depends on every record, sampled "
    "or not, so a query's candidates would depend on unsampled records; this voids the privacy "
    "amplification of Poisson subsampling (SPEC §5)",
}
_MASK63 = (1 << 63) - 1


def record_id_from_digest(digest: bytes) -> int:
    """Record id of an image record: the first 63 bits of the SHA-256 of its bytes."""
    return (int.from_bytes(digest[:8], "big") >> 1) & _MASK63


def owner_record_id(owner: str) -> int:
    """Record id of an owner record: the first 63 bits of SHA-256("owner\\0" + name)."""
    return record_id_from_digest(hashlib.sha256(b"owner\0" + owner.encode("utf-8")).digest())


@dataclass(frozen=True)
class BuildConfig:
    """Validated configuration of one build.

    Attributes:
        output: the index directory to create.
        corpus_id: the privacy domain (letters, digits, ``._:-``).
        public_size: the declared public size N̄ (>= the number of records).
        index_type: ``flat`` or ``ivf`` (``hnsw`` is refused for private indexes).
        dtype: stored vector precision, ``float32`` or ``float16``.
        private: False only for indexes of public data (e.g. public proxies for tuning).
        train_vectors: ivf: PUBLIC training vectors (.npy or a public index directory).
        nlist, nprobe: ivf: number of lists and the default (public) nprobe.
        capacity_slack, min_capacity: ivf: the public capacity rule (see :mod:`dprdm.index.ivf`).
        batch_size: images per encoder call.  shard_size: items per checkpoint.
        existing: what to do if ``output`` exists: ``refuse``, ``resume`` or ``overwrite``.
        progress: show a progress bar (count, rate, ETA) on stderr.
        keep_checkpoints: keep ``OUTPUT/.build`` after success.
    """

    output: Path
    corpus_id: str
    public_size: int
    index_type: str = "flat"
    dtype: str = "float32"
    private: bool = True
    train_vectors: Path | None = None
    nlist: int | None = None
    nprobe: int = 1
    capacity_slack: float = 2.0
    min_capacity: int = 16
    batch_size: int = 64
    shard_size: int = 4096
    existing: str = "refuse"
    progress: bool = True
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        if not _CORPUS_ID.match(self.corpus_id):
            raise IndexBuildError(f"--corpus-id must match {_CORPUS_ID.pattern}; found {self.corpus_id!r}")
        if isinstance(self.public_size, bool) or not isinstance(self.public_size, int) or self.public_size < 1:
            raise IndexBuildError(f"--public-size must be a positive integer; found {self.public_size!r}")
        kind = self.index_type.lower()
        if kind in _REFUSED_TYPES_WHY or kind.startswith("hnsw"):
            if self.private:
                raise PrivacyPolicyError(f"index type {self.index_type!r} is refused for a private index: "
                                         f"{_REFUSED_TYPES_WHY['hnsw']}")
            raise IndexBuildError(f"index type {self.index_type!r} is not supported by this build (flat, ivf)")
        if kind not in ("flat", "ivf"):
            raise IndexBuildError(f"--index-type must be flat or ivf; found {self.index_type!r}")
        object.__setattr__(self, "index_type", kind)
        object.__setattr__(self, "output", Path(self.output))
        if self.dtype not in ("float32", "float16"):
            raise IndexBuildError(f"--dtype must be float32 or float16; found {self.dtype!r}")
        if self.existing not in ("refuse", "resume", "overwrite"):
            raise IndexBuildError(f"existing must be refuse, resume or overwrite; found {self.existing!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise IndexBuildError(f"batch and shard sizes must be >= 1; found {self.batch_size}, {self.shard_size}")
        if kind == "ivf":
            if self.nlist is None or self.nlist < 1:
                raise IndexBuildError(f"--nlist must be a positive integer for an ivf index; found {self.nlist!r}")
            if self.nprobe < 1:
                raise IndexBuildError(f"--nprobe must be >= 1; found {self.nprobe}")
            if self.private and self.train_vectors is None:
                raise PrivacyPolicyError(
                    "an ivf index of private data needs --train-vectors with PUBLIC vectors: a quantizer "
                    f"trained on the private vectors is refused because {_ivf._PRIVATE_QUANTIZER_WHY}"
                )
            _ivf.public_capacities(self.public_size, np.zeros(1, np.int64), slack=self.capacity_slack,
                                   min_capacity=self.min_capacity)


@dataclass(frozen=True)
class BuildResult:
    """Where the index went and its manifest (operator-only: exact counts)."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_index(
    reader: CorpusReader, encoder: Encoder, config: BuildConfig, *, log: Log | None = None
) -> BuildResult:
    """Build (or resume building) an index from ``reader`` with ``encoder``.

    Raises:
        IndexBuildError: output exists (without resume/overwrite), changed inputs on resume,
            N > N̄, capacity overflow, encoder misbehaviour.
        PrivacyPolicyError: a configuration that would void the privacy argument.
    """
    say = log or (_stderr if config.progress else (lambda _m: None))
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None = None
    if config.index_type == "ivf" and config.train_vectors is not None:
        train = _ivf.load_public_vectors(config.train_vectors)  # policy checks before any work
        if train[0].shape[1] != encoder.dimension:
            raise IndexBuildError(f"--train-vectors have dimension {train[0].shape[1]}, encoder has {encoder.dimension}")
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "reader": reader.describe(),
        "encoder": encoder.identity.to_dict(),
        "owner_mode": reader.has_owners,
    }
    build_dir = _prepare_output(config, fingerprint)
    metas = _encode(reader, encoder, config, build_dir, owner_mode=reader.has_owners)
    say(f"encoding done: {metas[-1]['end'] if metas else 0} items; finalizing")
    manifest = _finalize(config, encoder, reader, build_dir, metas, train, owner_mode=reader.has_owners)
    if not config.keep_checkpoints:
        shutil.rmtree(build_dir, ignore_errors=True)
    say(f"index written to {config.output}")
    return BuildResult(path=config.output, manifest=manifest)


# -- output directory and checkpoints ------------------------------------------------------------


def _prepare_output(config: BuildConfig, fingerprint: dict[str, Any]) -> Path:
    out = config.output
    build_dir = out / BUILD_DIR
    state = build_dir / "state.json"
    if out.exists() and not out.is_dir():
        raise IndexBuildError(f"output {str(out)!r} exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and config.existing == "refuse":
        raise IndexBuildError(
            f"output {str(out)!r} already exists; pass --resume to continue an interrupted build "
            "or --overwrite to replace it"
        )
    if occupied and config.existing == "overwrite":
        if not ((out / MANIFEST).exists() or build_dir.exists()):
            raise IndexBuildError(f"output {str(out)!r} is not an index directory; refusing to delete it")
        shutil.rmtree(out)
    if occupied and config.existing == "resume":
        if (out / MANIFEST).exists():
            raise IndexBuildError(f"output {str(out)!r} is a finished index; use --overwrite to rebuild it")
        if not state.is_file():
            raise IndexBuildError(f"output {str(out)!r} has no checkpoint to resume ({BUILD_DIR}/state.json)")
        previous = json.loads(state.read_text())
        if previous.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise IndexBuildError(
                f"cannot resume {str(out)!r}: its checkpoint was made with different inputs or encoder "
                f"({previous.get('fingerprint')}); use --overwrite to start again"
            )
        return build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"fingerprint": fingerprint})
    return build_dir


def _committed(build_dir: Path) -> list[dict[str, Any]]:
    """Committed shards in order; a vectors file without its meta (or any .tmp) is discarded."""
    metas = []
    for meta_path in sorted(build_dir.glob("shard-*.meta.json")):
        meta = json.loads(meta_path.read_text())
        vec_path = build_dir / meta["vectors"]
        if not vec_path.is_file():
            raise IndexBuildError(f"checkpoint {str(meta_path)!r} has lost its vectors file; use --overwrite")
        metas.append(meta)
    for i, meta in enumerate(metas):
        if meta["shard"] != i or meta["start"] != (metas[i - 1]["end"] if i else 0):
            raise IndexBuildError(f"checkpoints in {str(build_dir)!r} are not contiguous at shard {i}; use --overwrite")
    known = {m["vectors"] for m in metas} | {f"shard-{m['shard']:06d}.meta.json" for m in metas}
    for stray in build_dir.glob("shard-*"):
        if stray.name not in known:
            stray.unlink()
    return metas


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Shard:
    def __init__(self, number: int, start: int) -> None:
        self.number, self.start = number, start
        self.keys: list[str] = []
        self.digests: list[str] = []
        self.owners: list[str] = []
        self.vectors: list[npt.NDArray[np.float32]] = []
        self.errors: list[dict[str, str]] = []
        self.duplicates = 0

    def commit(self, build_dir: Path, end: int, dim: int, owner_mode: bool) -> dict[str, Any]:
        name = f"shard-{self.number:06d}"
        vecs = np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)
        _save_npy_atomic(build_dir / f"{name}.vectors.npy", vecs)
        meta = {
            "shard": self.number, "start": self.start, "end": end, "vectors": f"{name}.vectors.npy",
            "keys": self.keys, "digests": self.digests, "owners": self.owners if owner_mode else None,
            "errors": self.errors, "duplicates": self.duplicates,
        }
        atomic_write_json(build_dir / f"{name}.meta.json", meta)  # the commit point
        return meta


def _decode(data: bytes) -> Any:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")


def _encode(
    reader: CorpusReader, encoder: Encoder, config: BuildConfig, build_dir: Path, *, owner_mode: bool
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    metas = _committed(build_dir)
    start = metas[-1]["end"] if metas else 0
    seen: set[tuple[str, str]] = set()
    for meta in metas:
        owners = meta["owners"] or [""] * len(meta["digests"])
        seen.update(zip(owners, meta["digests"], strict=True))
    dim = encoder.dimension
    shard = _Shard(len(metas), start)
    batch: list[tuple[str, str, str, Any]] = []

    def flush() -> None:
        if batch:
            _embed(encoder, batch, shard, dim)
            batch.clear()

    pos = start
    with tqdm(total=reader.total(), initial=start, unit="img", desc="encoding", disable=not config.progress,
              dynamic_ncols=True, smoothing=0.05) as bar:
        for item in reader.iter_from(start):
            _take(item, shard, batch, seen, owner_mode)
            pos += 1
            bar.update(1)
            if len(batch) >= config.batch_size:
                flush()
            if pos - shard.start >= config.shard_size:
                flush()
                metas.append(shard.commit(build_dir, pos, dim, owner_mode))
                shard = _Shard(shard.number + 1, pos)
        flush()
        if pos > shard.start:
            metas.append(shard.commit(build_dir, pos, dim, owner_mode))
    return metas


def _take(item: CorpusItem, shard: _Shard, batch: list[tuple[str, str, str, Any]],
          seen: set[tuple[str, str]], owner_mode: bool) -> None:
    if item.data is None:
        shard.errors.append({"key": item.key, "error": item.error or "no data"})
        return
    digest = hashlib.sha256(item.data).hexdigest()
    owner = (item.owner or "") if owner_mode else ""
    if owner_mode and not owner:
        shard.errors.append({"key": item.key, "error": "missing owner"})
        return
    if (owner, digest) in seen:
        shard.duplicates += 1
        return
    try:
        image = _decode(item.data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-item error, never a crash
        shard.errors.append({"key": item.key, "error": f"cannot decode image: {type(exc).__name__}: {exc}"[:300]})
        return
    seen.add((owner, digest))
    batch.append((item.key, digest, owner, image))


def _embed(encoder: Encoder, batch: list[tuple[str, str, str, Any]], shard: _Shard, dim: int) -> None:
    vecs = np.asarray(encoder.encode_images([b[3] for b in batch]), dtype=np.float64)
    if vecs.shape != (len(batch), dim):
        raise IndexBuildError(f"encoder returned shape {vecs.shape} for {len(batch)} images of dimension {dim}")
    norms = np.linalg.norm(vecs, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    for i, (key, digest, owner, _img) in enumerate(batch):
        if not ok[i]:
            shard.errors.append({"key": key, "error": "encoder produced a non-finite or zero embedding"})
            continue
        shard.keys.append(key)
        shard.digests.append(digest)
        shard.owners.append(owner)
    if np.any(ok):
        shard.vectors.append((vecs[ok] / norms[ok, None]).astype(np.float32))


# -- finalize ------------------------------------------------------------------------------------


def _finalize(
    config: BuildConfig,
    encoder: Encoder,
    reader: CorpusReader,
    build_dir: Path,
    metas: list[dict[str, Any]],
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None,
    *,
    owner_mode: bool,
) -> dict[str, Any]:
    rec = _records(metas, owner_mode)
    _check_public_size(rec["ids"].size, config.public_size)
    staged = build_dir / "records.npy"
    _write_records(build_dir, staged, metas, rec, config.dtype, encoder.dimension, owner_mode)
    dedup = {
        "items_seen": metas[-1]["end"] if metas else 0,
        "unreadable_or_skipped": sum(len(m["errors"]) for m in metas),
        "exact_duplicates_dropped": sum(m["duplicates"] for m in metas) + rec["late_duplicates"],
        "images_embedded": rec["images"],
        "records": int(rec["ids"].size),
    }
    preprocessing = (
        "1-stable: exact duplicates removed by SHA-256 of the image bytes (set semantics"
        + (", within each owner; one record per owner = re-normalized mean embedding" if owner_mode else "")
        + "); no similarity-threshold collapsing"
    )
    report = {
        "unreadable_or_skipped": [e for m in metas for e in m["errors"]],
        "exact_duplicates_dropped": dedup["exact_duplicates_dropped"],
    }
    build_info = {"reader": reader.describe(), "batch_size": config.batch_size, "shard_size": config.shard_size}
    return _emit(config, encoder.identity, build_dir, staged, rec["ids"], train,
                 record_unit="owner" if owner_mode else "image", dedup=dedup, preprocessing=preprocessing,
                 build_info=build_info, report=report, sources=rec["sources"])


def _check_public_size(n: int, public_size: int) -> None:
    if n > public_size:
        raise IndexBuildError(
            f"--public-size {public_size} is smaller than the number of records ({n}; operator-only); "
            "declare a larger public size N̄ >= N (the encoded checkpoint is kept: rerun with --resume)"
        )


def _emit(
    config: BuildConfig,
    identity: EncoderIdentity,
    build_dir: Path,
    staged: Path,
    ids: npt.NDArray[np.int64],
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None,
    *,
    record_unit: str,
    dedup: dict[str, Any],
    preprocessing: str,
    build_info: dict[str, Any],
    report: dict[str, Any],
    sources: dict[int, str],
) -> dict[str, Any]:
    """Turn staged records (sorted by id, on the storage grid) into the final index directory."""
    out = config.output
    files: dict[str, Path] = {}
    extra: dict[str, Any] = {"quantizer": None}
    n = int(ids.size)
    if config.index_type == "ivf":
        ids, extra = _finalize_ivf(config, build_dir, staged, ids, train, files, identity.dimension)
    else:
        os.replace(staged, out / "vectors.npy")
        files["vectors.npy"] = out / "vectors.npy"
    _save_npy_atomic(out / "ids.npy", np.ascontiguousarray(ids, dtype=np.int64))
    files["ids.npy"] = out / "ids.npy"
    _write_operator_reports(out, {**report, "records": n}, sources, extra.pop("list_sizes", None))
    entries = {name: file_entry(p) for name, p in sorted(files.items())}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "corpus_id": config.corpus_id,
        "index_version": index_version_of(config.corpus_id, entries),
        "private": config.private,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "encoder": identity.to_dict(),
        "dimension": identity.dimension,
        "dtype": config.dtype,
        "count": n,
        "public_size": config.public_size,
        "record_unit": record_unit,
        "index_type": config.index_type,
        "metric": "inner_product",
        "score_grid_bits": STORE_GRID_BITS,
        "query_grid_bits": QUERY_GRID_BITS,
        "faiss_factory": extra.pop("faiss_factory", "Flat"),
        **extra,
        "preprocessing": preprocessing,
        "dedup": dedup,
        "files": entries,
        "build": {"tool": f"dprdm.index format {FORMAT_VERSION}", **build_info},
        "operator_only": ["count", "dedup", "build", "sources.tsv", "reports/", "list_offsets.npy"],
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def build_from_vectors(
    vectors: npt.ArrayLike,
    identity: EncoderIdentity,
    config: BuildConfig,
    *,
    ids: npt.ArrayLike | None = None,
    block_rows: int = 65536,
) -> BuildResult:
    """Write an index from precomputed embeddings (public proxies, benchmarks, tests).

    Rows are normalized and put on the storage grid; ``ids`` default to ``0..N-1`` (they must be
    unique non-negative int64 and, for a private corpus, a per-record key, see the module doc).
    No deduplication is done: the caller vouches that the rows are distinct records.
    """
    x = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if x.ndim != 2 or x.shape[1] != identity.dimension:
        raise IndexBuildError(f"vectors must have shape (N, {identity.dimension}); found {x.shape}")
    n = x.shape[0]
    rid = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if rid.shape != (n,) or (n and (rid.min() < 0 or np.unique(rid).size != n)):
        raise IndexBuildError("ids must be N unique non-negative integers")
    _check_public_size(n, config.public_size)
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None = None
    if config.index_type == "ivf" and config.train_vectors is not None:
        train = _ivf.load_public_vectors(config.train_vectors)
    build_dir = _prepare_output(config, {"vectors": True, "encoder": identity.to_dict()})
    order = np.argsort(rid, kind="stable")
    staged = build_dir / "records.npy"
    out = np.lib.format.open_memmap(staged.with_suffix(".tmp"), mode="w+", dtype=np.dtype(config.dtype),
                                    shape=(n, identity.dimension))
    for s in range(0, n, block_rows):
        out[s : s + block_rows] = quantize_store(x[order[s : s + block_rows]], config.dtype)
    out.flush()
    del out
    os.replace(staged.with_suffix(".tmp"), staged)
    manifest = _emit(config, identity, build_dir, staged, rid[order], train, record_unit="vector",
                     dedup={"records": n}, preprocessing="precomputed vectors (no deduplication)",
                     build_info={"reader": {"kind": "vectors"}}, report={}, sources={})
    if not config.keep_checkpoints:
        shutil.rmtree(build_dir, ignore_errors=True)
    return BuildResult(path=config.output, manifest=manifest)


def _records(metas: list[dict[str, Any]], owner_mode: bool) -> dict[str, Any]:
    """Deduplicate embedded rows; returns ids (sorted), per-row destination (or -1) and sources."""
    digests = [dg for m in metas for dg in m["digests"]]
    total = len(digests)
    if owner_mode:
        owners = [o for m in metas for o in m["owners"]]
        first_of: dict[tuple[str, str], int] = {}
        for i, pair in enumerate(zip(owners, digests, strict=True)):
            first_of.setdefault(pair, i)
        kept = np.array(sorted(first_of.values()), dtype=np.int64)
        names = sorted({owners[i] for i in kept})
        id_of = {o: owner_record_id(o) for o in names}
        ids = np.array(sorted(id_of.values()), dtype=np.int64)
        rank = {int(v): i for i, v in enumerate(ids)}
        dest = np.full(total, -1, np.int64)
        for i in kept:
            dest[i] = rank[id_of[owners[i]]]
        sources = {id_of[o]: o for o in names}
    else:
        raw = np.frombuffer(b"".join(bytes.fromhex(dg) for dg in digests), dtype=np.uint8).reshape(total, 32)
        first = np.sort(np.unique(raw.view("V32").ravel(), return_index=True)[1]).astype(np.int64)
        rid = (raw[first, :8].copy().view(">u8").ravel() >> np.uint64(1)).astype(np.int64)
        order = np.argsort(rid, kind="stable")
        ids = rid[order]
        dest = np.full(total, -1, np.int64)
        dest[first[order]] = np.arange(first.size)
        keys = [k for m in metas for k in m["keys"]]
        sources = {int(r): keys[i] for r, i in zip(rid, first, strict=True)}
    if ids.size and np.unique(ids).size != ids.size:
        raise IndexBuildError("record id collision (two distinct records share a 63-bit id); report this")
    images = int(np.count_nonzero(dest >= 0))
    return {"ids": ids, "dest": dest, "sources": sources, "images": images, "late_duplicates": total - images}


def _write_records(build_dir: Path, staged: Path, metas: list[dict[str, Any]], rec: dict[str, Any],
                   dtype: str, d: int, owner_mode: bool) -> None:
    n = rec["ids"].size
    out = np.lib.format.open_memmap(staged.with_suffix(".tmp"), mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    sums = np.zeros((n, d), np.float64) if owner_mode and n * d <= (1 << 27) else None
    if owner_mode and sums is None:
        sums = np.lib.format.open_memmap(build_dir / "owner_sums.npy", mode="w+", dtype=np.float64, shape=(n, d))
    offset = 0
    for meta in metas:
        vecs = np.load(build_dir / meta["vectors"], mmap_mode="r")
        rows = vecs.shape[0]
        dest = rec["dest"][offset : offset + rows]
        offset += rows
        local = np.flatnonzero(dest >= 0)
        if local.size == 0:
            continue
        if owner_mode:
            np.add.at(sums, dest[local], np.asarray(vecs[local], np.float64))
        else:
            order = np.argsort(dest[local])
            out[dest[local][order]] = quantize_store(vecs[local[order]], dtype)
    if owner_mode:
        for s in range(0, n, 65536):
            out[s : s + 65536] = quantize_store(sums[s : s + 65536], dtype)
        del sums
        (build_dir / "owner_sums.npy").unlink(missing_ok=True)
    out.flush()
    del out
    os.replace(staged.with_suffix(".tmp"), staged)


def _finalize_ivf(
    config: BuildConfig, build_dir: Path, staged: Path, ids: npt.NDArray[np.int64],
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None, files: dict[str, Path], d: int,
) -> tuple[npt.NDArray[np.int64], dict[str, Any]]:
    out = config.output
    nlist = int(config.nlist or 1)
    records = np.load(staged, mmap_mode="r")
    if train is None:  # public index only (checked in BuildConfig): train on its own vectors
        cap = min(records.shape[0], 256 * nlist)
        sample = np.asarray(records[np.linspace(0, records.shape[0] - 1, cap).astype(np.int64)], np.float32)
        train = (sample, {"kind": "self (public index)", "n_train": int(cap)})
    centroids = _ivf.train_centroids(train[0], nlist)
    train_counts = np.bincount(_ivf.assign_lists(train[0], centroids), minlength=nlist)
    caps = _ivf.public_capacities(config.public_size, train_counts, slack=config.capacity_slack,
                                  min_capacity=config.min_capacity)
    lists = np.concatenate([_ivf.assign_lists(records[s : s + 65536], centroids)
                            for s in range(0, records.shape[0], 65536)] or [np.zeros(0, np.int64)])
    sizes = np.bincount(lists, minlength=nlist).astype(np.int64)
    over = np.flatnonzero(sizes > caps)
    if over.size:
        raise IndexBuildError(
            f"private list size exceeds its public capacity in {over.size} list(s) (operator-only: list "
            f"{int(over[0])} holds {int(sizes[over[0]])} > {int(caps[over[0]])}). Raise --capacity-slack (choose "
            "it on public proxy data; every retry on the private corpus leaks) or --public-size, then --resume"
        )
    perm = np.argsort(lists, kind="stable")  # ids ascending within each list
    final = np.lib.format.open_memmap(out / "vectors.npy.tmp", mode="w+", dtype=records.dtype, shape=records.shape)
    for s in range(0, perm.size, 65536):
        final[s : s + 65536] = records[perm[s : s + 65536]]
    final.flush()
    del final
    os.replace(out / "vectors.npy.tmp", out / "vectors.npy")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    for name, arr in (("centroids.npy", centroids), ("capacities.npy", caps.astype(np.int64)),
                      ("list_offsets.npy", offsets)):
        _save_npy_atomic(out / name, arr)
        files[name] = out / name
    files["vectors.npy"] = out / "vectors.npy"
    extra = {
        "faiss_factory": f"IVF{nlist},Flat",
        "quantizer": {"trained_on": "public", **train[1], "algorithm": "faiss spherical k-means",
                      "nlist": nlist, "seed": _ivf.KMEANS_SEED, "grid_bits": QUERY_GRID_BITS},
        "ivf": {"nlist": nlist, "nprobe": config.nprobe, "assignment": "nearest public centroid, no balancing",
                "capacity_rule": {"formula": "max(min_capacity, ceil(slack * public_size * (t_l + 1) / (T + nlist)))",
                                  "slack": config.capacity_slack, "min_capacity": config.min_capacity,
                                  "public_training_counts": [int(c) for c in train_counts]},
                "total_capacity": int(caps.sum())},
        "list_sizes": sizes,
    }
    (build_dir / staged.name).unlink(missing_ok=True)
    return ids[perm], extra


def _write_operator_reports(out: Path, report: dict[str, Any], sources: dict[int, str],
                            list_sizes: npt.NDArray[np.int64] | None) -> None:
    (out / "reports").mkdir(exist_ok=True)
    full: dict[str, Any] = {"note": "OPERATOR-ONLY: exact counts, file names and list sizes of the private corpus",
                            **report}
    if list_sizes is not None:
        full["ivf_list_sizes"] = [int(s) for s in list_sizes]
    atomic_write_json(out / "reports" / "build_report.json", full)
    lines = [f"{rid}\t{src}" for rid, src in sorted(sources.items())]
    tmp = out / "sources.tsv.tmp"
    tmp.write_text("record_id\tsource\n" + "\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, out / "sources.tsv")
