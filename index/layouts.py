"""Candidate-set layouts of the subsampled k-NN (SPEC §3 timing, §5): which public slots a query
samples, and where each slot is stored.

* :class:`FlatLayout`: every record plus dummy slots up to the public size ``N̄``;
* :class:`IvfLayout`: the ``nprobe`` lists nearest the query under PUBLIC centroids, each padded
  to its PUBLIC capacity.

Either way the padded length is public, and :meth:`Candidates.rows_for` maps dummy slots to real
storage rows too, so they are gathered and scored at the cost of real ones (then score ``-inf``:
see :mod:`dprdm.index.search`).
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
    """The padded candidate set of one query: ``length`` public slots and their storage mapping."""

    length: int
    _flat_n: int = -1
    _caps: IntArray | None = None
    _sizes: IntArray | None = None
    _starts: IntArray | None = None
    _n_rows: int = 0

    def rows_for(self, positions: IntArray) -> tuple[IntArray, npt.NDArray[np.bool_]]:
        """Map survivor positions to (storage rows to gather, is-real mask).

        Dummy slots are mapped to some real row too, so they are gathered and scored at the same
        cost as real slots; their score is then replaced by ``-inf``.
        """
        if self._caps is None:
            real = positions < self._flat_n
            rows = positions % self._flat_n if self._flat_n > 0 else np.zeros_like(positions)
            return rows, real
        ends = np.cumsum(self._caps)
        li = np.searchsorted(ends, positions, side="right")
        off = positions - (ends[li] - self._caps[li])
        real = off < self._sizes[li]  # type: ignore[index]
        rows = self._starts[li] + off  # type: ignore[index]
        if self._n_rows > 0:
            rows %= self._n_rows
        else:
            rows[:] = 0
        return rows, real


@dataclass(frozen=True)
class FlatLayout:
    """Exact index: the candidate set is every stored record plus dummies up to the public ``N̄``."""

    count: int
    public_size: int

    def candidates(self, query: FloatArray, nprobe: int | None = None) -> Candidates:
        """All ``public_size`` slots; slot ``i < count`` is storage row ``i`` (records sorted by id)."""
        del query, nprobe
        return Candidates(length=self.public_size, _flat_n=self.count)


@dataclass(frozen=True)
class IvfLayout:
    """IVF index: public centroids, public per-list capacities, private list extents.

    Storage rows are sorted by (list, record id); list ``l`` occupies rows
    ``offsets[l]:offsets[l+1]`` and is padded to ``capacities[l]`` slots.
    """

    centroids: FloatArray  # (nlist, d) public, unit rows
    capacities: IntArray  # (nlist,) public
    offsets: IntArray  # (nlist + 1,) private
    nprobe: int  # default nprobe (public)

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
        return Candidates(
            length=int(caps.sum()),
            _caps=caps,
            _sizes=(self.offsets[lists + 1] - self.offsets[lists]).astype(np.int64),
            _starts=self.offsets[lists].astype(np.int64),
            _n_rows=int(self.offsets[-1]),
        )


Layout = FlatLayout | IvfLayout
