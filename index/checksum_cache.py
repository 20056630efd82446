"""A cache of verified file checksums keyed by the file's identity and stat, for fast restarts.

:func:`dprdm.index.format.load` re-hashes every data file of an index (SHA-256 of the whole vector
file: ~0.5 s per GB on one core). With a :class:`ChecksumCache` it re-hashes a file only when its
``(device, inode, size, mtime_ns, ctime_ns)`` differs from the entry recorded the last time the
whole file was hashed; the digest is still compared with the manifest at every load.

Trade-off (issue 13 item 11): a change that leaves all five unchanged is not detected at start-up.
A rewrite, truncation, rename-over, copy or ``touch`` changes at least one (``ctime`` cannot be set
from user space, so an mtime reset does not hide a write); what remains is corruption below the
file system (bit rot, raw block-device writes). ``dprdm index verify`` and a load without the cache
always re-hash everything. An entry is recorded only if the file's stat did not change while it was
hashed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FILE", "ChecksumCache"]

CACHE_FILE = "index-checksums.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class ChecksumCache:
    """Verified SHA-256 digests in ``directory/index-checksums.json`` (e.g. the server's data dir).

    Args:
        directory: where the cache file lives (created on first write; unwritable: no caching).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / CACHE_FILE
        self.hits = 0
        self.misses = 0

    def _entries(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """The file's SHA-256: the recorded one if its stat signature is unchanged, else a fresh hash."""
        from .format import sha256_file

        real = os.path.realpath(path)
        before = _signature(os.stat(real))
        entries = self._entries()
        entry = entries.get(real)
        if (
            isinstance(entry, dict)
            and entry.get("stat") == before
            and isinstance(entry.get("sha256"), str)
            and _HEX64.match(entry["sha256"])
        ):
            self.hits += 1
            return str(entry["sha256"])
        self.misses += 1
        digest = sha256_file(real)
        if _signature(os.stat(real)) == before:  # unchanged while hashed: safe to record
            entries[real] = {"stat": before, "sha256": digest}
            self._write(entries)
        return digest

    def _write(self, entries: dict[str, Any]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
