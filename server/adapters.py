"""Adapters from the real ``dprdm.index`` and ``dprdm.models`` objects to the server's protocols.

Imported only by :func:`dprdm.server.app.default_loaders`, so tests with fakes never import
torch or faiss.
"""

from __future__ import annotations

import threading
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
        self.group_size: int = int(getattr(index, "group_size", 1))  # 2: capacity-limited IVF lists
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
        """The top-k survivors' vectors as exactly k rows (clamped to norm <= 1), zero rows where
        fewer than k slots survived: the release's work never depends on how many are real."""
        return np.asarray(self._index.search_subsampled(query, k=k, q=q, rng=rng, nprobe=nprobe).padded)


def load_index(path: str, *, checksum_cache: str | None = None) -> IndexAdapter:
    """Load and verify an index directory with :func:`dprdm.index.format.load`.

    Args:
        path: the index directory.
        checksum_cache: a directory (the server's data dir) for verified checksums: a data file whose
            stat is unchanged is not re-hashed (:mod:`dprdm.index.checksum_cache`). None: re-hash all.

    Raises:
        ValueError: the index is invalid (``IndexFormatError``).
    """
    from dprdm.index.format import load

    return IndexAdapter(load(path, checksum_cache=checksum_cache))


def load_bundle(name: str) -> Bundle:
    """Load a named encoder/generator bundle, once per resolved bundle for the whole process.

    Uses :func:`dprdm.models.registry.shared_bundle`: every index naming the same bundle (by name or
    path) gets the same encoder and generator objects, so a pipeline is in memory once however many
    corpora use it (issue 16 item 5).

    Raises:
        FileNotFoundError: unknown bundle or missing model files.
        ValueError: invalid bundle file, or a refused pairing (``BundleMismatchError``).
    """
    from dprdm.models.registry import shared_bundle

    b = shared_bundle(name)
    with _LOCK:
        key = (name, id(b))
        if key not in _WRAPPED:
            _WRAPPED[key] = Bundle(name=name, encoder=b.encoder, generator=b.generator)
        return _WRAPPED[key]


_WRAPPED: dict[tuple[str, int], Bundle] = {}
_LOCK = threading.Lock()
