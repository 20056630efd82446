"""Record ids and deduplication of a build: the 1-stable preprocessing (SPEC §3).

Neighbouring corpora (one record added or removed) must give indexes that differ in at most one
record, so every rule here is a function of one record alone:

* image records: exact duplicates (same SHA-256 of the bytes) are one record (set semantics);
  the record id is the first 63 bits of that hash, a key of the record alone;
* owner records: one vector per owner, the re-normalized mean of the embeddings of the owner's
  distinct images (duplicates removed within the owner only, so one owner's record never
  depends on another owner); the record id is a hash of the owner name;
* no similarity-threshold collapsing (one added image could merge a whole chain); see
  :mod:`dprdm.index.duplicates` for the operator-only near-duplicate report.

:func:`deduplicate_partitioned` applies these rules to the committed shards (:mod:`dprdm.index.shards`)
by record-id RANGE partitions: record ids are hashes, every rule above only relates rows of the
same record id, so each partition ``[lo, hi)`` of the 63-bit id space is decided alone (the
partition bounds depend only on N and the partition size, and nothing about them is published).
:func:`write_records` then streams the kept rows, sorted by record id and on the storage grid,
into one staged array.

Memory of :func:`deduplicate_partitioned` (N embedded rows, n records, P rows of the largest
partition): three int64 arrays of N (record id, sort order, destination) and one of n (ids), i.e.
~24 bytes per row + 8 per record, plus O(P) Python objects for one partition, plus the per-item
error records (unreadable items; operator report).  The 32-byte digests and the source names live
in files under the build folder (read through memory maps), never in Python containers.
:func:`deduplicate` (the in-memory original, ~0.3 kB of Python objects per row) is kept as the
reference the partitioned one is tested against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index.errors import IndexBuildError
from dprdm.index.search import quantize_store
from dprdm.index.shards import shard_items

__all__ = ["record_id_from_digest", "owner_record_id", "deduplicate", "deduplicate_partitioned", "write_records"]

_MASK63 = (1 << 63) - 1


def record_id_from_digest(digest: bytes) -> int:
    """Record id of an image record: the first 63 bits of the SHA-256 of its bytes."""
    return (int.from_bytes(digest[:8], "big") >> 1) & _MASK63


def owner_record_id(owner: str) -> int:
    """Record id of an owner record: the first 63 bits of SHA-256("owner\\0" + name)."""
    return record_id_from_digest(hashlib.sha256(b"owner\0" + owner.encode("utf-8")).digest())


def deduplicate(metas: list[dict[str, Any]], owner_mode: bool) -> dict[str, Any]:
    """Deduplicate the embedded rows of the committed shards ``metas`` (in shard order).

    Returns:
        ``ids`` (sorted int64 record ids), ``dest`` (per embedded row: its record's rank in
        ``ids``, or -1 if dropped), ``sources`` (record id -> source key or owner name),
        ``images`` (rows kept) and ``late_duplicates`` (rows dropped here).

    Raises:
        IndexBuildError: two distinct records share a 63-bit id.
    """
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


def deduplicate_partitioned(build_dir: Path, metas: list[dict[str, Any]], owner_mode: bool, *,
                            partition_rows: int = 1 << 20) -> dict[str, Any]:
    """:func:`deduplicate`, by record-id range partitions with bounded memory (module docstring).

    Pass 1 streams the shards once (one meta file at a time): per row its record id (in memory),
    its digest and source name (to ``digests.npy`` / ``names.bin`` under ``build_dir``).  Then the
    63-bit id space is cut into ``2**b`` equal ranges, ``b`` the least with at most
    ``partition_rows`` rows per range ON AVERAGE (ids are uniform hashes), and each range, in id
    order, keeps the first occurrence (in shard order) of each (record id, digest) pair, checks
    for id collisions and appends its ``record_id<TAB>source`` lines to ``sources.part``.

    Returns:
        As :func:`deduplicate`, except ``sources``: the path of the sorted ``sources.part`` file;
        plus ``errors`` (the shards' per-item error records, in order).

    Raises:
        IndexBuildError: two distinct records share a 63-bit id; ``partition_rows`` < 1.
    """
    if partition_rows < 1:
        raise IndexBuildError(f"partition_rows must be >= 1; found {partition_rows}")
    rid, errors, digests, names, offsets = _scan_shards(build_dir, metas, owner_mode)
    total = rid.size
    bits = 0
    while bits < 63 and (total >> bits) > partition_rows:
        bits += 1
    order = np.argsort(rid, kind="stable")  # (record id, row) order
    bounds = np.searchsorted(rid[order], np.arange(1 << bits, dtype=np.int64) << (63 - bits))
    bounds = np.append(bounds, total)
    dest = np.full(total, -1, np.int64)
    ids_parts: list[npt.NDArray[np.int64]] = []
    n = 0
    with open(build_dir / "sources.part", "w", encoding="utf-8") as src:
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if a == b:
                continue
            rows = order[a:b]
            ids = _partition(rows, rid[rows], digests, names, offsets, owner_mode, dest, n, src)
            ids_parts.append(ids)
            n += ids.size
    del digests, names
    (build_dir / "digests.npy").unlink(missing_ok=True)
    (build_dir / "names.bin").unlink(missing_ok=True)
    images = int(np.count_nonzero(dest >= 0))
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return {"ids": ids_all, "dest": dest, "sources": build_dir / "sources.part", "images": images,
            "late_duplicates": total - images, "errors": errors}


def _scan_shards(build_dir: Path, metas: list[dict[str, Any]], owner_mode: bool) -> tuple[
        npt.NDArray[np.int64], list[dict[str, str]], Any, Any, npt.NDArray[np.int64]]:
    """Pass 1: record ids (memory), digests and names (files), name offsets, error records."""
    total = sum(int(m["rows"]) if "rows" in m else len(m["digests"]) for m in metas)
    rid = np.zeros(total, np.int64)
    offsets = np.zeros(total + 1, np.int64)
    errors: list[dict[str, str]] = []
    dig = np.lib.format.open_memmap(build_dir / "digests.npy", mode="w+", dtype=np.uint8, shape=(max(total, 1), 32))
    pos, nbytes = 0, 0
    with open(build_dir / "names.bin", "wb") as fh:
        for meta in metas:
            full = shard_items(build_dir, meta)
            k = len(full["digests"])
            errors.extend(full["errors"])
            raw = np.frombuffer(b"".join(bytes.fromhex(d) for d in full["digests"]), np.uint8).reshape(k, 32)
            dig[pos : pos + k] = raw
            if owner_mode:
                rid[pos : pos + k] = [owner_record_id(o) for o in full["owners"]]
                labels = full["owners"]
            else:
                rid[pos : pos + k] = (raw[:, :8].copy().view(">u8").ravel() >> np.uint64(1)).astype(np.int64)
                labels = full["keys"]
            encoded = [str(x).encode("utf-8") for x in labels]
            offsets[pos + 1 : pos + k + 1] = nbytes + np.cumsum([len(e) for e in encoded], dtype=np.int64)
            nbytes += sum(len(e) for e in encoded)
            fh.write(b"".join(encoded))
            pos += k
            del full
    dig.flush()
    names = np.memmap(build_dir / "names.bin", dtype=np.uint8, mode="r") if nbytes else np.zeros(0, np.uint8)
    return rid, errors, dig, names, offsets


def _partition(rows: npt.NDArray[np.int64], prid: npt.NDArray[np.int64], digests: Any, names: Any,
               offsets: npt.NDArray[np.int64], owner_mode: bool, dest: npt.NDArray[np.int64], base: int,
               src: Any) -> npt.NDArray[np.int64]:
    """One id range: ``rows`` in (record id, row) order; fills ``dest``, writes sources, returns its ids."""
    key = np.empty((rows.size, 40), np.uint8)
    key[:, :8] = prid.astype(">i8").view(np.uint8).reshape(-1, 8)
    key[:, 8:] = digests[rows]
    _, first = np.unique(key.view("V40").ravel(), return_index=True)  # first in (id, row) order
    first.sort()
    kept = rows[first]
    ids, inverse = np.unique(prid[first], return_inverse=True)

    def name(row: int) -> str:
        return bytes(names[offsets[row] : offsets[row + 1]]).decode("utf-8")

    if owner_mode:  # every row of one owner id must carry the same owner name
        starts = np.flatnonzero(np.r_[True, prid[1:] != prid[:-1]])
        label = [name(int(rows[s])) for s in starts]
        for s, e, lab in zip(starts, np.r_[starts[1:], rows.size], label, strict=True):
            if any(name(int(r)) != lab for r in rows[s + 1 : e]):
                raise IndexBuildError("record id collision (two distinct records share a 63-bit id); report this")
    else:
        if ids.size != first.size:
            raise IndexBuildError("record id collision (two distinct records share a 63-bit id); report this")
        label = [name(int(r)) for r in kept]
    dest[kept] = base + inverse.ravel()
    src.writelines(f"{int(i)}\t{lab}\n" for i, lab in zip(ids, label, strict=True))
    return ids.astype(np.int64)


def write_records(build_dir: Path, staged: Path, metas: list[dict[str, Any]], rec: dict[str, Any],
                  dtype: str, d: int, owner_mode: bool) -> None:
    """Write the records of :func:`deduplicate` ``rec`` to ``staged`` (atomically), one row per id.

    Image records copy their row; owner records sum their rows (in memory up to 2**27 values,
    else in a memory map under ``build_dir``) and are re-normalized by :func:`quantize_store`.
    """
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
