"""Adapters from the real ``dprdm.index`` and ``dprdm.models`` objects to the server's protocols.

Imported only by :func:`dprdm.server.app.default_loaders`, so tests with fakes never import
torch or faiss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.models.base import EncoderIdentity

from .catalog import Bundle

__all__ = ["IndexAdapter", "load_index", "load_bundle"]


class IndexAdapter:
    """A :class:`dprdm.index.format.PrivateIndex` seen as a :class:`~dprdm.server.catalog.RetrievalIndex`.

    Only the selected vectors cross this boundary (never ids, scores or their number beyond what
    the release step needs).
    """

    def __init__(self, index: Any) -> None:
        self._index = index
        self.domain: str = str(index.corpus_id)
        self.version: str = str(index.index_version)
        self.dimension: int = int(index.dimension)
        self.public_size: int = int(index.public_size)
        self.exact_size: int = int(index.count)  # operator-only (admin GetCounts)
        self.private: bool = bool(index.private)
        enc = index.encoder
        self.encoder: EncoderIdentity = (
            enc if isinstance(enc, EncoderIdentity) else EncoderIdentity.from_dict(enc)
        )

    def search_subsampled(
        self,
        query: npt.NDArray[np.float32],
        *,
        k: int,
        q: float,
        rng: np.random.Generator,
        nprobe: int | None = None,
    ) -> npt.NDArray[np.float64]:
        """The top-k survivors' vectors (m <= k rows, clamped to norm <= 1)."""
        return np.asarray(self._index.search_subsampled(query, k=k, q=q, rng=rng, nprobe=nprobe).vectors)


def load_index(path: str) -> IndexAdapter:
    """Load and verify an index directory with :func:`dprdm.index.format.load`.

    Raises:
        ValueError: the index is invalid (``IndexFormatError``).
    """
    from dprdm.index.format import load

    return IndexAdapter(load(path))


def load_bundle(name: str) -> Bundle:
    """Load a named encoder/generator bundle with :func:`dprdm.models.registry.load_bundle`.

    Raises:
        FileNotFoundError: unknown bundle or missing model files.
        ValueError: invalid bundle file.
    """
    from dprdm.models.registry import load_bundle as load_registry_bundle

    b = load_registry_bundle(name)
    return Bundle(name=name, encoder=b.encoder, generator=b.generator)
