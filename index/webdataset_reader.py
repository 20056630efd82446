"""Webdataset corpora: tar shards whose members are grouped into samples by key.

A reader of the :mod:`~dprdm.index.corpus` protocol; shards are streamed in order and a corrupt or
truncated shard ends with one error item instead of stopping the build.  Shards are local paths or
``fsspec`` URLs (:mod:`~dprdm.index.sources`: ``s3://``, ``gs://``, ``file://``, ``memory://``).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from dprdm.index import sources
from dprdm.index.corpus import IMAGE_EXTENSIONS, CorpusItem, CorpusReader
from dprdm.index.errors import IndexBuildError

__all__ = ["WebDatasetReader"]


class WebDatasetReader(CorpusReader):
    """Webdataset tar shards: members grouped by key (path up to the first dot of the basename).

    The image is the first member with an image extension; the owner (if ``owner_field`` is
    given) is a member ``<key>.<owner_field>`` (text) or a field of ``<key>.json``.
    """

    kind = "webdataset"

    def __init__(self, shards: Sequence[str | os.PathLike[str]], *, owner_field: str | None = None) -> None:
        self.shards = [sources.as_source(s if isinstance(s, str) else os.fspath(s)) for s in shards]
        for s in self.shards:
            if not sources.is_file(s):
                raise IndexBuildError(f"webdataset shard {str(s)!r} does not exist")
        self.owner_field = owner_field

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "shards": [sources.describe(s) for s in self.shards], "owner": self.owner_field}

    @property
    def has_owners(self) -> bool:
        return self.owner_field is not None

    def iter_from(self, start: int) -> Iterator[CorpusItem]:
        idx = 0
        for i in range(len(self.shards)):
            for item in self.shard_items(i):
                if idx >= start:
                    yield item
                idx += 1

    def shard_items(self, index: int) -> Iterator[CorpusItem]:
        """The items of shard number ``index``, in order (a read unit of a distributed build)."""
        shard = self.shards[index]
        return (self._item(shard, key, members, error) for key, members, error in _tar_samples(shard))

    def _item(self, shard: sources.Source, key: str, members: dict[str, bytes], error: str | None) -> CorpusItem:
        full_key = f"{sources.basename(shard)}/{key}"
        if error is not None:
            return CorpusItem(key=full_key, owner=None, data=None, error=error)
        owner: str | None = None
        if self.owner_field:
            if self.owner_field in members:
                owner = members[self.owner_field].decode("utf-8", "replace").strip() or None
            elif "json" in members:
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


def _tar_samples(shard: sources.Source) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Stream (key, {extension: bytes}, error) from a tar shard; a corrupt tail ends with an error.

    ``tarfile`` stops silently at a truncated header, so for uncompressed shards the
    end-of-archive marker (two zero blocks) is checked explicitly.
    """
    current: str | None = None
    members: dict[str, bytes] = {}
    end = 0
    try:
        with sources.open_binary(shard) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
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


def _has_end_marker(shard: sources.Source, offset: int) -> bool:
    with sources.open_binary(shard) as fh:
        fh.seek(offset)
        tail = fh.read(1024)
    return len(tail) == 1024 and not any(tail)
