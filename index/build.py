"""Offline index building: stream a corpus through an encoder into an index directory (SPEC §3, §5).

Stages, each in its own module:

1. :mod:`~dprdm.index.shards`: a :mod:`reader <dprdm.index.readers>` is streamed, hashed, decoded
   and embedded in batches into checkpoint shards committed by atomic rename (``--resume``
   continues after the last one);
2. :mod:`~dprdm.index.records`: the 1-stable preprocessing: record ids, exact-duplicate removal
   by content hash (set semantics), one record per owner; the kept rows are staged sorted by id
   on the storage grid;
3. here: the public-size check, the IVF layout (public quantizer, public capacities, the
   overflow rule of :mod:`dprdm.index.ivf`), the padded data files (one stored row per public
   slot, :mod:`dprdm.index.storage`), operator-only reports and ``manifest.json``, written last.

:func:`build_from_vectors` skips stages 1 and 2 for precomputed embeddings.  Memory: the images
of one batch, one shard of vectors, and O(N) small fixed-size per-item metadata (see
:func:`finalize_shards`); vectors are written through memory maps.

Stages 2 and 3 are :func:`finalize_shards`, the one finalize of every build path: this local
engine, the Ray Data engine (:mod:`~dprdm.index.ray_build`, same index byte for byte) and
``--from-embeddings`` (:mod:`~dprdm.index.embeddings_input`).  It is partitioned by record-id
range (:func:`~dprdm.index.records.deduplicate_partitioned`): ~40 bytes of numpy arrays per
item and O(partition) Python objects, whatever N; the shard metadata stays on disk.  (The
streaming stage still keeps the set of (owner, digest) pairs seen, to skip duplicates before
encoding them.)

Size (~400 lines): the orchestrator only; shards and record ids live in ``shards`` and ``records``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index import ivf as _ivf
from dprdm.index.corpus import CorpusReader
from dprdm.index.errors import IndexBuildError, PrivacyPolicyError
from dprdm.index.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    atomic_write_json,
    file_entry,
    index_version_of,
    write_manifest,
)
from dprdm.index.records import deduplicate_partitioned, write_records
from dprdm.index.search import QUERY_GRID_BITS, STORE_GRID_BITS, quantize_store
from dprdm.index.shards import encode_shards, prepare_output, save_npy_atomic
from dprdm.index.storage import write_padded
from dprdm.models.base import Encoder, EncoderIdentity

__all__ = ["BuildConfig", "BuildResult", "build_index", "build_from_vectors", "finalize_shards", "load_train"]

_CHECKPOINT_VERSION = 1  # the shard checkpoints' layout (unchanged by index format 2)
_CORPUS_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REFUSED_TYPES_WHY = {
    "hnsw": "a graph index's structure (which records link to which) depends on every record, sampled "
    "or not, so a query's candidates would depend on unsampled records; this voids the privacy "
    "amplification of Poisson subsampling (SPEC §5)",
}


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
        partition_rows: finalize: rows per record-id range partition (on average); any value gives
            the same index byte for byte, smaller ones less memory per partition.
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
    partition_rows: int = 1 << 20

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
        if isinstance(self.partition_rows, bool) or not isinstance(self.partition_rows, int) or self.partition_rows < 1:
            raise IndexBuildError(f"partition_rows must be a positive integer; found {self.partition_rows!r}")
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
    """Where the index went and its manifest (operator-only: exact counts).

    ``stats`` (operator-only, this run only): ``items_encoded`` (items hashed/decoded/embedded by
    this run, not read from a checkpoint) and ``items_reused`` (taken from committed checkpoints).
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    stats: dict[str, int] = field(default_factory=dict)


Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_index(
    reader: CorpusReader, encoder: Encoder, config: BuildConfig, *, log: Log | None = None
) -> BuildResult:
    """Build (or resume building) an index from ``reader`` with ``encoder``.

    Raises:
        IndexBuildError: output exists (without resume/overwrite), changed inputs on resume,
            N > N̄, encoder misbehaviour.  (IVF list overflow never fails a build: see
            :func:`dprdm.index.ivf.place_records`.)
        PrivacyPolicyError: a configuration that would void the privacy argument.
    """
    say = log or (_stderr if config.progress else (lambda _m: None))
    train = load_train(config, encoder.dimension)  # policy checks before any work
    fingerprint = {
        "format_version": _CHECKPOINT_VERSION,
        "reader": reader.describe(),
        "encoder": encoder.identity.to_dict(),
        "owner_mode": reader.has_owners,
    }
    build_dir = prepare_output(config.output, config.existing, fingerprint)
    reused = _committed_items(build_dir)
    metas = encode_shards(reader, encoder, build_dir, batch_size=config.batch_size, shard_size=config.shard_size,
                          progress=config.progress, owner_mode=reader.has_owners)
    total = metas[-1]["end"] if metas else 0
    say(f"encoding done: {total} items; finalizing")
    manifest = finalize_shards(config, encoder.identity, build_dir, metas, train, owner_mode=reader.has_owners,
                               build_info={"reader": reader.describe(), "engine": "local"})
    if not config.keep_checkpoints:
        shutil.rmtree(build_dir, ignore_errors=True)
    say(f"index written to {config.output}")
    return BuildResult(path=config.output, manifest=manifest,
                       stats={"items_encoded": total - reused, "items_reused": reused})


def _committed_items(build_dir: Path) -> int:
    ends = [json.loads(p.read_text())["end"] for p in build_dir.glob("shard-*.meta.json")]
    return max(ends, default=0)


def load_train(config: BuildConfig, dimension: int) -> tuple[npt.NDArray[np.float32], dict[str, Any]] | None:
    """The PUBLIC training vectors of an ivf build (policy-checked), or None.

    Raises:
        IndexBuildError: their dimension is not ``dimension``.
        PrivacyPolicyError: they are not public (see :func:`dprdm.index.ivf.load_public_vectors`).
    """
    if config.index_type != "ivf" or config.train_vectors is None:
        return None
    train = _ivf.load_public_vectors(config.train_vectors)
    if train[0].shape[1] != dimension:
        raise IndexBuildError(f"--train-vectors have dimension {train[0].shape[1]}, encoder has {dimension}")
    return train


# -- finalize ------------------------------------------------------------------------------------


def finalize_shards(
    config: BuildConfig,
    identity: EncoderIdentity,
    build_dir: Path,
    metas: list[dict[str, Any]],
    train: tuple[npt.NDArray[np.float32], dict[str, Any]] | None,
    *,
    owner_mode: bool,
    build_info: dict[str, Any],
    preprocessing: str | None = None,
) -> dict[str, Any]:
    """Turn committed checkpoint shards into the index directory: THE finalize of every build path.

    The 1-stable rules (:func:`~dprdm.index.records.deduplicate_partitioned`: record ids, set semantics,
    owner means), the public-size check, the IVF assignment to PUBLIC centroids, the padded data
    files and the sealed manifest.  Order-independent by construction: records are sorted by
    record id, and within the shards' concatenation (``metas`` in input order) only the FIRST
    occurrence of a content hash is kept; a duplicate's bytes, hence (fixed-size encoder calls,
    :func:`~dprdm.index.shards.embed_fixed`) its embedding, equal the first one's.

    Args:
        metas: the committed shards in input order (``start``/``end`` contiguous from 0); thin
            (:func:`~dprdm.index.shards.thin_meta`: per-item lists read from disk) or full.

    Memory: ~40 bytes of numpy arrays per embedded row (ids, order, destinations; ids.npy's
    array), O(``config.partition_rows``) Python objects, one shard of vectors, the per-item error
    records, and for owner records an (n, d) float64 sum (a memory map above 2**27 values).
        build_info: recorded under the manifest's ``build`` (operator-only).
        preprocessing: the manifest's ``preprocessing`` text (default: the image/owner rule).

    Returns:
        The sealed manifest.
    """
    rec = deduplicate_partitioned(build_dir, metas, owner_mode, partition_rows=config.partition_rows)
    _check_public_size(rec["ids"].size, config.public_size)
    staged = build_dir / "records.npy"
    write_records(build_dir, staged, metas, rec, config.dtype, identity.dimension, owner_mode)
    dedup = {
        "items_seen": metas[-1]["end"] if metas else 0,
        "unreadable_or_skipped": len(rec["errors"]),
        "exact_duplicates_dropped": sum(m["duplicates"] for m in metas) + rec["late_duplicates"],
        "images_embedded": rec["images"],
        "records": int(rec["ids"].size),
    }
    preprocessing = preprocessing or (
        "1-stable: exact duplicates removed by SHA-256 of the image bytes (set semantics"
        + (", within each owner; one record per owner = re-normalized mean embedding" if owner_mode else "")
        + "); no similarity-threshold collapsing"
    )
    report = {
        "unreadable_or_skipped": rec["errors"],
        "exact_duplicates_dropped": dedup["exact_duplicates_dropped"],
    }
    build_info = {**build_info, "batch_size": config.batch_size, "shard_size": config.shard_size}
    manifest = _emit(config, identity, build_dir, staged, rec["ids"], train,
                     record_unit="owner" if owner_mode else "image", dedup=dedup, preprocessing=preprocessing,
                     build_info=build_info, report=report, sources=rec["sources"])
    rec["sources"].unlink(missing_ok=True)
    return manifest


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
    sources: dict[int, str] | Path,
) -> dict[str, Any]:
    """Turn staged records (sorted by id, on the storage grid) into the final index directory."""
    out = config.output
    files: dict[str, Path] = {}
    extra: dict[str, Any] = {"quantizer": None}
    n = int(ids.size)
    if config.index_type == "ivf":
        ids, extra = _finalize_ivf(config, build_dir, staged, ids, train, files, identity.dimension)
    else:
        src = np.concatenate([np.arange(n, dtype=np.int64), np.full(config.public_size - n, -1, np.int64)])
        records = np.load(staged, mmap_mode="r")
        ids = write_padded(str(out / "vectors.npy.tmp"), records, ids, src)
        del records
        os.replace(out / "vectors.npy.tmp", out / "vectors.npy")
        staged.unlink(missing_ok=True)
        files["vectors.npy"] = out / "vectors.npy"
        extra["group_size"] = 1
    stored = int(np.count_nonzero(ids >= 0))  # n minus the records an IVF overflow dropped
    save_npy_atomic(out / "ids.npy", np.ascontiguousarray(ids, dtype=np.int64))
    files["ids.npy"] = out / "ids.npy"
    overflow = extra.pop("overflow", None)
    _write_operator_reports(out, {**report, "records": n, "records_stored": stored, **({"ivf_overflow": overflow} if overflow else {})},
                            sources, extra.pop("list_sizes", None))
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
        "count": stored,
        "public_size": config.public_size,
        "storage_rows": int(ids.size),
        "storage": "padded: one row per public slot; filler rows have id -1 (dprdm.index.storage)",
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
        "operator_only": ["count", "dedup", "build", "sources.tsv", "reports/"],
    }
    return write_manifest(out, manifest)  # sealed: manifest_sha256 covers every other field


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
    unique non-negative int64 and, for a private corpus, a per-record key: see
    :mod:`dprdm.index.records`).
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
    train = load_train(config, identity.dimension)
    build_dir = prepare_output(config.output, config.existing, {"vectors": True, "encoder": identity.to_dict()})
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
    src, sizes = _ivf.place_records(lists, caps)  # overflow: keep the cap_l smallest ids (never fails)
    row_ids = write_padded(str(out / "vectors.npy.tmp"), records, ids, src)
    del records
    os.replace(out / "vectors.npy.tmp", out / "vectors.npy")
    for name, arr in (("centroids.npy", centroids), ("capacities.npy", caps.astype(np.int64))):
        save_npy_atomic(out / name, arr)
        files[name] = out / name
    files["vectors.npy"] = out / "vectors.npy"
    group = _ivf.group_size(config.public_size, caps)
    extra = {
        "faiss_factory": f"IVF{nlist},Flat",
        "quantizer": {"trained_on": "public", **train[1], "algorithm": "faiss spherical k-means",
                      "nlist": nlist, "seed": _ivf.KMEANS_SEED, "grid_bits": QUERY_GRID_BITS},
        "ivf": {"nlist": nlist, "nprobe": config.nprobe, "assignment": "nearest public centroid, no balancing",
                "capacity_rule": {"formula": "max(min_capacity, ceil(slack * public_size * (t_l + 1) / (T + nlist)))",
                                  "slack": config.capacity_slack, "min_capacity": config.min_capacity,
                                  "public_training_counts": [int(c) for c in train_counts]},
                "overflow_rule": "a list keeps its cap_l records of smallest id; the others are dropped "
                                 "(neighbouring corpora: stored sets at add/remove distance <= 2)",
                "total_capacity": int(caps.sum())},
        "group_size": group,
        "list_sizes": sizes,
        "overflow": {"lists": int(np.count_nonzero(sizes > caps)),
                     "records_dropped": int(np.maximum(sizes - caps, 0).sum())},
    }
    (build_dir / staged.name).unlink(missing_ok=True)
    return row_ids, extra


def _write_operator_reports(out: Path, report: dict[str, Any], sources: dict[int, str] | Path,
                            list_sizes: npt.NDArray[np.int64] | None) -> None:
    """``reports/build_report.json`` and ``sources.tsv`` (from a dict, or a file of sorted lines)."""
    (out / "reports").mkdir(exist_ok=True)
    full: dict[str, Any] = {"note": "OPERATOR-ONLY: exact counts, file names and list sizes of the private corpus",
                            **report}
    if list_sizes is not None:
        full["ivf_list_sizes"] = [int(s) for s in list_sizes]
    atomic_write_json(out / "reports" / "build_report.json", full)
    tmp = out / "sources.tsv.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("record_id\tsource\n")
        if isinstance(sources, Path):
            with open(sources, encoding="utf-8") as lines:
                shutil.copyfileobj(lines, fh)
        else:
            fh.writelines(f"{rid}\t{src}\n" for rid, src in sorted(sources.items()))
    os.replace(tmp, out / "sources.tsv")
