"""The on-disk index format (SPEC §5) and the verified loader.

An index directory holds::

    manifest.json        format version, corpus id, encoder identity, sizes, checksums (below)
    vectors.npy          (S, d) float32|float16 unit rows on the 2**-24 grid, memory-mapped
    ids.npy              (S,) int64 record ids (a hash of the content or of the owner), -1 = filler
    centroids.npy        ivf only: (nlist, d) float64 PUBLIC coarse centroids
    capacities.npy       ivf only: (nlist,) int64 PUBLIC per-list capacities
    sources.tsv          operator-only: record id -> source key(s)
    reports/             operator-only: build report (unreadable files, dedup details, list sizes)

Format 2 (padded storage, :mod:`dprdm.index.storage`): ``S`` is public, ``N̄`` for flat and
``sum(capacities)`` for ivf, one stored row per slot of the candidate set.  Flat: the ``N``
records sorted by id, then public filler rows.  Ivf: list ``l`` at rows ``starts[l]`` to
``starts[l] + capacities[l]``, its kept records sorted by id, then filler.  ``count`` (operator-
only) is the number of real rows.  ``group_size`` is the add/remove distance between the stored
sets of neighbouring corpora (1 flat; 2 ivf with possible overflow, see :mod:`dprdm.index.ivf`):
the server charges the group-of-that-size curve.

Format 1 (rows ``N``, ivf extents in ``list_offsets.npy``) still loads: :func:`load` pads it
in memory (anonymous memory of ``S * d`` values instead of a file mapping, and the copy at load
time); rebuild the index to get a memory-mapped format 2.  Its charge is ``group_size`` 1 (flat)
or 2 (ivf: such a build passed a private capacity check, which the drop rule subsumes).
``manifest.json`` is written last (atomically), so a directory without it is not an index.

The manifest is sealed: ``manifest_sha256`` is the SHA-256 of the canonical JSON of every other
field (sorted keys, no spaces), so an edit of ``private``, ``corpus_id``, ``public_size`` or any
other field is refused by :func:`load` like a changed data file (``files`` holds the data files'
checksums, the seal covers ``files``). It guards against edits and corruption, not against
someone who rewrites the seal too (no key is involved). A manifest written before sealing
existed has no ``manifest_sha256``: it still loads, :func:`verify` reports it as unsealed, and
``dprdm index seal`` (:func:`seal`) seals it after a full verification.

Exact counts, list sizes and reports are operator-only (SPEC §3): :meth:`PrivateIndex.public_info`
is the only view meant for clients.

Size (~540 lines, over the ~400 guideline): loading and verifying are one contract (every check
that ``load`` performs, ``verify`` reports), including the format-1 compatibility path and the
manifest seal; splitting them would let the two drift.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index.checksum_cache import ChecksumCache
from dprdm.index.errors import IndexFormatError
from dprdm.index.layouts import FlatLayout, IvfLayout
from dprdm.index.search import STORE_GRID_BITS, SubsampledNeighbors, subsampled_topk
from dprdm.index.storage import FILLER_ID, filler_rows
from dprdm.models.base import EncoderIdentity

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "PrivateIndex",
    "load",
    "verify",
    "sha256_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_entry",
    "index_version_of",
    "SEAL_FIELD",
    "manifest_digest",
    "is_sealed",
    "write_manifest",
    "seal",
]

FORMAT_NAME = "dprdm-index"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SEAL_FIELD = "manifest_sha256"
_DTYPES = ("float32", "float16")
_NORM_TOLERANCE = 1e-3  # float16 rounding can exceed 1 by ~6e-5; anything above 1e-3 is corrupt
_REQUIRED = (
    "format",
    "format_version",
    "corpus_id",
    "private",
    "encoder",
    "dimension",
    "dtype",
    "count",
    "public_size",
    "index_type",
    "faiss_factory",
    "score_grid_bits",
    "files",
)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 23) -> str:
    """Hex SHA-256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest entry of one data file: size and SHA-256."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def index_version_of(corpus_id: str, files: dict[str, dict[str, Any]]) -> str:
    """A content-derived index version: hash of the corpus id and every data file's checksum."""
    h = hashlib.sha256(corpus_id.encode())
    for name in sorted(files):
        h.update(f"\0{name}\0{files[name]['sha256']}".encode())
    return h.hexdigest()[:16]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of every manifest field but the seal (``manifest_sha256``)."""
    body = {k: v for k, v in manifest.items() if k != SEAL_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_sealed(manifest: dict[str, Any]) -> bool:
    """Whether the manifest carries a seal (checked by :func:`load`; old manifests have none)."""
    return SEAL_FIELD in manifest


def write_manifest(root: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Seal ``manifest`` and write it atomically as ``root/manifest.json``; returns the sealed copy."""
    sealed = {**{k: v for k, v in manifest.items() if k != SEAL_FIELD}, SEAL_FIELD: manifest_digest(manifest)}
    atomic_write_json(Path(root) / MANIFEST, sealed)
    return sealed


def _check_seal(root: Path, m: dict[str, Any]) -> None:
    recorded = m.get(SEAL_FIELD)
    if recorded is None:
        return  # written before sealing: loadable; verify reports it
    if recorded != manifest_digest(m):
        raise IndexFormatError(
            f"{root / MANIFEST}: the manifest was edited after the build: its fields no longer match "
            f"{SEAL_FIELD} (fields such as private, corpus_id or public_size cannot be changed in place; "
            "rebuild the index, or restore the original manifest)"
        )


def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise IndexFormatError(f"index directory {str(root)!r} does not exist")
    if not mpath.is_file():
        raise IndexFormatError(f"{str(root)!r} is not an index: {MANIFEST} is missing (unfinished build?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{mpath}: manifest must be a JSON object")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise IndexFormatError(f"{mpath}: manifest is missing field(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT_NAME:
        raise IndexFormatError(f"{mpath}: format is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["format_version"] not in _READABLE_VERSIONS:
        raise IndexFormatError(
            f"{mpath}: unknown format version {manifest['format_version']!r} "
            f"(this build reads versions {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    return manifest


def _check_fields(root: Path, m: dict[str, Any]) -> EncoderIdentity:
    where = str(root / MANIFEST)
    try:
        encoder = EncoderIdentity.from_dict(m["encoder"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise IndexFormatError(f"{where}: bad encoder identity: {exc}") from None
    d = m["dimension"]
    if not isinstance(d, int) or d <= 0:
        raise IndexFormatError(f"{where}: dimension must be a positive int; found {d!r}")
    if d != encoder.dimension:
        raise IndexFormatError(
            f"{where}: dimension mismatch: manifest says {d}, encoder {encoder.name!r} has {encoder.dimension}"
        )
    if m["dtype"] not in _DTYPES:
        raise IndexFormatError(f"{where}: dtype must be one of {_DTYPES}; found {m['dtype']!r}")
    n, nbar = m["count"], m["public_size"]
    if not isinstance(n, int) or not isinstance(nbar, int) or n < 0 or nbar < n or nbar < 1:
        raise IndexFormatError(f"{where}: need 0 <= count <= public_size, public_size >= 1; found {n}, {nbar}")
    if m["score_grid_bits"] != STORE_GRID_BITS:
        raise IndexFormatError(f"{where}: score_grid_bits must be {STORE_GRID_BITS}; found {m['score_grid_bits']!r}")
    if m["index_type"] not in ("flat", "ivf"):
        raise IndexFormatError(f"{where}: unknown index_type {m['index_type']!r} (flat or ivf)")
    if not isinstance(m["files"], dict):
        raise IndexFormatError(f"{where}: 'files' must be an object")
    return encoder


def _check_file(root: Path, m: dict[str, Any], name: str, checksum: bool | ChecksumCache) -> Path:
    entry = m["files"].get(name)
    if entry is None:
        raise IndexFormatError(f"{root / MANIFEST}: no entry for required file {name!r}")
    path = root / name
    if not path.is_file():
        raise IndexFormatError(f"{path}: file is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        what = "truncated" if size < entry.get("bytes", 0) else "larger than recorded"
        raise IndexFormatError(f"{path}: file is {what}: {size} bytes, manifest records {entry.get('bytes')}")
    if checksum:
        digest = checksum.sha256(path) if isinstance(checksum, ChecksumCache) else sha256_file(path)
        if digest != entry.get("sha256"):
            raise IndexFormatError(f"{path}: checksum mismatch: sha256 {digest}, manifest records {entry.get('sha256')}")
    return path


def _npy(path: Path, shape: tuple[int, ...], dtype: str, mmap: bool = False) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFormatError(f"{path}: unreadable array ({exc})") from None
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise IndexFormatError(f"{path}: expected shape {shape} {dtype}; found {arr.shape} {arr.dtype}")
    return arr


class PrivateIndex:
    """A loaded, verified index: memory-mapped vectors, ids, layout, manifest.

    Use :meth:`search_subsampled` for DP retrieval.  ``count``, ``manifest`` and the layout's
    list offsets are operator-only; clients may see :meth:`public_info` only.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        encoder: EncoderIdentity,
        vectors: np.ndarray,
        ids: npt.NDArray[np.int64],
        layout: FlatLayout | IvfLayout,
    ) -> None:
        self.path = path
        self._manifest = manifest
        self.encoder = encoder
        self.vectors = vectors
        self.ids = ids
        self.layout = layout

    # -- facts -----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the manifest (operator-only: it holds exact counts)."""
        return copy.deepcopy(self._manifest)

    @property
    def corpus_id(self) -> str:
        return str(self._manifest["corpus_id"])

    @property
    def index_version(self) -> str:
        return str(self._manifest["index_version"])

    @property
    def dimension(self) -> int:
        return int(self._manifest["dimension"])

    @property
    def public_size(self) -> int:
        """The declared public size N̄ (public)."""
        return int(self._manifest["public_size"])

    @property
    def count(self) -> int:
        """Exact number of records N (OPERATOR-ONLY; never send to clients or metrics)."""
        return int(self._manifest["count"])

    @property
    def group_size(self) -> int:
        """Add/remove distance between the stored sets of neighbouring corpora (public).

        The server charges a query the RDP curve of a group of this size (1: the profile's own
        curve; 2: see :mod:`dprdm.index.ivf`).
        """
        m = self._manifest
        if "group_size" in m:
            return int(m["group_size"])
        return 1 if m["index_type"] == "flat" else 2  # format 1

    @property
    def private(self) -> bool:
        return bool(self._manifest["private"])

    @property
    def index_type(self) -> str:
        return str(self._manifest["index_type"])

    def public_info(self) -> dict[str, Any]:
        """The facts clients may see (SPEC §7 ListIndexes): no exact counts or list sizes."""
        info: dict[str, Any] = {
            "corpus_id": self.corpus_id,
            "index_version": self.index_version,
            "dimension": self.dimension,
            "public_size": self.public_size,
            "encoder": self.encoder.to_dict(),
            "index_type": self.index_type,
            "private": self.private,
            "group_size": self.group_size,
        }
        if isinstance(self.layout, IvfLayout):
            info["nlist"] = int(self.layout.capacities.shape[0])
            info["nprobe_default"] = self.layout.nprobe
        return info

    # -- search ----------------------------------------------------------------------------
    def search_subsampled(
        self, query: npt.ArrayLike, *, k: int, q: float, rng: np.random.Generator, nprobe: int | None = None
    ) -> SubsampledNeighbors:
        """Top ``k`` of a fresh Poisson(q) subsample; see :func:`dprdm.index.search.subsampled_topk`."""
        return subsampled_topk(self.vectors, self.ids, self.layout, query, k=k, q=q, rng=rng, nprobe=nprobe)

    def __repr__(self) -> str:
        return f"PrivateIndex({str(self.path)!r}, corpus_id={self.corpus_id!r}, public_size={self.public_size})"


def _prefault(arr: np.ndarray, page: int = 4096) -> None:
    """Touch one byte per page so the mapping is populated before serving.

    Per-query gathers then pay no first-touch page faults (2-5x slower gathers otherwise), and a
    query's latency no longer depends on which pages earlier queries happened to touch.
    """
    flat = arr.reshape(-1).view(np.uint8)
    for s in range(0, flat.size, 1 << 30):
        int(flat[s : s + (1 << 30) : page].sum())


def load(
    path: str | os.PathLike[str],
    *,
    verify_checksums: bool = True,
    expected_encoder: EncoderIdentity | None = None,
    prefault: bool = True,
    checksum_cache: str | os.PathLike[str] | None = None,
) -> PrivateIndex:
    """Open an index directory, verifying the manifest and every data file.

    Args:
        path: the index directory.
        verify_checksums: re-hash every data file (reads the whole vector file once). Sizes,
            shapes and dtypes are always checked.
        expected_encoder: if given, refuse an index built with a different encoder.
        prefault: populate the memory mapping of the vectors now (reads them into the page cache).
        checksum_cache: a directory for a :class:`~dprdm.index.checksum_cache.ChecksumCache`: a
            file whose stat is unchanged since it was last hashed is not re-hashed (its recorded
            digest is still compared with the manifest; see that module for the trade-off).

    Returns:
        The :class:`PrivateIndex`.

    Raises:
        IndexFormatError: missing/unknown-version manifest, a manifest edited after the build
            (seal mismatch), truncated file, checksum, shape, dtype or dimension mismatch,
            inconsistent IVF metadata, encoder mismatch.
    """
    root = Path(path)
    m = _read_manifest(root)
    encoder = _check_fields(root, m)
    _check_seal(root, m)
    if expected_encoder is not None and expected_encoder != encoder:
        raise IndexFormatError(
            f"{root}: built with encoder {encoder.to_dict()}, but the server uses {expected_encoder.to_dict()}"
        )
    n, d = int(m["count"]), int(m["dimension"])
    checksum: bool | ChecksumCache = verify_checksums
    if verify_checksums and checksum_cache is not None:
        checksum = ChecksumCache(checksum_cache)
    if m["format_version"] == 1:
        vectors, ids, layout = _load_v1(root, m, n, d, checksum)
    else:
        layout = _layout(root, m, d, checksum)
        rows = layout.storage_rows
        if m.get("storage_rows") != rows or m.get("group_size") not in (1, 2):
            raise IndexFormatError(f"{root / MANIFEST}: storage_rows must be {rows} (the public slots) and "
                                   f"group_size 1 or 2; found {m.get('storage_rows')!r}, {m.get('group_size')!r}")
        vectors = _npy(_check_file(root, m, "vectors.npy", checksum), (rows, d), m["dtype"], mmap=True)
        vectors = vectors.view(np.ndarray)  # plain ndarray over the mapping: no memmap indexing overhead
        ids = _npy(_check_file(root, m, "ids.npy", checksum), (rows,), "int64")
        if np.any(ids < FILLER_ID) or int(np.count_nonzero(ids >= 0)) != n:
            raise IndexFormatError(f"{root / 'ids.npy'}: expected {n} record ids >= 0 and filler ids {FILLER_ID}")
    if prefault and vectors.size:
        _prefault(vectors)
    return PrivateIndex(root, m, encoder, vectors, ids, layout)


def _layout(root: Path, m: dict[str, Any], d: int, checksum: bool | ChecksumCache) -> FlatLayout | IvfLayout:
    if m["index_type"] == "flat":
        return FlatLayout(public_size=int(m["public_size"]))
    ivf = m.get("ivf")
    where = root / MANIFEST
    if not isinstance(ivf, dict) or not isinstance(ivf.get("nlist"), int) or not isinstance(ivf.get("nprobe"), int):
        raise IndexFormatError(f"{where}: ivf index needs an 'ivf' object with integer nlist and nprobe")
    nlist = ivf["nlist"]
    cents = _npy(_check_file(root, m, "centroids.npy", checksum), (nlist, d), "float64")
    caps = _npy(_check_file(root, m, "capacities.npy", checksum), (nlist,), "int64")
    if np.any(caps < 1):
        raise IndexFormatError(f"{root / 'capacities.npy'}: capacities must be >= 1")
    if ivf["nprobe"] < 1:
        raise IndexFormatError(f"{where}: ivf.nprobe must be >= 1; found {ivf['nprobe']}")
    return IvfLayout(centroids=cents, capacities=caps, nprobe=int(ivf["nprobe"]))


def _load_v1(
    root: Path, m: dict[str, Any], n: int, d: int, checksum: bool | ChecksumCache
) -> tuple[np.ndarray, npt.NDArray[np.int64], FlatLayout | IvfLayout]:
    """Format 1 (unpadded): verify its files, then pad into anonymous memory (module docstring)."""
    vec = _npy(_check_file(root, m, "vectors.npy", checksum), (n, d), m["dtype"], mmap=True)
    ids = _npy(_check_file(root, m, "ids.npy", checksum), (n,), "int64")
    layout = _layout(root, m, d, checksum)
    if isinstance(layout, FlatLayout):
        src = np.concatenate([np.arange(n, dtype=np.int64), np.full(layout.public_size - n, -1, np.int64)])
    else:
        nlist = layout.capacities.shape[0]
        offs = _npy(_check_file(root, m, "list_offsets.npy", checksum), (nlist + 1,), "int64")
        sizes = np.diff(offs)
        if offs[0] != 0 or offs[-1] != n or np.any(sizes < 0):
            raise IndexFormatError(f"{root / 'list_offsets.npy'}: offsets must rise from 0 to count={n}")
        if np.any(sizes > layout.capacities):
            raise IndexFormatError(f"{root / 'capacities.npy'}: a list exceeds its public capacity")
        src = np.full(layout.storage_rows, -1, np.int64)
        dest = np.repeat(layout.starts - offs[:-1], sizes) + np.arange(n)
        src[dest] = np.arange(n)
    padded = np.empty((src.size, d), dtype=vec.dtype)
    for s in range(0, src.size, 65536):
        block = filler_rows(s, min(s + 65536, src.size), d, vec.dtype)
        real = np.flatnonzero(src[s : s + 65536] >= 0)
        block[real] = vec[src[s : s + 65536][real]]
        padded[s : s + block.shape[0]] = block
    row_ids = np.full(src.size, FILLER_ID, dtype=np.int64)
    row_ids[src >= 0] = ids[src[src >= 0]]
    return padded, row_ids, layout


def verify(path: str | os.PathLike[str], *, block_rows: int = 65536) -> PrivateIndex:
    """Full verification: :func:`load` with checksums, then a scan of every stored row.

    Checks that rows are finite, on the storage grid, with norm <= 1 + 1e-3, that record ids are
    unique and non-negative, that rows are in storage order (each segment -- the whole array for
    flat, one list for ivf -- holds its records in ascending id, then only filler), and that
    every filler row is the public filler (so no private data hides in it).

    Raises:
        IndexFormatError: naming the first problem found.
    """
    index = load(path, verify_checksums=True)
    m = index.manifest
    if "index_version" in m and m["index_version"] != index_version_of(str(m["corpus_id"]), m["files"]):
        raise IndexFormatError(f"{index.path / MANIFEST}: index_version {m['index_version']!r} does not match "
                               "the corpus id and the file checksums (was corpus_id edited?)")
    vec, ids = index.vectors, index.ids
    real_ids = ids[ids >= 0]
    if np.unique(real_ids).size != real_ids.size:
        raise IndexFormatError(f"{index.path / 'ids.npy'}: record ids must be unique and non-negative")
    lay = index.layout
    if isinstance(lay, IvfLayout):
        segments = list(zip(lay.starts.tolist(), lay.capacities.tolist(), strict=True))
    else:
        segments = [(0, lay.public_size)]
    for start, length in segments:
        seg = ids[start : start + length]
        real = seg >= 0
        m = int(np.count_nonzero(real))
        if not np.all(real[:m]) or np.any(np.diff(seg[:m]) <= 0):
            raise IndexFormatError(f"{index.path / 'ids.npy'}: rows are not in storage order (ascending id, "
                                   f"then filler) in rows {start}..{start + length}")
    scale = float(2**STORE_GRID_BITS)
    for s in range(0, vec.shape[0], block_rows):
        e = min(s + block_rows, vec.shape[0])
        x = np.asarray(vec[s:e], dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise IndexFormatError(f"{index.path / 'vectors.npy'}: non-finite values near row {s}")
        if np.any(np.ldexp(x, STORE_GRID_BITS) % 1.0 != 0) or np.any(np.abs(x) * scale > scale):
            raise IndexFormatError(f"{index.path / 'vectors.npy'}: values off the 2**-{STORE_GRID_BITS} grid near row {s}")
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        if np.any(norms > 1.0 + _NORM_TOLERANCE):
            raise IndexFormatError(f"{index.path / 'vectors.npy'}: a row has norm {norms.max():.6g} > 1 near row {s}")
        fill = ids[s:e] < 0
        if np.any(fill) and not np.array_equal(vec[s:e][fill], filler_rows(s, e, vec.shape[1], vec.dtype)[fill]):
            raise IndexFormatError(f"{index.path / 'vectors.npy'}: a filler row differs from the public filler "
                                   f"near row {s}")
    return index


def seal(path: str | os.PathLike[str]) -> bool:
    """Seal the manifest of an index written before sealing existed, after a full :func:`verify`.

    The seal records the manifest as it is now: check its fields (``dprdm index info``) first.

    Returns:
        True if the manifest was sealed now, False if it already was (and its seal holds).

    Raises:
        IndexFormatError: the index does not verify (a sealed manifest that was edited included).
    """
    index = verify(path)
    manifest = index.manifest
    if is_sealed(manifest):
        return False
    write_manifest(index.path, manifest)
    return True
