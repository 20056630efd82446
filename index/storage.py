"""Padded storage (format 2): one stored row per PUBLIC slot of the candidate set (SPEC §3 timing).

Every slot a query can sample is a row of ``vectors.npy``: a flat index stores ``N̄`` rows (the
``N`` records, sorted by id, then ``N̄ - N`` filler rows); an IVF index stores, for each list
``l`` in list order, ``capacities[l]`` rows (the list's kept records, sorted by id, then filler).
``ids.npy`` has one entry per stored row: the record id, or :data:`FILLER_ID` (-1) for filler.

Why (timing is a release): slot ``p`` of the candidate set is always read from storage row
``start(segment) + offset``, a function of the public layout alone.  The addresses a query
touches are therefore a function of (the public layout, the coins), identical for every corpus
of the same public sizes, and dummy reads are spread over the whole stored array exactly as real
reads are (a dummy is never folded onto a cache-resident prefix, as the old ``position % N`` map
did).  Whether a slot is real is read from ``ids`` (``id >= 0``), never from the vector's value.

Filler rows are PUBLIC pseudo-random unit vectors on the storage grid, a function of the storage
row index, ``d`` and the dtype only (:func:`filler_rows`), so (i) their contents carry nothing of
the private corpus and ``verify`` can check them, and (ii) their values look like real
embeddings to value-dependent code paths (float16 conversion, subnormals), unlike zeros.

Cost: the stored array holds ``N̄`` rows (flat) or ``sum(capacities)`` rows (IVF) of ``d``
values in the stored dtype, plus 8 bytes of id per row, whatever ``N`` is; e.g. N̄ = 400k, d = 512,
float32: 819 MB + 3.2 MB, against ``N * 2 KiB`` before.  This memory (the index is prefaulted at
load) is the price of a per-query time that does not depend on ``N``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["FILLER_ID", "FILLER_SEED", "filler_rows", "write_padded", "pad_flat"]

FILLER_ID = -1
"""The id of a filler (dummy) storage row."""
FILLER_SEED = 0x5EED_F111
"""Public seed of the filler rows (not a DP coin: filler rows are public)."""
_FILLER_BLOCK = 4096


def _filler_block(block: int, d: int, dtype: npt.DTypeLike) -> np.ndarray:
    from dprdm.index.search import quantize_store

    x = np.random.default_rng([FILLER_SEED, d, block]).standard_normal((_FILLER_BLOCK, d))
    return quantize_store(x, np.dtype(dtype))


def filler_rows(start: int, stop: int, d: int, dtype: npt.DTypeLike) -> np.ndarray:
    """The public filler for storage rows ``start:stop`` (row ``r``'s value depends on ``r, d, dtype`` only)."""
    out = np.empty((max(0, stop - start), d), dtype=np.dtype(dtype))
    r = start
    while r < stop:
        b = r // _FILLER_BLOCK
        lo, hi = r - b * _FILLER_BLOCK, min(stop - b * _FILLER_BLOCK, _FILLER_BLOCK)
        out[r - start : r - start + hi - lo] = _filler_block(b, d, dtype)[lo:hi]
        r += hi - lo
    return out


def write_padded(
    out_path: str, records: np.ndarray, ids: npt.NDArray[np.int64], src: npt.NDArray[np.int64],
    *, block_rows: int = 65536,
) -> npt.NDArray[np.int64]:
    """Write the padded vector file: storage row ``r`` is ``records[src[r]]``, or filler if ``src[r] < 0``.

    Args:
        out_path: the ``.npy`` to create (written through a memory map; the caller renames it).
        records: ``(N, d)`` staged records on the storage grid.
        ids: ``(N,)`` their record ids.
        src: ``(S,)`` record index of each storage row, -1 for filler.

    Returns:
        ``(S,)`` int64 ids of the storage rows (:data:`FILLER_ID` for filler).
    """
    d = records.shape[1]
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=records.dtype, shape=(src.size, d))
    for s in range(0, src.size, block_rows):
        e = min(s + block_rows, src.size)
        block = filler_rows(s, e, d, records.dtype)
        real = np.flatnonzero(src[s:e] >= 0)  # build time, operator-side: not a per-query path
        if real.size:
            block[real] = records[src[s:e][real]]
        out[s:e] = block
    out.flush()
    del out
    row_ids = np.full(src.size, FILLER_ID, dtype=np.int64)
    kept = src >= 0
    row_ids[kept] = ids[src[kept]]
    return row_ids


def pad_flat(
    vectors: np.ndarray, ids: npt.ArrayLike, public_size: int
) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """In-memory flat padding (tests, the empirical audit): ``N`` rows sorted as given, then filler to ``N̄``."""
    n, d = vectors.shape
    if public_size < n:
        raise ValueError(f"public size {public_size} is smaller than the number of rows {n}")
    padded = np.concatenate([np.asarray(vectors), filler_rows(n, public_size, d, vectors.dtype)])
    row_ids = np.concatenate([np.asarray(ids, dtype=np.int64), np.full(public_size - n, FILLER_ID, np.int64)])
    return padded, row_ids
