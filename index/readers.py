"""Corpus readers: a deterministic, resumable stream of raw image records.

Every reader yields :class:`CorpusItem` in a fixed order (sorted paths, file order for parquet and
tar shards) so a build can resume at item ``start`` after a crash.  Readers never decode images
and never raise on a bad file: an unreadable item carries ``error`` instead of ``data``.

Owners (SPEC §3 unit of privacy): a parquet column, a webdataset member/field, a second
tab-separated column of a path list, or an ``--owners`` TSV/CSV file mapping keys to owners.
"""

from __future__ import annotations

import csv
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dprdm.index.errors import IndexBuildError

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


def _read_file(path: Path) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"unreadable file: {exc.strerror or exc}"


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
            data, error = _read_file(path)
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
        data, error = _read_file(path)
        return CorpusItem(key=key, owner=owner, data=data, error=error)


class WebDatasetReader(CorpusReader):
    """Webdataset tar shards: members grouped by key (path up to the first dot of the basename).

    The image is the first member with an image extension; the owner (if ``owner_field`` is
    given) is a member ``<key>.<owner_field>`` (text) or a field of ``<key>.json``.
    """

    kind = "webdataset"

    def __init__(self, shards: Sequence[str | os.PathLike[str]], *, owner_field: str | None = None) -> None:
        self.shards = [Path(s) for s in shards]
        for s in self.shards:
            if not s.is_file():
                raise IndexBuildError(f"webdataset shard {str(s)!r} does not exist")
        self.owner_field = owner_field

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "shards": [str(s.resolve()) for s in self.shards], "owner": self.owner_field}

    @property
    def has_owners(self) -> bool:
        return self.owner_field is not None

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        idx = 0
        for shard in self.shards:
            for key, members, error in _tar_samples(shard):
                if idx >= start:
                    yield self._item(shard, key, members, error)
                idx += 1

    def _item(self, shard: Path, key: str, members: dict[str, bytes], error: str | None) -> CorpusItem:
        full_key = f"{shard.name}/{key}"
        if error is not None:
            return CorpusItem(key=full_key, owner=None, data=None, error=error)
        owner: str | None = None
        if self.owner_field:
            if self.owner_field in members:
                owner = members[self.owner_field].decode("utf-8", "replace").strip() or None
            elif "json" in members:
                import json

                try:
                    value = json.loads(members["json"]).get(self.owner_field)
                    owner = None if value is None else str(value)
                except (ValueError, AttributeError):
                    owner = None
            if owner is None:
                return CorpusItem(key=full_key, owner=None, data=None, error="missing owner")
        image = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if image is None:
            return CorpusItem(key=full_key, owner=owner, data=None, error="sample has no image member")
        return CorpusItem(key=full_key, owner=owner, data=image)


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Stream (key, {extension: bytes}, error) from a tar shard; a corrupt tail ends with an error.

    ``tarfile`` stops silently at a truncated header, so for uncompressed shards the
    end-of-archive marker (two zero blocks) is checked explicitly.
    """
    current: str | None = None
    members: dict[str, bytes] = {}
    end = 0
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("."):
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                if key != current:
                    if current is not None:
                        yield current, members, None
                    current, members = key, {}
                fh = tar.extractfile(info)
                members[ext.lower()] = fh.read() if fh is not None else b""
            end = tar.offset
            compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
    except (tarfile.TarError, OSError, EOFError) as exc:
        if current is not None:
            yield current, members, None
        yield f"<corrupt tail after {current!r}>", {}, f"corrupt shard: {exc}"
        return
    if current is not None:
        yield current, members, None
    if not compressed and not _has_end_marker(shard, end):
        yield f"<corrupt tail after {current!r}>", {}, "corrupt shard: truncated (no end-of-archive marker)"


def _has_end_marker(shard: Path, offset: int) -> bool:
    with open(shard, "rb") as fh:
        fh.seek(offset)
        tail = fh.read(1024)
    return len(tail) == 1024 and not any(tail)


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
