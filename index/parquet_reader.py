"""Parquet corpora: an image-bytes column or a path column, with optional owner and key columns.

A reader of the :mod:`~dprdm.index.corpus` protocol; rows are read in file order, in batches, and
``pyarrow`` is imported only when a parquet input is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dprdm.index.corpus import CorpusItem, CorpusReader, read_file
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

        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise IndexBuildError(f"parquet input {str(f)!r} does not exist")
        if (image_column is None) == (path_column is None):
            raise IndexBuildError("parquet input needs exactly one of --image-column or --path-column")
        self.image_column, self.path_column = image_column, path_column
        self.owner_column, self.key_column = owner_column, key_column
        self.batch_rows = batch_rows
        self._rows = []
        for f in self.files:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            for col in (image_column, path_column, owner_column, key_column):
                if col is not None and col not in names:
                    raise IndexBuildError(f"parquet {str(f)!r} has no column {col!r} (columns: {sorted(names)})")
            self._rows.append(pf.metadata.num_rows)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": [str(f.resolve()) for f in self.files],
            "rows": self._rows,
            "columns": [self.image_column, self.path_column, self.owner_column, self.key_column],
        }

    def total(self) -> int | None:
        return sum(self._rows)

    @property
    def has_owners(self) -> bool:
        return self.owner_column is not None

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        import pyarrow.parquet as pq

        cols = [c for c in (self.image_column, self.path_column, self.owner_column, self.key_column) if c]
        offset = 0
        for f, nrows in zip(self.files, self._rows, strict=True):
            if offset + nrows <= start:
                offset += nrows
                continue
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_rows, columns=cols):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    idx = offset
                    offset += 1
                    if idx < start:
                        continue
                    yield self._item(f, idx, {c: data[c][i] for c in cols})

    def _item(self, f: Path, idx: int, row: dict[str, Any]) -> CorpusItem:
        owner = row.get(self.owner_column) if self.owner_column else None
        owner = None if owner is None else str(owner)
        if self.owner_column and owner is None:
            return CorpusItem(key=f"{f.name}#{idx}", owner=None, data=None, error="missing owner")
        if self.image_column:
            key = str(row[self.key_column]) if self.key_column else f"{f.name}#{idx}"
            value = row[self.image_column]
            if isinstance(value, dict):
                value = value.get("bytes")
            if not isinstance(value, (bytes, bytearray)):
                return CorpusItem(key=key, owner=owner, data=None, error="image column holds no bytes")
            return CorpusItem(key=key, owner=owner, data=bytes(value))
        raw = row[self.path_column]  # type: ignore[index]
        if raw is None:
            return CorpusItem(key=f"{f.name}#{idx}", owner=owner, data=None, error="missing path")
        path = Path(str(raw)) if Path(str(raw)).is_absolute() else f.parent / str(raw)
        key = str(row[self.key_column]) if self.key_column else str(raw)
        data, error = read_file(path)
        return CorpusItem(key=key, owner=owner, data=data, error=error)
