"""Reference implementations the tests compare production code against (not shipped in ``dprdm``).

``naive_subsampled_topk`` is the mechanism as SPEC §5 defines it, computed the naive way: one
Bernoulli(q) coin per padded slot (O(L) per query, L the public padded length), then an exact
full sort of the real survivors.  It shares with production only the definitions (the query grid
of :func:`~dprdm.index.search.quantize_query` and the padded candidate set of the layout), not the
sampler, the blocked scoring or the partial top-k, so a test comparing the two checks those.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dprdm.index.layouts import Layout
from dprdm.index.search import SubsampledNeighbors, quantize_query

__all__ = ["naive_subsampled_topk"]


def naive_subsampled_topk(
    vectors: npt.NDArray[np.floating],
    ids: npt.NDArray[np.int64],
    layout: Layout,
    query: npt.ArrayLike,
    *,
    k: int,
    q: float,
    rng: np.random.Generator,
    nprobe: int | None = None,
) -> SubsampledNeighbors:
    """Top ``k`` (score desc, record id asc) of the real slots kept by one Bernoulli(q) coin each."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; found {k!r}")
    if not 0.0 < float(q) <= 1.0:
        raise ValueError(f"q must be in (0, 1]; found {q!r}")
    qhat = quantize_query(query, vectors.shape[1])
    cands = layout.candidates(qhat, nprobe)
    kept = np.flatnonzero(rng.random(cands.length) < q).astype(np.int64)
    rows = cands.rows_for(kept)
    rows = rows[np.asarray(ids)[rows] >= 0]  # filler rows (id -1) are dummies
    x = np.asarray(vectors[rows], dtype=np.float64).reshape(rows.size, vectors.shape[1])
    scores = x @ qhat  # exact in any summation order (the grids of dprdm.index.search)
    row_ids = np.asarray(ids)[rows]
    top = np.lexsort((row_ids, -scores))[:k]
    chosen = x[top]
    chosen /= np.maximum(1.0, np.linalg.norm(chosen, axis=1))[:, None]
    return SubsampledNeighbors(vectors=chosen, ids=row_ids[top].copy(), scores=scores[top].copy(), k=k)
