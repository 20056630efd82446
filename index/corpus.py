"""The corpus-reader protocol: a deterministic, resumable stream of raw image records.

Every reader yields :class:`CorpusItem` in a fixed order (sorted paths, file order for parquet and
tar shards) so a build can resume at item ``start`` after a crash.  Readers never decode images
and never raise on a bad file: an unreadable item carries ``error`` instead of ``data``.
The readers, one module per input kind, are chosen by :func:`dprdm.index.readers.open_reader`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "CorpusItem", "CorpusReader", "read_file"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})


@dataclass(frozen=True)
class CorpusItem:
    """One raw record: a stable key, optional owner, and the bytes (or why they are missing)."""

    key: str
    owner: str | None
    data: bytes | None
    error: str | None = None


class CorpusReader:
    """Base class: ``describe()`` (for the checkpoint fingerprint), ``total()`` and ``iter_from``."""

    kind = "abstract"

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def total(self) -> int | None:
        """Number of items if known cheaply (for the progress bar), else None."""
        return None

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        """Items ``start, start + 1, ...`` in the reader's fixed order."""
        raise NotImplementedError

    @property
    def has_owners(self) -> bool:
        return False

    def units(self, size: int) -> list[tuple[Any, ...]]:
        """Split the fixed order into consecutive read units of about ``size`` items (distributed builds).

        A unit is a small picklable tuple; :meth:`iter_unit` yields its items in the reader's order,
        so the concatenation of all units, in list order, is ``iter_from(0)``.
        """
        raise NotImplementedError(f"the {self.kind} reader cannot be split into read units")

    def iter_unit(self, unit: tuple[Any, ...]) -> Iterator[CorpusItem]:
        """The items of one unit of :meth:`units`, in order."""
        raise NotImplementedError(f"the {self.kind} reader cannot be split into read units")


def read_file(path: Path | str) -> tuple[bytes | None, str | None]:
    """The bytes of ``path`` (a local path or an fsspec URL, see :mod:`~dprdm.index.sources`), or
    ``(None, why)`` if it cannot be read (never raises ``OSError``)."""
    from dprdm.index.sources import read_bytes

    return read_bytes(path)
