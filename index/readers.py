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
    def __init__(self, entries: list[tuple[str, Path, str | None]]) -> None:
        self._entries = entries

    def total(self) -> int | None:
        return len(self._entries)

    @property
    def has_owners(self) -> bool:
        return any(owner is not None for _, _, owner in self._entries)

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        for key, path, owner in self._entries[start:]:
            data, error = read_file(path)
            yield CorpusItem(key=key, owner=owner, data=data, error=error)


def _apply_owners(entries: list[tuple[str, Path, str | None]], owners: Mapping[str, str] | None) -> None:
    if owners is None:
        return
    missing = [key for key, _, owner in entries if owner is None and key not in owners]
    if missing:
        raise IndexBuildError(f"owners file has no owner for {len(missing)} item(s), e.g. {missing[0]!r}")
    for i, (key, path, owner) in enumerate(entries):
        entries[i] = (key, path, owner if owner is not None else owners[key])


class FolderReader(_PathsReader):
    """Every image file under ``root`` (recursive, sorted by relative POSIX path)."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike[str], owners: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise IndexBuildError(f"input folder {str(self.root)!r} does not exist")
        entries: list[tuple[str, Path, str | None]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in filenames:
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    path = Path(dirpath) / name
                    entries.append((path.relative_to(self.root).as_posix(), path, None))
        entries.sort(key=lambda e: e[0])
        _apply_owners(entries, owners)
        super().__init__(entries)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root.resolve()), "items": len(self._entries)}


class ListReader(_PathsReader):
    """A text file of image paths (one per line; optional ``<TAB>owner``; ``#`` comments).

    Relative paths are resolved against the list file's folder; the key is the path as written.
    """

    kind = "list"

    def __init__(self, list_file: str | os.PathLike[str], owners: Mapping[str, str] | None = None) -> None:
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise IndexBuildError(f"input list {str(self.list_file)!r} does not exist")
        base = self.list_file.parent
        entries: list[tuple[str, Path, str | None]] = []
        for line in self.list_file.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, _, owner = line.rstrip("\n").partition("\t")
            key = key.strip()
            path = Path(key) if Path(key).is_absolute() else base / key
            entries.append((key, path, owner.strip() or None))
        _apply_owners(entries, owners)
        super().__init__(entries)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "list": str(self.list_file.resolve()), "items": len(self._entries)}


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
        if len(inputs) == 1 and Path(inputs[0]).is_dir():
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
