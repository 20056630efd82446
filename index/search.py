"""The exact Poisson-subsampled k-NN of DP-RDM (SPEC §4 steps 1-3, §5).

Mechanism (for one query ``u``): every slot of the *padded candidate set* -- ``N̄`` slots for a
flat index, the probed lists padded to their public capacities for an IVF index (see
:mod:`dprdm.index.layouts`) -- is kept independently with probability ``q``; dummy slots rank
below every real one and are never returned; the result is the top ``k`` real survivors under
the strict order (score descending, record id ascending).  Fewer than ``k`` survivors give fewer vectors (the aggregation still
divides by ``k``: zero padding) and nothing else changes.

How it is computed (:func:`poisson_positions`): survivor positions are generated directly by
iid geometric gaps, so the work is proportional to the number of survivors ``~ Binomial(L, q)``
(``L`` the public padded length) and never to the private corpus.  Survivors are mapped to
storage rows, gathered in blocks, scored exactly, and the strict-order top ``k`` is taken.

Timing is a release (SPEC §3).  The storage is padded so that every public slot has its own
stored row (:mod:`dprdm.index.storage`): a dummy slot is a PUBLIC filler row with id -1, read at
the address its slot maps to, exactly as a real slot would be.  For a fixed public layout, query
and coins, the sequence of operations and the shape of every array processed (positions, rows,
gathered blocks, scores, keys, partitions, the ``(k, d)`` padded winners) are identical for every
corpus; so are the storage addresses read, which are spread over the whole stored array.  No
step branches on the number of real survivors or masks by it (dummies are excluded by
branch-free arithmetic on the keys, :func:`_selection_keys`).  What remains data dependent is
what no numpy code can avoid and what does not depend on ``N`` as such: the values compared by
the partitions and the cache state left by other work.

Exact scores (:func:`quantize_query`, :data:`STORE_GRID_BITS`): stored coordinates are integer
multiples of ``2**-24`` (float16 values in [-1, 1] always are; float32 vectors are rounded to that
grid at build time) and the query is rounded to multiples of ``2**-28``.  Every product
``x_j * u_j`` and every partial sum of any subset of them is then a multiple of ``2**-52`` of
magnitude ``<= ||x|| ||u|| < 2``, hence exactly representable in float64.  Any float64 evaluation
order (BLAS blocking, FMA, SIMD lanes, threads) therefore yields the *exact* real number
``<Q(u), x>``: the score is a deterministic function of ``(u, x)`` alone, whatever the batch, the
block or the number of survivors, and ties are genuine ties, broken by record id.

Record ids are a deterministic per-record key (a hash of the content, or of the owner), so the
tie-break of two records never depends on other records of the corpus.

Privacy: a :class:`SubsampledNeighbors` holds private data (ids, scores, the survivor count
``len(vectors)``); only the noisy aggregate derived from :meth:`SubsampledNeighbors.aggregate`
may leave the server.  Its ``repr`` is redacted so it cannot leak into a log line by accident.

Backends: this module is the host (numpy) backend.  :mod:`dprdm.index.device` runs the middle of
the same search (gather, exact scores, the strict top-k's partitions) on a torch device and shares
everything else with it: :func:`sampled_rows` (validation, query grid, coins, slot -> row map: on
the host, from the same generator), :func:`strict_order` (the final order of the ``k`` candidates)
and :func:`neighbors` (clamping and zero padding).  Its docstring proves both give the same bits.

Size (~450 lines, over the ~400 guideline): the equivalence proof, the survivor positions, the
exact scores and the strict top-k are one argument, shared with the device backend; the layouts
are in ``layouts``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dprdm.index.layouts import FlatLayout, Layout

__all__ = [
    "STORE_GRID_BITS",
    "QUERY_GRID_BITS",
    "SubsampledNeighbors",
    "poisson_positions",
    "quantize_query",
    "quantize_store",
    "exact_scores",
    "subsampled_topk",
    "subsampled_topk_batch",
    "search_array",
    "sampled_rows",
    "strict_order",
    "clamp_rows",
    "neighbors",
]

STORE_GRID_BITS = 24
"""Stored coordinates are integer multiples of ``2**-STORE_GRID_BITS``."""
QUERY_GRID_BITS = 28
"""Queries are rounded to integer multiples of ``2**-QUERY_GRID_BITS`` (24 + 28 = 52 bits)."""
_QUERY_NORM_LIMIT = 1.001  # exactness needs ||x|| ||u|| < 2; queries are unit vectors
_BLOCK_ELEMENTS = 1 << 17  # rows per scoring block ~ 1 MiB of float64 (cache resident)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, repr=False, eq=False)
class SubsampledNeighbors:
    """The top ``k`` of one Poisson subsample, in strict order (score desc, record id asc).

    PRIVATE: every field is a statistic of the private corpus.  The server may pass
    :meth:`aggregate` (or ``vectors``) to the release step and nothing else: never ids, scores,
    ``len(vectors)`` (which reveals that fewer than ``k`` survived), or timings.

    Attributes:
        vectors: ``(m, d)`` float64, each row clamped to norm <= 1, ``m <= k``; ``m < k`` only
            when fewer than ``k`` real records survived.
        ids: ``(m,)`` int64 record ids (never -1), for tests, benchmarks and operator reports.
        scores: ``(m,)`` exact scores ``<Q(u), x>`` (descending).
        k: the requested ``k`` (the divisor of the aggregate).
        padded: ``(k, d)`` float64: ``vectors`` followed by zero rows (None from the test oracle).
            What the release step should be given: the same sum as ``vectors``, and a shape
            that never reveals the number of real survivors.
    """

    vectors: FloatArray
    ids: IntArray
    scores: FloatArray
    k: int
    padded: FloatArray | None = None

    def aggregate(self) -> FloatArray:
        """``v = (1/k) * sum(vectors)``: zero padding when fewer than ``k`` survived (SPEC §4.3).

        Sums the ``(k, d)`` :attr:`padded` rows when present (the same value; fixed work).
        """
        rows = self.vectors if self.padded is None else self.padded
        return rows.sum(axis=0) / float(self.k)

    def __repr__(self) -> str:
        return f"SubsampledNeighbors(k={self.k}, d={self.vectors.shape[1]}, <private contents redacted>)"




def poisson_positions(length: int, q: float, rng: np.random.Generator) -> IntArray:
    """Positions kept by independent Bernoulli(q) coins over ``range(length)``, sorted.

    Drawn as iid geometric gaps, walked to the end: ``P_1 = G_1``, ``P_{j+1} = P_j + 1 + G_{j+1}``,
    ``G = floor(log U / log1p(-q))`` with ``U`` uniform on (0, 1]; stop at the first
    ``P_j >= length``.  ``q == 1`` keeps every position without drawing.

    Proof of equivalence with ``length`` iid Bernoulli(q) coins.  (i) ``G`` is geometric on
    {0, 1, ...}: ``P(G >= g) = P(log U <= g log(1-q)) = P(U <= (1-q)**g) = (1-q)**g``.
    (ii) Fix any pattern with ones exactly at ``s_1 < ... < s_m`` in ``range(n)``.  The walk
    produces exactly that set iff ``G_1 = s_1``, ``G_j = s_j - s_{j-1} - 1`` (j = 2..m) and
    ``G_{m+1} >= n - 1 - s_m`` (``G_1 >= n`` when m = 0).  By independence its probability is
    ``q**m (1-q)**(sum of the gaps) * (1-q)**(n-1-s_m) = q**m (1-q)**(s_m-m+1 + n-1-s_m)
    = q**m (1-q)**(n-m)``, the probability of that pattern under iid Bernoulli(q) coins.  As both
    laws agree on every pattern they are equal, so the top-k of the walked set is distributed
    exactly as the top-k of the coin-selected subset (the selection is a function of the set).
    (iii) The walk never stops early: the gaps are consumed until the end of the candidate set,
    so slots near the end are as likely to survive as any other ("take the top M, then flip
    coins" would not be this mechanism).  Caveat, as for every floating-point sampler: ``U`` has
    53-bit resolution, so ``P(G >= g)`` matches ``(1-q)**g`` up to ~2**-53 relative error.

    The number of draws is (survivors + 1) rounded up to a chunk: it depends on ``length`` and
    ``q`` (public) and on the coins, never on the private data.

    Args:
        length: public size of the padded candidate set (>= 0).
        q: sampling probability, ``0 < q <= 1``.
        rng: a fresh-coin generator (the privacy core's CSPRNG in production).

    Returns:
        Sorted int64 positions in ``range(length)``.

    Raises:
        ValueError: if ``q`` is not in (0, 1] or ``length`` is negative.
    """
    if not (isinstance(q, (float, int)) and 0.0 < float(q) <= 1.0) or math.isnan(q):
        raise ValueError(f"q must be in (0, 1]; found {q!r}")
    if length < 0:
        raise ValueError(f"candidate length must be >= 0; found {length}")
    if length == 0:
        return np.empty(0, dtype=np.int64)
    if q == 1.0:
        return np.arange(length, dtype=np.int64)
    log1mq = math.log1p(-float(q))
    chunk = _chunk_size(length * float(q))
    pieces: list[IntArray] = []
    last = -1.0
    cap = float(length) + 1.0
    while True:
        u = rng.random(chunk)
        np.subtract(1.0, u, out=u)  # (0, 1]
        np.log(u, out=u)
        u /= log1mq
        np.floor(u, out=u)  # gap G >= 0
        u += 1.0  # step to the next survivor
        np.minimum(u, cap, out=u)  # avoid overflow; any step past the end ends the walk
        np.cumsum(u, out=u)
        u += last
        cut = int(np.searchsorted(u, length, side="left"))
        pieces.append(u[:cut].astype(np.int64))
        if cut < chunk:
            break
        last = float(u[-1])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _chunk_size(expected: float) -> int:
    """Uniforms drawn per round: one round suffices with probability > 1 - 1e-9."""
    return int(expected + 6.0 * math.sqrt(expected) + 64)


def quantize_query(query: npt.ArrayLike, dimension: int) -> FloatArray:
    """Validate a query and round it to the ``2**-28`` grid (float64); see the module docstring.

    Raises:
        ValueError: wrong shape, non-finite values, or norm above 1.001 (queries are unit vectors).
    """
    u = np.asarray(query, dtype=np.float64)
    if u.shape != (dimension,):
        raise ValueError(f"query must have shape ({dimension},); found {u.shape}")
    norm = float(np.sqrt(np.dot(u, u)))
    if not math.isfinite(norm):
        raise ValueError("query contains non-finite values")
    if norm > _QUERY_NORM_LIMIT:
        raise ValueError(f"query must be a unit vector (norm <= {_QUERY_NORM_LIMIT}); found norm {norm:.6g}")
    return np.ldexp(np.round(np.ldexp(u, QUERY_GRID_BITS)), -QUERY_GRID_BITS)


def quantize_store(vectors: npt.ArrayLike, dtype: str | np.dtype) -> npt.NDArray[np.floating]:
    """Normalize rows and put them on the storage grid in ``dtype`` (float32 or float16).

    float32: rows are rounded to multiples of ``2**-24`` (exact in float32 since |x| <= 1);
    float16: plain rounding to float16 (every float16 in [-1, 1] is on that grid already).
    Zero rows stay zero.
    """
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x = x / np.where(norms > 0, norms, 1.0)[:, None]
    dt = np.dtype(dtype)
    if dt == np.float16:
        return x.astype(np.float16)
    if dt == np.float32:
        return np.ldexp(np.round(np.ldexp(x, STORE_GRID_BITS)), -STORE_GRID_BITS).astype(np.float32)
    raise ValueError(f"storage dtype must be float32 or float16; found {dt}")


def exact_scores(vectors: npt.NDArray[np.floating], rows: IntArray, qhat: FloatArray) -> FloatArray:
    """Exact scores ``<qhat, vectors[r]>`` for ``rows``, gathered and scored in cache-sized blocks."""
    m = rows.shape[0]
    d = vectors.shape[1]
    out = np.empty(m, dtype=np.float64)
    if m == 0:
        return out
    block = max(16, _BLOCK_ELEMENTS // max(d, 1))
    block = min(block, m)
    raw = np.empty((block, d), dtype=vectors.dtype)
    wide = raw if vectors.dtype == np.float64 else np.empty((block, d), dtype=np.float64)
    for s in range(0, m, block):
        e = min(s + block, m)
        n = e - s
        np.take(vectors, rows[s:e], axis=0, out=raw[:n], mode="clip")
        if wide is not raw:
            wide[:n] = raw[:n]
        np.dot(wide[:n], qhat, out=out[s:e])
    return out


_DUMMY_SHIFT = 8.0  # dummy keys = score - 8 < -6 < -2 < every real score (|score| < 2)
_I64_MIN = np.iinfo(np.int64).min
_I64_MAX = np.iinfo(np.int64).max


def _selection_keys(scores: FloatArray, real: npt.NDArray[np.bool_]) -> FloatArray:
    """Order keys: the exact score for real slots, ``score - 8`` (below every real score) for dummies.

    Branch-free arithmetic over every gathered slot (no masked assignment whose work is the
    number of dummies).  Dummy keys stay as spread as real ones, so the selection below sees
    distinct-looking values whatever the share of dummies (an array of ``-inf`` ties would be
    partitioned at a different speed).  The shifted keys are not exact, and need not be: they
    are only compared with real keys, which they lie strictly below.
    """
    return scores - _DUMMY_SHIFT * (~real)


def _strict_topk(keys: FloatArray, ids: IntArray, k: int) -> IntArray:
    """Indices of the top ``min(k, m)`` keys under (key desc, id asc), in that order.

    Fixed work for a given number ``m`` of gathered slots and ``k`` (the only branch is on
    ``m <= k``, a function of the public sizes and the coins): ``t`` = the k-th largest key by one
    partition; then one integer partition of the composite ``INT64_MIN`` (key > t), ``id``
    (key == t), ``INT64_MAX`` (key < t) takes every key above ``t`` (fewer than ``k`` of them)
    and, among the ties at ``t``, the smallest ids: exactly the strict-order top ``k``.  Ties at
    ``t`` are either all real or all dummies (their keys are disjoint ranges).
    """
    m = keys.shape[0]
    if m <= k:
        cand = np.arange(m)
    else:
        t = np.partition(keys, m - k)[m - k]
        comp = np.where(keys > t, _I64_MIN, np.where(keys == t, ids, _I64_MAX))
        cand = np.argpartition(comp, k - 1)[:k]
    return cand[strict_order(keys[cand], ids[cand])]


def strict_order(keys: FloatArray, ids: IntArray) -> IntArray:
    """The permutation sorting candidates by (key descending, id ascending).

    The last step of every backend's top-k (:func:`_strict_topk`, :mod:`dprdm.index.device`):
    the same candidate keys and ids give the same order.
    """
    return np.lexsort((ids, -keys))


def clamp_rows(rows: npt.NDArray[np.floating]) -> FloatArray:
    """Rows in float64, each divided by ``max(1, ||x||)`` (SPEC §4: float16 storage may exceed 1)."""
    x = np.asarray(rows, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.maximum(1.0, norms)[:, None]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; found {k!r}")
    return int(k)


def _select(
    vectors: npt.NDArray[np.floating], ids: IntArray, rows: IntArray, qhat: FloatArray, k: int
) -> SubsampledNeighbors:
    """Gather, score, strict top-k, clamp, zero the dummies: no branch on the number of real slots.

    Every step processes arrays whose shapes are ``len(rows)`` (the sampled slots: public
    sizes and coins), ``min(k, len(rows))`` or ``k``: the rows read, the ids read, the
    scores, the keys, the partitions, the gathered winners and the ``(k, d)`` padded output.
    How many survivors are real only decides ``m_real``, which slices views of the already
    computed arrays (O(1)).
    """
    row_ids = ids[rows]
    real = row_ids >= 0  # filler rows carry FILLER_ID = -1
    scores = exact_scores(vectors, rows, qhat)
    keys = _selection_keys(scores, real)
    chosen = _strict_topk(keys, row_ids, k)
    return neighbors(vectors[rows[chosen]], row_ids[chosen], scores[chosen], real[chosen], k)


def neighbors(
    raw: npt.NDArray[np.floating], ids: IntArray, scores: FloatArray, real: npt.NDArray[np.bool_], k: int
) -> SubsampledNeighbors:
    """One search's result from its ``c = min(k, m)`` winners in strict order (every backend's last step).

    Args:
        raw: ``(c, d)`` the winners' stored rows (any float dtype).
        ids: ``(c,)`` their record ids (-1: dummy).
        scores: ``(c,)`` their exact scores.
        real: ``(c,)`` True for real records; dummies sort last, so the real winners are a prefix.
        k: the requested ``k``.

    Returns:
        A :class:`SubsampledNeighbors` whose ``padded`` holds the clamped real winners, then
        ``+0.0`` rows (the same bits whichever dummies were taken).
    """
    c = raw.shape[0]
    padded = np.zeros((k, raw.shape[1]), dtype=np.float64)
    padded[:c] = np.where(real[:, None], clamp_rows(raw), 0.0)
    m_real = int(np.count_nonzero(real))
    return SubsampledNeighbors(vectors=padded[:m_real], ids=ids[:m_real],
                               scores=scores[:m_real], k=k, padded=padded)


def sampled_rows(
    layout: Layout, query: npt.ArrayLike, dimension: int, *, k: int, q: float, rng: np.random.Generator,
    nprobe: int | None = None,
) -> tuple[int, FloatArray, IntArray]:
    """The host half of every backend: validate, quantize the query, draw the coins, map slots to rows.

    Returns:
        ``(k, qhat, rows)``: the checked ``k``, the query on the ``2**-28`` grid and the storage
        rows of the sampled slots (in slot order).  The coins come from ``rng`` alone, so two
        backends given generators in the same state sample the same rows.

    Raises:
        ValueError: bad ``k``, ``q``, ``nprobe`` or query.
    """
    k = _check_k(k)
    qhat = quantize_query(query, dimension)
    cands = layout.candidates(qhat, nprobe)
    positions = poisson_positions(cands.length, q, rng)
    return k, qhat, cands.rows_for(positions)


def subsampled_topk(
    vectors: npt.NDArray[np.floating],
    ids: IntArray,
    layout: Layout,
    query: npt.ArrayLike,
    *,
    k: int,
    q: float,
    rng: np.random.Generator,
    nprobe: int | None = None,
) -> SubsampledNeighbors:
    """Top ``k`` of an independent Poisson(q) subsample of the padded candidate set of ``query``.

    Args:
        vectors: ``(S, d)`` stored rows on the storage grid (float32/float16, may be a memmap),
            padded to one row per public slot of the layout (:mod:`dprdm.index.storage`).
        ids: ``(S,)`` record ids of the rows; -1 marks a filler (dummy) row.
        layout: :class:`FlatLayout` or :class:`IvfLayout` (public sizes / capacities).
        query: ``(d,)`` unit query embedding (public).
        k: number of neighbours (>= 1).
        q: Poisson sampling probability in (0, 1].
        rng: fresh coins for this query (CSPRNG-backed in production).
        nprobe: IVF only, overrides the layout's default (fixed per profile).

    Returns:
        A :class:`SubsampledNeighbors` (private; see its docstring).

    Raises:
        ValueError: bad ``k``, ``q``, ``nprobe`` or query.
    """
    k, qhat, rows = sampled_rows(layout, query, vectors.shape[1], k=k, q=q, rng=rng, nprobe=nprobe)
    return _select(vectors, ids, rows, qhat, k)


def subsampled_topk_batch(
    vectors: npt.NDArray[np.floating],
    ids: IntArray,
    layout: Layout,
    queries: npt.ArrayLike,
    *,
    k: int,
    q: float,
    rng: np.random.Generator | Sequence[np.random.Generator],
    nprobe: int | None = None,
) -> list[SubsampledNeighbors]:
    """:func:`subsampled_topk` for each row of ``queries``; every query draws its own fresh coins.

    ``rng`` is one generator (consumed sequentially, so coins are never shared) or one generator
    per query (e.g. ChaCha keyed per query).  A shared subsample across a batch would be a
    single release of larger sensitivity, which is why it is not offered.
    """
    qs = np.asarray(queries, dtype=np.float64)
    if qs.ndim != 2:
        raise ValueError(f"queries must be a 2-D array (B, d); found shape {qs.shape}")
    rngs: Sequence[np.random.Generator]
    if isinstance(rng, np.random.Generator):
        rngs = [rng] * qs.shape[0]
    else:
        rngs = list(rng)
        if len(rngs) != qs.shape[0]:
            raise ValueError(f"got {len(rngs)} generators for {qs.shape[0]} queries")
    return [
        subsampled_topk(vectors, ids, layout, qs[i], k=k, q=q, rng=rngs[i], nprobe=nprobe)
        for i in range(qs.shape[0])
    ]


def search_array(
    vectors: npt.ArrayLike, ids: npt.ArrayLike, query: npt.ArrayLike, k: int, q: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """The production subsampled top-k over an in-memory flat corpus (N̄ = N): the search the
    empirical audit (:func:`dprdm.privacy.empirical_audit.audit_retrieval`) runs, passed in by its callers so
    the privacy core imports nothing of the project.

    Returns:
        The selected vectors (at most k rows), in the strict order.
    """
    stored = quantize_store(np.asarray(vectors), "float32")
    layout = FlatLayout(public_size=stored.shape[0])
    rids = np.asarray(ids, dtype=np.int64)
    if rids.size and rids.min() < 0:
        raise ValueError("record ids must be non-negative (-1 marks a filler row)")
    return subsampled_topk(stored, rids, layout, np.asarray(query), k=k, q=q, rng=rng).vectors
