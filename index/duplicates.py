"""Operator-only near-duplicate report (SPEC §3): lists similar records, never changes the index.

Similarity-threshold collapsing is not 1-stable (one added image can merge a whole chain), so
the index keeps every distinct record; this report tells the operator where content repeats
(``dprdm index near-duplicates``, written to ``reports/near_duplicates.json``).
Content present in ``m`` records is protected at group size ``m`` (group privacy: roughly ``m``
times the per-record epsilon), and the report says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dprdm.index.format import PrivateIndex

__all__ = ["near_duplicate_report"]


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def near_duplicate_report(index: PrivateIndex, threshold: float, *, block: int = 4096,
                          max_groups: int = 100) -> dict[str, Any]:
    """Pairs of records with cosine similarity >= ``threshold`` (exact, O(N^2 d), faiss blocked).

    Returns a JSON-able report: pair count, groups (connected components) with their sizes,
    the largest groups' record ids and sources, and the group-privacy statement.
    """
    import faiss

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; found {threshold}")
    real = np.flatnonzero(index.ids >= 0)  # stored rows holding records (the others are public filler)
    n, d = real.size, index.vectors.shape[1]
    flat = faiss.IndexFlatIP(d)
    for s in range(0, n, 65536):
        flat.add(np.ascontiguousarray(index.vectors[real[s : s + 65536]], dtype=np.float32))
    parent = np.arange(n)
    pairs = 0
    for s in range(0, n, block):
        xq = np.ascontiguousarray(index.vectors[real[s : s + block]], dtype=np.float32)
        lims, _dist, labels = flat.range_search(xq, float(threshold) - 1e-6)
        for qi in range(xq.shape[0]):
            for j in labels[lims[qi] : lims[qi + 1]]:
                i = s + qi
                if j > i:
                    pairs += 1
                    ri, rj = _find(parent, i), _find(parent, int(j))
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    uniq, counts = np.unique(roots, return_counts=True)
    multi = [(int(c), int(r)) for r, c in zip(uniq, counts, strict=True) if c > 1]
    multi.sort(reverse=True)
    sources = _sources(index.path)
    groups = []
    for size, root in multi[:max_groups]:
        members = np.flatnonzero(roots == root)
        rids = [int(index.ids[real[m]]) for m in members]
        groups.append({"size": size, "record_ids": rids, "sources": [sources.get(r, "") for r in rids]})
    sizes, freq = np.unique(np.array([c for c, _ in multi], dtype=np.int64), return_counts=True)
    largest = multi[0][0] if multi else 1
    return {
        "note": "OPERATOR-ONLY report; the index is unchanged (similarity collapsing is not 1-stable)",
        "corpus_id": index.corpus_id,
        "index_version": index.index_version,
        "threshold": threshold,
        "records": n,
        "pairs": pairs,
        "groups": len(multi),
        "largest_group": largest,
        "group_size_histogram": {str(int(s)): int(f) for s, f in zip(sizes, freq, strict=True)},
        "group_privacy": (
            f"content present in m records is protected at group size m; the largest near-duplicate group "
            f"here has m = {largest}, so its content gets roughly m times the per-record epsilon"
        ),
        "largest_groups": groups,
    }


def _sources(path: Path) -> dict[int, str]:
    f = path / "sources.tsv"
    if not f.is_file():
        return {}
    out: dict[int, str] = {}
    for line in f.read_text().splitlines()[1:]:
        rid, _, src = line.partition("\t")
        if rid.isdigit():
            out[int(rid)] = src
    return out
