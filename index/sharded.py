"""Search over a shard set: each shard's own strict top-k, merged exactly (SPEC §4 steps 1-3, §5).

A shard set (:mod:`dprdm.index.shardset`) partitions one corpus by record-id range into shards
``0..S-1``; shard ``s`` is an ordinary index whose candidate set is its own padded slots
``P_s`` (``N̄_s`` slots for a flat shard).  One query runs, on every shard (in this process or on
a shard server, :mod:`dprdm.server.shard_service`), :func:`shard_topk`: fresh Poisson(q) coins
over ``P_s`` and the strict top ``k`` of the real survivors, always returned as ``k`` rows
(:class:`ShardTopK`; padding rows score ``-inf`` and carry id -1).  The coordinator waits for
every shard and :func:`merge_topk` takes the top ``k`` of the ``S * k`` rows under the same strict
order (score descending, record id ascending).

Theorem.  For every corpus ``D`` split into shards ``D_0, ..., D_{S-1}`` (each record in exactly
one shard) the merged result has exactly the law of the unsharded mechanism "top ``k`` real
survivors of an independent Poisson(q) subsample of the padded candidate set", run on an index
holding the records of ``D`` with the same public layout per record (flat: all of them).

Proof.  (i) *The sample.*  Every slot of every shard is kept by its own Bernoulli(q) coin, and
the coins of different shards are independent (separate draws of one CSPRNG stream in-process,
separate OS-keyed generators on shard servers), so the kept slots of ``P_0 ⊔ ... ⊔ P_{S-1}`` are
an iid Bernoulli(q) sample of the union of the slots.  Each real record has exactly one slot, so
the set ``R`` of real survivors keeps each record of ``D`` independently with probability ``q``:
the law of ``R`` is that of the unsharded mechanism's real survivors, whatever the number and
padded sizes of the shards (dummy slots never rank above a real one and are never returned, so
their number changes the work, which is public, and not the output).  (ii) *The selection.*  Let
``≺`` be the strict order, total on ``D`` because record ids are unique across the set (the
loader checks that shards' id ranges are disjoint and ids unique within each).  Let
``T = top_k(R)`` and ``U = ⋃_s top_k(R ∩ D_s)``.  If ``x ∈ T`` lies in shard ``s``, fewer than ``k``
elements of ``R`` precede ``x``, a fortiori fewer than ``k`` of ``R ∩ D_s``, so ``x ∈ top_k(R ∩
D_s) ⊆ U``.  Hence ``T ⊆ U ⊆ R``, and the ``k`` first elements of any set between ``T`` and ``R``
are ``T`` (if ``|R| < k``, ``T = R = U``).  So ``top_k(U) = top_k(R)``: the merge returns, on every
outcome of the coins, the selection the unsharded mechanism returns on the same survivors; with
(i), the two have the same law.  (iii) *The values.*  A shard's rows are its winners' stored rows
clamped in float64 (:func:`~dprdm.index.search.neighbors`, row by row) and its scores the exact
``<Q(u), x>`` (:mod:`dprdm.index.search`): the same bits as the unsharded search gives for the
same record, so :attr:`~dprdm.index.search.SubsampledNeighbors.padded` and the aggregate are equal
bit for bit to the unsharded ones given the same survivors.  ∎

Timing (SPEC §3): a shard's work is the unsharded search's over its public ``N̄_s`` slots; the
merge is fixed work on ``S * k`` rows; the coordinator waits for every shard, so nothing ends early
on private data.  A query's total coin work grows with ``sum_s N̄_s`` (public).

Privacy: :class:`ShardTopK` is private (ids, scores, the number of real rows), like
:class:`~dprdm.index.search.SubsampledNeighbors`; its ``repr`` is redacted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dprdm.index.format import PrivateIndex
from dprdm.index.search import SubsampledNeighbors, strict_order

__all__ = ["ShardTopK", "SearchesSubsampled", "shard_topk", "merge_topk", "check_part", "ShardedIndex"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, repr=False, eq=False)
class ShardTopK:
    """One shard's strict top-``k``, always ``k`` rows (PRIVATE: never log or return it).

    Attributes:
        scores: ``(k,)`` float64 exact scores, descending; ``-inf`` for padding rows.
        ids: ``(k,)`` int64 record ids; -1 for padding rows (which come last).
        vectors: ``(k, d)`` float64 winners' rows clamped to norm <= 1; zero for padding rows.
    """

    scores: FloatArray
    ids: IntArray
    vectors: FloatArray

    def __repr__(self) -> str:
        return f"ShardTopK(k={self.ids.shape[0]}, <private contents redacted>)"


class SearchesSubsampled(Protocol):
    """What a shard needs to be: an index with the subsampled search (a ``PrivateIndex``)."""

    def search_subsampled(
        self, query: npt.ArrayLike, *, k: int, q: float, rng: np.random.Generator, nprobe: int | None = None
    ) -> SubsampledNeighbors: ...


def shard_topk(
    index: SearchesSubsampled, query: npt.ArrayLike, *, k: int, q: float, rng: np.random.Generator,
    nprobe: int | None = None,
) -> ShardTopK:
    """One shard's part of a query: its own fresh coins, its strict top ``k``, padded to ``k`` rows.

    Args:
        index: the shard (an ordinary loaded index).
        query: ``(d,)`` public unit query.
        k, q, nprobe: the profile's numbers (see :func:`dprdm.index.search.subsampled_topk`).
        rng: this shard's coins (the OS-keyed CSPRNG in production).

    Returns:
        A :class:`ShardTopK` of exactly ``k`` rows (fixed shape whatever the number of survivors).

    Raises:
        ValueError: bad ``k``, ``q``, ``nprobe`` or query.
    """
    res = index.search_subsampled(query, k=k, q=q, rng=rng, nprobe=nprobe)
    m = res.ids.shape[0]
    scores = np.full(res.k, -np.inf)
    ids = np.full(res.k, -1, dtype=np.int64)
    scores[:m] = res.scores
    ids[:m] = res.ids
    assert res.padded is not None  # the production search always pads
    return ShardTopK(scores=scores, ids=ids, vectors=res.padded)


def merge_topk(parts: Sequence[ShardTopK], k: int) -> SubsampledNeighbors:
    """The strict top ``k`` of the union of the shards' top-``k`` rows (see the module's theorem).

    Args:
        parts: one :class:`ShardTopK` per shard, each of ``k`` rows.
        k: the profile's ``k``.

    Returns:
        The merged :class:`~dprdm.index.search.SubsampledNeighbors` (``padded`` holds the ``k``
        winners in strict order, then ``+0.0`` rows), as the unsharded search returns it.
    """
    scores = np.concatenate([p.scores for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    rows = np.concatenate([p.vectors for p in parts])
    order = strict_order(scores, ids)[:k]  # -inf padding sorts after every real score
    real = ids[order] >= 0
    padded = np.where(real[:, None], rows[order], 0.0)
    m = int(np.count_nonzero(real))
    return SubsampledNeighbors(vectors=padded[:m], ids=ids[order][:m], scores=scores[order][:m], k=k,
                               padded=padded)


def check_part(part: ShardTopK, *, k: int, dimension: int, first_id: int, last_id: int) -> None:
    """Check a part received from a shard server before merging it (fixed O(k d) work).

    A shard server answering for the wrong id range (a misrouted address serving another shard, or
    the same shard twice) would break the theorem's partition and could count one record twice,
    so every real id must lie in this shard's public range ``[first_id, last_id]``.

    Raises:
        ValueError: wrong shapes, real rows not a prefix, ids out of range or out of strict order,
            non-finite real scores, or a row of norm above 1 (names only the check that failed).
    """
    if part.scores.shape != (k,) or part.ids.shape != (k,) or part.vectors.shape != (k, dimension):
        raise ValueError(f"expected {k} rows of dimension {dimension}")
    real = part.ids >= 0
    m = int(np.count_nonzero(real))
    if not np.all(real[:m]) or np.any(part.ids[m:] != -1) or np.any(part.scores[m:] != -np.inf):
        raise ValueError("the real rows are not a prefix followed by padding")
    if m and (int(part.ids[:m].min()) < first_id or int(part.ids[:m].max()) > last_id):
        raise ValueError(f"a record id lies outside this shard's range [{first_id}, {last_id}]")
    if not np.all(np.isfinite(part.scores[:m])) or not np.array_equal(strict_order(part.scores, part.ids),
                                                                      np.arange(k)):
        raise ValueError("the rows are not in strict order (score descending, record id ascending)")
    norms = np.sqrt(np.einsum("ij,ij->i", part.vectors, part.vectors))
    if np.any(norms > 1.0 + 1e-12) or np.any(part.vectors[m:] != 0.0):
        raise ValueError("a row has norm above 1, or a padding row is not zero")


class ShardedIndex(PrivateIndex):
    """A loaded shard set searched in this process (:func:`dprdm.index.shardset.load_shard_set`).

    A :class:`~dprdm.index.format.PrivateIndex` for its facts, read from the set manifest
    (``corpus_id``, ``index_version`` -- the set's --, ``public_size`` -- the set's N̄ --, ``count``,
    ``group_size``, ...) and for :meth:`search_subsampled`; it has no storage of its own
    (``vectors``, ``ids`` and ``layout`` are None: each of :attr:`shards` has its own). ``count`` and
    ``manifest`` are operator-only.

    Args:
        path: the shard set directory.
        manifest: the verified shard set manifest (``shardset.json``).
        shards: the loaded shards in shard order (disjoint, ascending record-id ranges).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: Sequence[PrivateIndex]) -> None:
        super().__init__(path, manifest, shards[0].encoder, None, None, None)  # type: ignore[arg-type]
        self.shards = tuple(shards)

    def public_info(self) -> dict[str, Any]:
        """The facts clients may see: those of an index, plus the number of shards."""
        return {**super().public_info(), "shards": len(self.shards)}

    def search_subsampled(
        self, query: npt.ArrayLike, *, k: int, q: float, rng: np.random.Generator, nprobe: int | None = None
    ) -> SubsampledNeighbors:
        """Every shard's :func:`shard_topk` (one after the other, consuming ``rng``: disjoint, hence
        independent, coins), then :func:`merge_topk`."""
        parts = [shard_topk(s, query, k=k, q=q, rng=rng, nprobe=nprobe) for s in self.shards]
        return merge_topk(parts, parts[0].ids.shape[0])

    def __repr__(self) -> str:
        return f"ShardedIndex({str(self.path)!r}, corpus_id={self.corpus_id!r}, shards={len(self.shards)})"
