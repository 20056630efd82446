"""``dprdm index verify PATH --compare OTHER``: do two index directories hold the same data?

Used to check that two builds of one corpus agree (``--engine ray`` against ``--engine local``,
a rebuild, a copy): the same record ids and byte-identical stored vectors.  Both indexes are
loaded with their checksums verified; then the data files are compared by their (verified)
SHA-256, and for a file that differs the report says how: record ids only on one side, records
whose stored vectors differ.  Operator-only output (counts of the private corpus), never ids.

Fields that do not describe the data (``created_utc``, ``build``, the operator-only ``dedup``
counts) are ignored; ``index_version`` follows from the data files and the corpus id.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dprdm.index.format import PrivateIndex, load

__all__ = ["compare_indexes"]

_DATA_FIELDS = ("corpus_id", "private", "encoder", "dimension", "dtype", "public_size", "storage_rows",
                "index_type", "metric", "score_grid_bits", "query_grid_bits", "group_size", "record_unit")


def compare_indexes(path: str | os.PathLike[str], other: str | os.PathLike[str]) -> list[str]:
    """The differences between the data of two indexes, one line each; empty if they agree.

    Raises:
        IndexFormatError: either index does not load (a bad checksum included).
    """
    a, b = load(path, prefault=False), load(other, prefault=False)
    ma, mb = a.manifest, b.manifest
    diffs = [f"manifest field {k!r}: {ma.get(k)!r} != {mb.get(k)!r}" for k in _DATA_FIELDS if ma.get(k) != mb.get(k)]
    fa, fb = ma["files"], mb["files"]
    for name in sorted(set(fa) | set(fb)):
        if name not in fa or name not in fb:
            diffs.append(f"file {name}: only in {a.path if name in fa else b.path}")
        elif fa[name]["sha256"] != fb[name]["sha256"]:
            diffs.append(f"file {name} differs (sha256 {fa[name]['sha256'][:16]}... != {fb[name]['sha256'][:16]}...)"
                         + _explain(name, a, b))
    return diffs


def _explain(name: str, a: PrivateIndex, b: PrivateIndex) -> str:
    if name not in ("ids.npy", "vectors.npy"):
        return ""
    ids_a, ids_b = np.asarray(a.ids), np.asarray(b.ids)
    real_a, real_b = ids_a[ids_a >= 0], ids_b[ids_b >= 0]
    if name == "ids.npy":
        only_a = np.setdiff1d(real_a, real_b).size
        only_b = np.setdiff1d(real_b, real_a).size
        moved = " (same record ids, other storage rows)" if not (only_a or only_b) else ""
        return f": {only_a} record id(s) only in {a.path}, {only_b} only in {b.path}{moved}"
    common, ia, ib = np.intersect1d(real_a, real_b, return_indices=True)
    rows_a, rows_b = np.flatnonzero(ids_a >= 0)[ia], np.flatnonzero(ids_b >= 0)[ib]
    differ = 0
    for s in range(0, common.size, 65536):
        va = np.asarray(a.vectors[rows_a[s : s + 65536]])
        vb = np.asarray(b.vectors[rows_b[s : s + 65536]])
        if va.dtype != vb.dtype:
            return f": stored dtypes differ ({va.dtype} != {vb.dtype})"
        differ += int(np.count_nonzero(np.any(va.view(np.uint8).reshape(len(va), -1)
                                              != vb.view(np.uint8).reshape(len(vb), -1), axis=1)))
    worst = _max_abs(a, b, rows_a, rows_b) if differ else 0.0
    return (f": {differ} of {common.size} common record(s) have different stored vectors"
            + (f" (largest difference {worst:.3g})" if differ else " (the filler or the layout differs)"))


def _max_abs(a: PrivateIndex, b: PrivateIndex, rows_a: Any, rows_b: Any) -> float:
    worst = 0.0
    for s in range(0, rows_a.size, 65536):
        d = np.abs(np.asarray(a.vectors[rows_a[s : s + 65536]], np.float64)
                   - np.asarray(b.vectors[rows_b[s : s + 65536]], np.float64))
        worst = max(worst, float(d.max(initial=0.0)))
    return worst
