"""Corpus readers: :func:`open_reader` picks one by input kind; folder and path-list readers.

Folders and path lists live here; parquet files in :mod:`~dprdm.index.parquet_reader`, webdataset
tar shards in :mod:`~dprdm.index.webdataset_reader`; all follow the protocol of
:mod:`~dprdm.index.corpus` (a fixed order, so a build can resume; a bad file is an error item,
never an exception).

Owners (SPEC §3 unit of privacy): a parquet column, a webdataset member/field, a second
tab-separated column of a path list, or an ``--owners`` TSV/CSV file mapping keys to owners.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dprdm.index import sources
from dprdm.index.corpus import IMAGE_EXTENSIONS, CorpusItem, CorpusReader, read_file
from dprdm.index.errors import IndexBuildError
from dprdm.index.parquet_reader import ParquetReader
from dprdm.index.webdataset_reader import WebDatasetReader

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorpusItem",
    "CorpusReader",
    "FolderReader",
    "ListReader",
    "ParquetReader",
    "WebDatasetReader",
    "load_owner_map",
    "open_reader",
    "plan_units",
    "iter_unit",
]


def load_owner_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``key<TAB>owner`` (or CSV ``key,owner``) lines; keys are paths relative to the input."""
    p = Path(path)
    if not p.is_file():
        raise IndexBuildError(f"owners file {str(p)!r} does not exist")
    text = p.read_text()
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    owners: dict[str, str] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines(), dialect=dialect), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 2 or not row[1].strip():
            raise IndexBuildError(f"owners file {str(p)!r} line {lineno}: expected 'key<TAB>owner'")
        owners[row[0].strip()] = row[1].strip()
    return owners


class _PathsReader(CorpusReader):
    def __init__(self, entries: list[tuple[str, sources.Source, str | None]]) -> None:
        self._entries = entries

    def total(self) -> int | None:
        return len(self._entries)

    @property
    def has_owners(self) -> bool:
        return any(owner is not None for _, _, owner in self._entries)

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        return self._items(start, len(self._entries))

    def units(self, size: int) -> list[tuple[Any, ...]]:
        """Ranges ``(start, stop)`` of ``size`` consecutive files."""
        return [(s, min(s + size, len(self._entries))) for s in range(0, len(self._entries), size)]

    def iter_unit(self, unit: tuple[Any, ...]) -> Iterator[CorpusItem]:
        return self._items(int(unit[0]), int(unit[1]))

    def _items(self, start: int, stop: int) -> Iterator[CorpusItem]:
        for key, path, owner in self._entries[start:stop]:
            data, error = read_file(path)
            yield CorpusItem(key=key, owner=owner, data=data, error=error)


def _apply_owners(entries: list[tuple[str, sources.Source, str | None]], owners: Mapping[str, str] | None) -> None:
    if owners is None:
        return
    missing = [key for key, _, owner in entries if owner is None and key not in owners]
    if missing:
        raise IndexBuildError(f"owners file has no owner for {len(missing)} item(s), e.g. {missing[0]!r}")
    for i, (key, path, owner) in enumerate(entries):
        entries[i] = (key, path, owner if owner is not None else owners[key])


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


class FolderReader(_PathsReader):
    """Every image file under ``root`` (recursive, sorted by relative POSIX path).

    ``root`` may be an fsspec URL (``s3://bucket/prefix``, ``file:///data``): the keys are the same
    relative paths as for a local folder of the same files.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike[str], owners: Mapping[str, str] | None = None) -> None:
        self.root: sources.Source = sources.as_source(root if isinstance(root, str) else os.fspath(root))
        entries: list[tuple[str, sources.Source, str | None]] = []
        if isinstance(self.root, str):
            for key, src in sources.list_files(self.root):
                if _is_image_name(key.rsplit("/", 1)[-1]):
                    entries.append((key, src, None))
        else:
            if not self.root.is_dir():
                raise IndexBuildError(f"input folder {str(self.root)!r} does not exist")
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in filenames:
                    if _is_image_name(name):
                        path = Path(dirpath) / name
                        entries.append((path.relative_to(self.root).as_posix(), path, None))
        entries.sort(key=lambda e: e[0])
        _apply_owners(entries, owners)
        super().__init__(entries)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": sources.describe(self.root), "items": len(self._entries)}


class ListReader(_PathsReader):
    """A text file of image paths (one per line; optional ``<TAB>owner``; ``#`` comments).

    Relative paths are resolved against the list file's folder; the key is the path as written.
    """

    kind = "list"

    def __init__(self, list_file: str | os.PathLike[str], owners: Mapping[str, str] | None = None) -> None:
        self.list_file: sources.Source = sources.as_source(
            list_file if isinstance(list_file, str) else os.fspath(list_file))
        if not sources.is_file(self.list_file):
            raise IndexBuildError(f"input list {str(self.list_file)!r} does not exist")
        data, error = sources.read_bytes(self.list_file)
        if data is None:
            raise IndexBuildError(f"input list {str(self.list_file)!r}: {error}")
        entries: list[tuple[str, sources.Source, str | None]] = []
        for line in data.decode("utf-8").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, _, owner = line.rstrip("\n").partition("\t")
            key = key.strip()
            entries.append((key, sources.join(self.list_file, key), owner.strip() or None))
        _apply_owners(entries, owners)
        super().__init__(entries)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "list": sources.describe(self.list_file), "items": len(self._entries)}


def open_reader(
    inputs: Sequence[str],
    *,
    input_type: str = "auto",
    image_column: str | None = None,
    path_column: str | None = None,
    owner_column: str | None = None,
    key_column: str | None = None,
    owners_file: str | None = None,
) -> CorpusReader:
    """Pick a reader for the ``--input`` value(s).

    ``auto``: a directory is a folder; ``.parquet`` files parquet; ``.tar``/``.tar.gz`` shards
    webdataset; any other single file a path list.
    """
    if not inputs:
        raise IndexBuildError("no --input given")
    kind = input_type
    if kind == "auto":
        first = inputs[0].lower()
        if len(inputs) == 1 and sources.is_dir(sources.as_source(inputs[0])):
            kind = "folder"
        elif first.endswith(".parquet"):
            kind = "parquet"
        elif first.endswith((".tar", ".tar.gz", ".tgz")):
            kind = "webdataset"
        else:
            kind = "list"
    owners = load_owner_map(owners_file) if owners_file else None
    if kind in ("folder", "list") and len(inputs) != 1:
        raise IndexBuildError(f"a {kind} input takes exactly one --input; found {len(inputs)}")
    if kind == "folder":
        return FolderReader(inputs[0], owners)
    if kind == "list":
        return ListReader(inputs[0], owners)
    if owners is not None:
        raise IndexBuildError(f"--owners is for folder/list inputs; for {kind} use --owner-column")
    if kind == "parquet":
        return ParquetReader(
            inputs, image_column=image_column, path_column=path_column, owner_column=owner_column, key_column=key_column
        )
    if kind == "webdataset":
        return WebDatasetReader(inputs, owner_field=owner_column)
    raise IndexBuildError(f"unknown input type {input_type!r} (auto, folder, list, parquet, webdataset)")


# -- read units (distributed builds, :mod:`dprdm.index.ray_build`) --------------------------------


def plan_units(reader: CorpusReader, size: int) -> list[tuple[Any, ...]]:
    """Split ``reader``'s fixed order into read units of about ``size`` items (see :meth:`CorpusReader.units`).

    Folders and lists: ranges of ``size`` files; parquet: ranges of ``size`` rows within one file;
    webdataset: one tar shard per unit (its sample count is known only once read).

    Raises:
        IndexBuildError: ``size`` < 1.
    """
    if size < 1:
        raise IndexBuildError(f"read unit size must be >= 1; found {size}")
    if isinstance(reader, ParquetReader):
        units: list[tuple[Any, ...]] = []
        offset = 0
        for i, rows in enumerate(reader.row_counts):
            units += [("parquet", i, offset, s, min(s + size, rows)) for s in range(0, rows, size)]
            offset += rows
        return units
    if isinstance(reader, WebDatasetReader):
        return [("webdataset", i) for i in range(len(reader.shards))]
    return reader.units(size)


def iter_unit(reader: CorpusReader, unit: tuple[Any, ...]) -> Iterator[CorpusItem]:
    """The items of one unit of :func:`plan_units`, in ``reader``'s order (bad files are error items)."""
    if isinstance(reader, ParquetReader):
        _, file_index, offset, start, stop = unit
        return reader.iter_rows(int(file_index), int(offset), int(start), int(stop))
    if isinstance(reader, WebDatasetReader):
        return reader.shard_items(int(unit[1]))
    return reader.iter_unit(unit)

