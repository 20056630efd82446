"""Shard sets: one corpus split by record-id range into ordinary index directories (SPEC §3, §5).

A shard set directory holds::

    shardset.json        the set's sealed manifest (below), written last
    shard-0000/          an ordinary index directory (manifest.json, vectors.npy, ids.npy)
    shard-0001/          ...

The set has ONE corpus id (one privacy domain, one ledger), one version and one manifest listing
its shards: shard ``s`` holds the records whose id lies in ``[id_first_s, id_last_s]`` (the ranges
are contiguous, ascending and cover every id ``0 .. 2**63 - 1``), stored in its own padded slots
(its own public size ``N̄_s``), and its entry records the seal (``manifest_sha256``) of its
manifest, which covers every data file's SHA-256: one digest per shard checks the whole shard.
Each shard's manifest carries a ``shard`` block (number, count, id range) so a shard directory
knows its place; ``index_version`` of the set is a hash of the corpus id and the shards' seals.

Public choices (split rule, :func:`split_index`): the id ranges are a function of ``S`` alone (an
equal split of the 63-bit id space, right for record ids that are hashes, :mod:`dprdm.index.records`)
or given by the operator; they are never quantiles of the private ids (a boundary would then be a
private record's id).  The shard public sizes ``N̄_s`` are declared, by default
``ceil(N̄/S) + ceil(6 sqrt(N̄/S))`` (the records of a uniform-hash corpus of ``N̄`` records fall in
each range as a Binomial(N̄, 1/S): 6 standard deviations of headroom), and the split refuses
``sum_s N̄_s < N̄`` (the set must have room for any corpus of its declared public size) and a
shard holding more records than its ``N̄_s`` (as a build refuses ``N > N̄``: nothing is dropped).
The set's own public size stays the source's ``N̄``: clients see it, and delta is checked
against it.  Only flat indexes are split (IVF lists' capacities and overflow rule are per index).

Why this is the same mechanism: :mod:`dprdm.index.sharded` (the theorem in its docstring).

Start-up cost: checking a set reads ``shardset.json`` and each shard's manifest; the shards'
data files are checked by :func:`dprdm.index.format.load`, by default through a
:class:`~dprdm.index.checksum_cache.ChecksumCache` kept IN each shard directory
(``index-checksums.json``), primed by the split: the verified-at-build stamp. A start then
re-hashes only files whose stat changed (a copy to another host re-hashes once); ``verify=True``
(``--verify``) re-hashes everything, and :func:`verify_shard_set` scans every stored row too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dprdm.index.checksum_cache import ChecksumCache
from dprdm.index.errors import IndexBuildError, IndexFormatError
from dprdm.index.format import (
    MANIFEST,
    SEAL_FIELD,
    PrivateIndex,
    atomic_write_json,
    index_version_of,
    load,
    manifest_digest,
    verify,
    write_manifest,
)
from dprdm.index.sharded import ShardedIndex
from dprdm.index.shards import save_npy_atomic
from dprdm.index.storage import write_padded
from dprdm.models.base import EncoderIdentity

__all__ = [
    "SHARDSET",
    "SHARDSET_FORMAT",
    "ID_LIMIT",
    "default_boundaries",
    "default_shard_public_size",
    "is_shard_set",
    "split_index",
    "read_shard_set",
    "load_shard_set",
    "verify_shard_set",
]

SHARDSET = "shardset.json"
SHARDSET_FORMAT = "dprdm-shardset"
_VERSION = 1
ID_LIMIT = 1 << 63
"""Record ids are in ``[0, 2**63)`` (:mod:`dprdm.index.records`)."""
_NAME = re.compile(r"^shard-\d{4,}$")
_SAME = ("corpus_id", "private", "encoder", "dimension", "dtype", "index_type")
"""Manifest fields every shard shares with its set."""


def default_boundaries(shards: int) -> list[int]:
    """First record id of each shard: the 63-bit id space split evenly (a function of ``S`` only)."""
    return [(i * ID_LIMIT) // shards for i in range(shards)]


def default_shard_public_size(public_size: int, shards: int) -> int:
    """``min(N̄, ceil(N̄/S) + ceil(6 sqrt(N̄/S)))``: the default public size of each shard."""
    mean = public_size / shards
    return min(public_size, math.ceil(mean) + math.ceil(6.0 * math.sqrt(mean)))


def is_shard_set(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a shard set directory (holds ``shardset.json``)."""
    return (Path(path) / SHARDSET).is_file()


# -- split ---------------------------------------------------------------------------------------


def _check_plan(shards: int, firsts: Sequence[int], sizes: Sequence[int], public_size: int) -> None:
    if len(firsts) != shards or firsts[0] != 0 or any(b <= a for a, b in zip(firsts, firsts[1:])) \
            or firsts[-1] >= ID_LIMIT:
        raise IndexBuildError(f"--boundaries must be {shards - 1} strictly increasing record ids in "
                              f"(0, 2**63); found {list(firsts[1:])}")
    if len(sizes) != shards or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise IndexBuildError(f"--shard-public-size must be {shards} positive integer(s); found {list(sizes)}")
    if sum(sizes) < public_size:
        raise IndexBuildError(f"the shard public sizes add up to {sum(sizes)} < the index's public size "
                              f"N̄ = {public_size}: the set must have room for any corpus of its public size")


def split_index(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    shards: int,
    boundaries: Sequence[int] | None = None,
    shard_public_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Split a flat index into a shard set by record-id range (the module docstring's rules).

    Args:
        source: a flat index directory (verified with checksums first).
        output: the shard set directory to create (must not exist, or be empty).
        shards: ``S``, the number of shards.
        boundaries: the first record id of shards ``1..S-1`` (public; default
            :func:`default_boundaries`).
        shard_public_sizes: ``N̄_s`` of every shard (one value: the same for all; default
            :func:`default_shard_public_size`).

    Returns:
        The sealed shard set manifest.

    Raises:
        IndexBuildError: bad plan, occupied output, a shard holding more records than its public
            size, or a source that is not a flat index in storage order.
        IndexFormatError: the source does not load.
    """
    src = load(source, verify_checksums=True, prefault=False)
    nbar = src.public_size
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= nbar:
        raise IndexBuildError(f"--shards must be an integer in [1, N̄ = {nbar}]; found {shards!r}")
    firsts = [0, *boundaries] if boundaries is not None else default_boundaries(shards)
    sizes = list(shard_public_sizes) if shard_public_sizes is not None else [default_shard_public_size(nbar, shards)]
    sizes = sizes * shards if len(sizes) == 1 else sizes
    _check_plan(shards, firsts, sizes, nbar)
    if src.index_type != "flat":
        raise IndexBuildError(f"{src.path}: only flat indexes can be split; this one is {src.index_type!r} "
                              "(an IVF index's list capacities and overflow rule are per index)")
    n = src.count
    real = np.asarray(src.ids[:n])
    if np.any(real < 0) or np.any(np.diff(real) <= 0) or np.any(src.ids[n:] != -1):
        raise IndexBuildError(f"{src.path}: rows are not in storage order; run `dprdm index verify` on it")
    lasts = [*firsts[1:], ID_LIMIT]
    starts = [int(np.searchsorted(real, f, side="left")) for f in firsts]
    counts = [b - a for a, b in zip(starts, [*starts[1:], n])]
    for s, (c, cap) in enumerate(zip(counts, sizes)):
        if c > cap:
            raise IndexBuildError(f"shard {s} (ids {firsts[s]}..{lasts[s] - 1}) holds {c} records "
                                  f"(operator-only), more than its public size {cap}: pass a larger "
                                  "--shard-public-size (or other --boundaries)")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IndexBuildError(f"output {str(out)!r} already exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    try:
        for s in range(shards):
            m = _write_shard(src, out / f"shard-{s:04d}", s, shards, starts[s], counts[s], sizes[s],
                             (firsts[s], lasts[s] - 1))
            entries.append({"name": f"shard-{s:04d}", "id_first": firsts[s], "id_last": lasts[s] - 1,
                            "public_size": sizes[s], "index_version": m["index_version"],
                            SEAL_FIELD: m[SEAL_FIELD]})
        return _write_set(out, src, entries)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_shard(src: PrivateIndex, root: Path, number: int, count: int, start: int, n: int, nbar: int,
                 id_range: tuple[int, int]) -> dict[str, Any]:
    """One shard directory: padded vectors, ids, a sealed manifest, the checksum stamp."""
    root.mkdir()
    rows = np.concatenate([np.arange(start, start + n, dtype=np.int64), np.full(nbar - n, -1, np.int64)])
    ids = write_padded(str(root / "vectors.npy.tmp"), src.vectors, src.ids, rows)
    os.replace(root / "vectors.npy.tmp", root / "vectors.npy")
    save_npy_atomic(root / "ids.npy", ids)
    stamp = ChecksumCache(root)  # hashes each file once and records it: the verified-at-build stamp
    files = {name: {"bytes": (root / name).stat().st_size, "sha256": stamp.sha256(root / name)}
             for name in ("ids.npy", "vectors.npy")}
    m = {k: v for k, v in src.manifest.items() if k not in (SEAL_FIELD, "dedup", "created_utc")}
    m.update(count=n, public_size=nbar, storage_rows=nbar, files=files, group_size=1,
             index_version=index_version_of(src.corpus_id, files),
             shard={"number": number, "count": count, "id_first": id_range[0], "id_last": id_range[1],
                    "split_from": src.index_version})
    return write_manifest(root, m)


def _write_set(out: Path, src: PrivateIndex, entries: list[dict[str, Any]]) -> dict[str, Any]:
    h = hashlib.sha256(src.corpus_id.encode())
    for e in entries:
        h.update(f"\0{e['name']}\0{e[SEAL_FIELD]}".encode())
    sm = src.manifest
    m: dict[str, Any] = {
        "format": SHARDSET_FORMAT, "format_version": _VERSION, **{k: sm[k] for k in _SAME},
        "index_version": h.hexdigest()[:16], "public_size": src.public_size, "count": src.count,
        "group_size": 1, "shards": entries,
        "split": {"from_index_version": src.index_version,
                  "rule": "record-id ranges [id_first, id_last], contiguous and ascending; each shard "
                          "padded to its own public size (sum >= the set's public size)"},
        "operator_only": ["count"],
    }
    sealed = {**m, SEAL_FIELD: manifest_digest(m)}
    atomic_write_json(out / SHARDSET, sealed)  # written last: a directory without it is not a set
    return sealed


# -- read, load, verify ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(doc, dict):
        raise IndexFormatError(f"{path}: a manifest must be a JSON object")
    return doc


def read_shard_set(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``shardset.json`` alone (no shard is opened): format, seal, fields, ranges.

    A coordinator whose shards are on shard servers needs only this file.

    Raises:
        IndexFormatError: naming the file and the problem.
    """
    root = Path(path)
    mpath = root / SHARDSET
    if not mpath.is_file():
        raise IndexFormatError(f"{str(root)!r} is not a shard set: {SHARDSET} is missing")
    m = _read_json(mpath)
    if m.get("format") != SHARDSET_FORMAT or m.get("format_version") != _VERSION:
        raise IndexFormatError(f"{mpath}: not a {SHARDSET_FORMAT} manifest of version {_VERSION}")
    if m.get(SEAL_FIELD) != manifest_digest(m):
        raise IndexFormatError(f"{mpath}: the manifest was edited after the split: its fields no longer "
                               f"match {SEAL_FIELD}; split the index again")
    missing = [k for k in (*_SAME, "index_version", "public_size", "count", "group_size") if k not in m]
    if missing:
        raise IndexFormatError(f"{mpath}: manifest is missing field(s) {', '.join(missing)}")
    entries = m.get("shards")
    if not isinstance(entries, list) or not entries:
        raise IndexFormatError(f"{mpath}: 'shards' must be a non-empty list")
    expect = 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or e.get("name") != f"shard-{i:04d}" or not _NAME.match(str(e.get("name"))):
            raise IndexFormatError(f"{mpath}: shard {i} must be named shard-{i:04d}")
        if not isinstance(e.get("public_size"), int) or e["public_size"] < 1 or not isinstance(e.get(SEAL_FIELD), str):
            raise IndexFormatError(f"{mpath}: shard {i} needs a positive integer public_size and its {SEAL_FIELD}")
        if e.get("id_first") != expect or not isinstance(e.get("id_last"), int) or e["id_last"] < expect:
            raise IndexFormatError(f"{mpath}: shard {i}'s id range does not continue the previous one")
        expect = e["id_last"] + 1
    if expect != ID_LIMIT:
        raise IndexFormatError(f"{mpath}: the shards' id ranges must end at 2**63 - 1")
    if sum(int(e["public_size"]) for e in entries) < int(m["public_size"]):
        raise IndexFormatError(f"{mpath}: the shard public sizes add up to less than the set's public size")
    return m


def _check_shard_manifest(root: Path, m: dict[str, Any], i: int) -> None:
    """The shard's own manifest against its set entry, before its data files are read."""
    e = m["shards"][i]
    where = root / e["name"]
    mpath = where / MANIFEST
    if not mpath.is_file():
        raise IndexFormatError(f"shard set {root}: shard {i} ({e['name']}) is missing: no {mpath}")
    sm = _read_json(mpath)
    if sm.get("corpus_id") != m["corpus_id"]:
        raise IndexFormatError(f"{mpath}: corpus id {sm.get('corpus_id')!r} differs from the shard set's "
                               f"{m['corpus_id']!r}: a shard of another corpus")
    if sm.get(SEAL_FIELD) != e[SEAL_FIELD]:
        raise IndexFormatError(f"{mpath}: checksum mismatch: manifest seal {sm.get(SEAL_FIELD)}, the shard "
                               f"set records {e[SEAL_FIELD]} (a changed or replaced shard)")


def _check_loaded(root: Path, m: dict[str, Any], i: int, shard: PrivateIndex) -> None:
    e, sm = m["shards"][i], shard.manifest
    block = sm.get("shard") or {}
    want = {"number": i, "count": len(m["shards"]), "id_first": e["id_first"], "id_last": e["id_last"]}
    if any(block.get(k) != v for k, v in want.items()) or shard.public_size != e["public_size"]:
        raise IndexFormatError(f"{shard.path}: its shard block or public size does not match entry {i} of "
                               f"{root / SHARDSET}")
    diff = [k for k in _SAME if sm.get(k) != m.get(k)]
    if diff:
        raise IndexFormatError(f"{shard.path}: field(s) {', '.join(diff)} differ from the shard set's")
    real = shard.ids[shard.ids >= 0]
    if real.size and (int(real.min()) < e["id_first"] or int(real.max()) > e["id_last"]):
        raise IndexFormatError(f"{shard.path}: a record id lies outside the shard's range")


def load_shard_set(
    path: str | os.PathLike[str],
    *,
    verify_checksums: bool = True,
    use_stamp: bool = True,
    prefault: bool = True,
    expected_encoder: EncoderIdentity | None = None,
    threads: int | None = None,
) -> ShardedIndex:
    """Open and check a shard set whose shards are local (memory-mapped), in parallel threads.

    Args:
        path: the shard set directory.
        verify_checksums: check every data file's SHA-256 against its shard manifest.
        use_stamp: through each shard's checksum stamp (re-hash only files whose stat changed);
            False (``--verify``) re-hashes every file.
        prefault: populate the memory mappings now (see :func:`dprdm.index.format.load`).
        expected_encoder: refuse a set built with another encoder.
        threads: shards opened at once (default: min(S, CPUs)).

    Raises:
        IndexFormatError: naming the first problem (missing shard, checksum mismatch, a shard of
            another corpus, a range or field that differs from the set manifest, ...).
    """
    root = Path(path)
    m = read_shard_set(root)
    count = len(m["shards"])
    for i in range(count):
        _check_shard_manifest(root, m, i)

    def open_one(i: int) -> PrivateIndex:
        where = root / m["shards"][i]["name"]
        shard = load(where, verify_checksums=verify_checksums, expected_encoder=expected_encoder,
                     prefault=prefault, checksum_cache=where if use_stamp else None)
        _check_loaded(root, m, i, shard)
        return shard

    with ThreadPoolExecutor(max_workers=max(1, threads or min(count, os.cpu_count() or 1))) as pool:
        shards = list(pool.map(open_one, range(count)))
    return ShardedIndex(root, m, shards)


def verify_shard_set(path: str | os.PathLike[str]) -> ShardedIndex:
    """Full verification: the set manifest, then :func:`dprdm.index.format.verify` of every shard
    (every checksum re-hashed, every stored row scanned) and its place in the set.

    Raises:
        IndexFormatError: naming the first problem.
    """
    root = Path(path)
    m = read_shard_set(root)
    shards = []
    for i in range(len(m["shards"])):
        _check_shard_manifest(root, m, i)
        shard = verify(root / m["shards"][i]["name"])
        _check_loaded(root, m, i, shard)
        shards.append(shard)
    if sum(s.count for s in shards) != int(m["count"]):
        raise IndexFormatError(f"{root / SHARDSET}: count does not equal the shards' counts")
    return ShardedIndex(root, m, shards)

