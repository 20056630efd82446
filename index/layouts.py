"""Candidate-set layouts of the subsampled k-NN (SPEC §3 timing, §5): which public slots a query
samples, and which storage row holds each slot.

* :class:`FlatLayout`: ``N̄`` slots, slot ``p`` is storage row ``p``;
* :class:`IvfLayout`: the ``nprobe`` lists nearest the query under PUBLIC centroids, list ``l``
  being the ``capacities[l]`` storage rows starting at ``starts[l] = sum(capacities[:l])``.

Both are functions of public inputs only (``N̄``, centroids, capacities, nprobe): the storage is
padded so that every slot has its own row (:mod:`dprdm.index.storage`), and whether a slot is
real is read from the stored ids (``id >= 0``), not from the layout.  Hence the rows a query
reads are a function of the public layout, the public query and the coins, never of the private
corpus: dummy slots are read exactly where a real record would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Candidates", "FlatLayout", "IvfLayout", "Layout"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Candidates:
    """The padded candidate set of one query: ``length`` public slots in segments of storage.

    Segment ``j`` covers slots ``ends[j] - lengths[j] : ends[j]`` and storage rows
    ``starts[j] : starts[j] + lengths[j]``.
    """

    length: int
    starts: IntArray
    lengths: IntArray

    def rows_for(self, positions: IntArray) -> IntArray:
        """Storage rows of the sampled slots ``positions`` (sorted, in ``range(length)``).

        Fixed work per position (a search over the ``nprobe`` segment ends); no branch on data.
        """
        ends = np.cumsum(self.lengths)
        seg = np.searchsorted(ends, positions, side="right")
        return self.starts[seg] + (positions - (ends[seg] - self.lengths[seg]))


@dataclass(frozen=True)
class FlatLayout:
    """Exact index: the candidate set is the ``public_size`` stored slots (records sorted by id, then filler)."""

    public_size: int

    def candidates(self, query: FloatArray, nprobe: int | None = None) -> Candidates:
        """All ``public_size`` slots; slot ``p`` is storage row ``p``."""
        del query, nprobe
        return Candidates(length=self.public_size, starts=np.zeros(1, np.int64),
                          lengths=np.array([self.public_size], np.int64))

    @property
    def storage_rows(self) -> int:
        return self.public_size


@dataclass(frozen=True)
class IvfLayout:
    """IVF index: public centroids and public per-list capacities (storage padded to them).

    List ``l`` occupies storage rows ``starts[l] : starts[l] + capacities[l]``: its kept records
    sorted by id, then filler rows (:mod:`dprdm.index.storage`).
    """

    centroids: FloatArray  # (nlist, d) public, unit rows
    capacities: IntArray  # (nlist,) public
    nprobe: int  # default nprobe (public)

    @property
    def starts(self) -> IntArray:
        """First storage row of each list (public: cumulative capacities)."""
        return np.concatenate([[0], np.cumsum(self.capacities)[:-1]]).astype(np.int64)

    @property
    def storage_rows(self) -> int:
        return int(np.sum(self.capacities))

    def probe(self, query: FloatArray, nprobe: int | None = None) -> IntArray:
        """The ``nprobe`` lists nearest the (public) query, ascending by list id."""
        n = self.nprobe if nprobe is None else int(nprobe)
        nlist = self.centroids.shape[0]
        if n < 1:
            raise ValueError(f"nprobe must be >= 1; found {n}")
        n = min(n, nlist)
        sims = self.centroids @ np.asarray(query, dtype=np.float64)
        order = np.lexsort((np.arange(nlist), -sims))  # similarity desc, list id asc
        return np.sort(order[:n]).astype(np.int64)

    def candidates(self, query: FloatArray, nprobe: int | None = None) -> Candidates:
        """Probed lists (ascending id), each padded to its public capacity."""
        lists = self.probe(query, nprobe)
        caps = self.capacities[lists].astype(np.int64)
        return Candidates(length=int(caps.sum()), starts=self.starts[lists], lengths=caps)


Layout = FlatLayout | IvfLayout
