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

:func:`deduplicate` works on the committed shard metadata (:mod:`dprdm.index.shards`);
:func:`write_records` then streams the kept rows, sorted by record id and on the storage grid,
into one staged array.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.index.errors import IndexBuildError
from dprdm.index.search import quantize_store

__all__ = ["record_id_from_digest", "owner_record_id", "deduplicate", "write_records"]

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
