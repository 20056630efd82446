"""Parquet corpora: an image-bytes column or a path column, with optional owner and key columns.

A reader of the :mod:`~dprdm.index.corpus` protocol; rows are read in file order, in batches, and
``pyarrow`` is imported only when a parquet input is opened.  Files are local paths or ``fsspec``
URLs (:mod:`~dprdm.index.sources`: ``s3://``, ``gs://``, ``file://``, ``memory://``); a path
column's relative paths are resolved against the parquet file's folder, on the same filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from dprdm.index import sources
from dprdm.index.corpus import CorpusItem, CorpusReader
from dprdm.index.errors import IndexBuildError

__all__ = ["ParquetReader"]


class ParquetReader(CorpusReader):
    """Parquet file(s) with an image-bytes column or a path column (and optional owner/key columns).

    An image column may hold raw bytes or a struct with a ``bytes`` field (Hugging Face style).
    """

    kind = "parquet"

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        *,
        image_column: str | None = None,
        path_column: str | None = None,
        owner_column: str | None = None,
        key_column: str | None = None,
        batch_rows: int = 256,
    ) -> None:
        import pyarrow.parquet as pq

        self.files = [sources.as_source(os.fspath(f) if not isinstance(f, str) else f) for f in files]
        for f in self.files:
            if not sources.is_file(f):
                raise IndexBuildError(f"parquet input {str(f)!r} does not exist")
        if (image_column is None) == (path_column is None):
            raise IndexBuildError("parquet input needs exactly one of --image-column or --path-column")
        self.image_column, self.path_column = image_column, path_column
        self.owner_column, self.key_column = owner_column, key_column
        self.batch_rows = batch_rows
        self._rows: list[int] = []
        for f in self.files:
            with sources.open_binary(f) as fh:
                pf = pq.ParquetFile(fh)
                names = set(pf.schema_arrow.names)
                for col in (image_column, path_column, owner_column, key_column):
                    if col is not None and col not in names:
                        raise IndexBuildError(f"parquet {str(f)!r} has no column {col!r} (columns: {sorted(names)})")
                self._rows.append(pf.metadata.num_rows)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": [sources.describe(f) for f in self.files],
            "rows": self._rows,
            "columns": [self.image_column, self.path_column, self.owner_column, self.key_column],
        }

    def total(self) -> int | None:
        return sum(self._rows)

    @property
    def row_counts(self) -> list[int]:
        """Rows per file, in order."""
        return list(self._rows)

    @property
    def columns(self) -> list[str]:
        """The columns read (image or path, then owner and key if given)."""
        return [c for c in (self.image_column, self.path_column, self.owner_column, self.key_column) if c]

    @property
    def has_owners(self) -> bool:
        return self.owner_column is not None

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        import pyarrow.parquet as pq

        cols = self.columns
        offset = 0
        for f, nrows in zip(self.files, self._rows, strict=True):
            if offset + nrows <= start:
                offset += nrows
                continue
            with sources.open_binary(f) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=self.batch_rows, columns=cols):
                    data = batch.to_pydict()
                    for i in range(batch.num_rows):
                        idx = offset
                        offset += 1
                        if idx < start:
                            continue
                        yield self.item(f, idx, {c: data[c][i] for c in cols})

    def iter_rows(self, file_index: int, offset: int, start: int, stop: int) -> Iterator[CorpusItem]:
        """Rows ``start:stop`` of file ``file_index`` (whose first row is item ``offset``), reading
        only the row groups that hold them (a read unit of a distributed build)."""
        import pyarrow.parquet as pq

        f, cols = self.files[file_index], self.columns
        with sources.open_binary(f) as fh:
            pf = pq.ParquetFile(fh)
            first = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                lo, hi = max(start, first), min(stop, first + n)
                if lo < hi:
                    data = pf.read_row_group(g, columns=cols).slice(lo - first, hi - lo).to_pydict()
                    for i in range(hi - lo):
                        yield self.item(f, offset + lo + i, {c: data[c][i] for c in cols})
                first += n

    def item(self, f: sources.Source, idx: int, row: dict[str, Any]) -> CorpusItem:
        """The corpus item of ``row`` (item number ``idx``, read from file ``f``): never raises."""
        owner = row.get(self.owner_column) if self.owner_column else None
        owner = None if owner is None else str(owner)
        if self.owner_column and owner is None:
            return CorpusItem(key=f"{sources.basename(f)}#{idx}", owner=None, data=None, error="missing owner")
        if self.image_column:
            key = str(row[self.key_column]) if self.key_column else f"{sources.basename(f)}#{idx}"
            value = row[self.image_column]
            if isinstance(value, dict):
                value = value.get("bytes")
            if not isinstance(value, (bytes, bytearray)):
                return CorpusItem(key=key, owner=owner, data=None, error="image column holds no bytes")
            return CorpusItem(key=key, owner=owner, data=bytes(value))
        raw = row[self.path_column]  # type: ignore[index]
        if raw is None:
            return CorpusItem(key=f"{sources.basename(f)}#{idx}", owner=owner, data=None, error="missing path")
        key = str(row[self.key_column]) if self.key_column else str(raw)
        data, error = sources.read_bytes(sources.join(f, str(raw)))
        return CorpusItem(key=key, owner=owner, data=data, error=error)
