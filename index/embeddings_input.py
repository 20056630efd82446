"""``dprdm index build --from-embeddings``: an index from embeddings computed by another pipeline.

Input format (one or more files, read in the order given):

* **parquet** (``*.parquet``): one row per image, columns

  - ``sha256`` (string, required): hex SHA-256 of the image's BYTES (as ``sha256sum`` prints it);
    it is the content hash the 1-stable rules use, so the record ids equal those of a build
    from the images themselves;
  - ``embedding`` (list or fixed-size list of floats, required): the image embedding, ``d`` values
    (``d`` = the encoder's dimension); any non-zero finite vector, normalized here;
  - ``owner`` (string, optional): the owner (SPEC §3 unit of privacy); present -> owner records;
  - ``key`` (string, optional): the source name for the operator-only ``sources.tsv``
    (default ``FILE#ROW``).

* **NumPy** (``X.npy``): an ``(N, d)`` float16/32/64 array, plus ``X.tsv`` beside it: a header line
  naming its tab-separated columns (``sha256`` required, ``owner`` and ``key`` optional) and
  then one line per row of the array.

The same 1-stable rules as an image build (:mod:`dprdm.index.records`) apply: exact duplicates by
``sha256`` are one record (set semantics; within each owner in owner mode), one record per owner
is the re-normalized mean of its distinct embeddings; and the same finalize
(:func:`~dprdm.index.build.finalize_shards`) writes the index.  Rows are normalized exactly as the
image engines normalize an encoder's output (float64 norm, then float32), so an index built from
the embeddings an image build computed is byte-identical to that build.

Bad input stops the build with an error naming the file and row: a wrong dimension, a
non-finite or zero embedding, a malformed ``sha256``, a missing owner, mismatched lengths.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dprdm.index.build import BuildConfig, BuildResult, finalize_shards, load_train
from dprdm.index.errors import IndexBuildError
from dprdm.index.shards import Shard, committed_shards, prepare_output, unit_rows
from dprdm.models.base import EncoderIdentity

__all__ = ["build_from_embeddings", "read_embedding_rows"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 8192

Rows = tuple[npt.NDArray[np.float64], list[str], list[str | None], list[str]]
"""A block: (embeddings (n, d) float64, sha256 hex, owners or None, keys)."""


def _parquet_blocks(path: Path, dim: int) -> Iterator[tuple[int, Rows]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for col in ("sha256", "embedding"):
        if col not in names:
            raise IndexBuildError(f"{path}: no column {col!r} (columns: {sorted(names)}); see --from-embeddings format")
    cols = [c for c in ("sha256", "embedding", "owner", "key") if c in names]
    start = 0
    for batch in pf.iter_batches(batch_size=_BLOCK, columns=cols):
        emb = batch.column("embedding")
        if not (pa.types.is_list(emb.type) or pa.types.is_large_list(emb.type) or pa.types.is_fixed_size_list(emb.type)):
            raise IndexBuildError(f"{path}: column 'embedding' must be a list of floats; found {emb.type}")
        lengths = pc.fill_null(pc.list_value_length(emb), -1).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != dim)
        if bad.size:
            row = start + int(bad[0])
            found = "null" if lengths[bad[0]] < 0 else f"{lengths[bad[0]]} values"
            raise IndexBuildError(f"{path} row {row}: embedding has {found}; expected dimension {dim}")
        values = pc.list_flatten(emb).cast(pa.float64()).to_numpy(zero_copy_only=False)
        owners = batch.column("owner").to_pylist() if "owner" in cols else [None] * batch.num_rows
        keys_raw = batch.column("key").to_pylist() if "key" in cols else [None] * batch.num_rows
        keys = [str(k) if k is not None else f"{path.name}#{start + i}" for i, k in enumerate(keys_raw)]
        digests = [str(d) if d is not None else "" for d in batch.column("sha256").to_pylist()]
        yield start, (values.reshape(batch.num_rows, dim), digests, [None if o is None else str(o) for o in owners], keys)
        start += batch.num_rows


def _npy_blocks(path: Path, dim: int) -> Iterator[tuple[int, Rows]]:
    table = path.with_suffix(".tsv")
    if not table.is_file():
        raise IndexBuildError(f"{path}: needs its row table {table.name} beside it (columns sha256[, owner][, key])")
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    if x.ndim != 2 or x.shape[1] != dim:
        raise IndexBuildError(f"{path}: array has shape {x.shape}; expected (N, {dim})")
    if x.dtype.kind != "f":
        raise IndexBuildError(f"{path}: array has dtype {x.dtype}; expected float16, float32 or float64")
    header, count = _tsv_header(table), 0
    for lineno, r in enumerate(_tsv_rows(table)):  # pass 1 (streamed): check before any row is used
        count += 1
        if len(r) != len(header):
            raise IndexBuildError(f"{table} row {lineno}: {len(r)} fields; expected {len(header)} ({header})")
    if count != x.shape[0]:
        raise IndexBuildError(f"{table}: {count} rows for {x.shape[0]} embeddings in {path.name}")
    col = {name: i for i, name in enumerate(header)}
    rows = _tsv_rows(table)
    for s in range(0, x.shape[0], _BLOCK):
        part = [r for _, r in zip(range(_BLOCK), rows, strict=False)]
        owners: list[str | None] = [r[col["owner"]] or None for r in part] if "owner" in col else [None] * len(part)
        keys = [r[col["key"]] if "key" in col else f"{path.name}#{s + i}" for i, r in enumerate(part)]
        yield s, (np.asarray(x[s : s + _BLOCK], np.float64), [r[col["sha256"]] for r in part], owners, keys)


def _tsv_header(table: Path) -> list[str]:
    with open(table, encoding="utf-8") as fh:
        first = fh.readline().rstrip("\r\n")
    header = first.split("\t") if first else []
    if "sha256" not in header or set(header) - {"sha256", "owner", "key"}:
        raise IndexBuildError(f"{table}: header must name columns among sha256 (required), owner, key; found {header}")
    return header


def _tsv_rows(table: Path) -> Iterator[list[str]]:
    """The data rows of a row table, streamed (empty lines skipped)."""
    with open(table, encoding="utf-8") as fh:
        fh.readline()
        for line in fh:
            line = line.rstrip("\r\n")
            if line:
                yield line.split("\t")


def read_embedding_rows(path: str | os.PathLike[str], dim: int) -> Iterator[tuple[int, Rows]]:
    """Blocks ``(first row, rows)`` of one ``--from-embeddings`` file, checked for shape.

    Raises:
        IndexBuildError: a missing or unknown file, a missing column, a wrong dimension (naming the row).
    """
    p = Path(path)
    if not p.is_file():
        raise IndexBuildError(f"--from-embeddings file {str(p)!r} does not exist")
    if p.suffix == ".parquet":
        return _parquet_blocks(p, dim)
    if p.suffix == ".npy":
        return _npy_blocks(p, dim)
    raise IndexBuildError(f"--from-embeddings file {str(p)!r}: expected .parquet or .npy (+ .tsv)")


def _has_owner_column(path: Path) -> bool:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return "owner" in pq.ParquetFile(path).schema_arrow.names
    table = path.with_suffix(".tsv")
    return table.is_file() and "owner" in table.read_text().split("\n", 1)[0].split("\t")


def build_from_embeddings(
    files: Sequence[str | os.PathLike[str]], identity: EncoderIdentity, config: BuildConfig
) -> BuildResult:
    """Build an index from precomputed embeddings (format: see the module docstring).

    Args:
        files: parquet and/or ``.npy`` files, read in this order.
        identity: the encoder that computed the embeddings (recorded in the manifest; the server
            refuses a bundle with another encoder).
        config: as for an image build (``shard_size`` rows per checkpoint shard).

    Raises:
        IndexBuildError: bad input (naming file and row), N > N̄, an occupied output.
        PrivacyPolicyError: a configuration that would void the privacy argument.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise IndexBuildError("--from-embeddings needs at least one file")
    for p in paths:
        if not p.is_file():
            raise IndexBuildError(f"--from-embeddings file {str(p)!r} does not exist")
    owner_flags = {_has_owner_column(p) for p in paths}
    if len(owner_flags) != 1:
        raise IndexBuildError("--from-embeddings files must all have an owner column, or none")
    owner_mode = owner_flags.pop()
    train = load_train(config, identity.dimension)
    described = {"kind": "embeddings", "files": [str(p.resolve()) for p in paths]}
    fingerprint = {"embeddings": described, "encoder": identity.to_dict(), "owner_mode": owner_mode}
    build_dir = prepare_output(config.output, config.existing, fingerprint)
    metas = committed_shards(build_dir)
    done = metas[-1]["end"] if metas else 0
    shard = Shard(len(metas), done)
    pos = 0
    for path in paths:
        for first, block in read_embedding_rows(path, identity.dimension):
            unit, ok = unit_rows(block[0])
            for i in range(block[0].shape[0]):
                if pos >= done:
                    _take(shard, path, first + i, block, i, (unit[i], bool(ok[i])), owner_mode)
                pos += 1
                if pos - shard.start >= config.shard_size:
                    metas.append(shard.commit(build_dir, pos, identity.dimension, owner_mode))
                    shard = Shard(shard.number + 1, pos)
    if pos > shard.start:
        metas.append(shard.commit(build_dir, pos, identity.dimension, owner_mode))
    manifest = finalize_shards(config, identity, build_dir, metas, train, owner_mode=owner_mode,
                               build_info={"reader": described, "engine": "from-embeddings"})
    if not config.keep_checkpoints:
        shutil.rmtree(build_dir, ignore_errors=True)
    return BuildResult(path=config.output, manifest=manifest, stats={"items_encoded": pos - done, "items_reused": done})


def _take(shard: Shard, path: Path, row: int, block: Rows, i: int, normalized: tuple[npt.NDArray[np.float32], bool],
          owner_mode: bool) -> None:
    """One row: validated and normalized.  Duplicates are kept here and removed by the finalize
    (first occurrence kept, the rule :func:`dprdm.index.shards._take` applies while streaming), so
    this stage holds no per-row state: memory O(block + shard) whatever N."""
    vecs, digests, owners, keys = block
    digest = digests[i].strip().lower()
    if not _HEX64.match(digest):
        raise IndexBuildError(f"{path} row {row}: sha256 must be 64 hex digits; found {digests[i]!r}")
    owner = (owners[i] or "") if owner_mode else ""
    if owner_mode and not owner:
        raise IndexBuildError(f"{path} row {row}: missing owner")
    if not normalized[1]:
        what = "not finite" if not np.all(np.isfinite(vecs[i])) else "zero"
        raise IndexBuildError(f"{path} row {row}: embedding is {what}")
    shard.keys.append(keys[i])
    shard.digests.append(digest)
    shard.owners.append(owner)
    shard.vectors.append(normalized[0][None, :])
