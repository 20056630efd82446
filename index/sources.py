"""Where corpus bytes come from: local paths, or any ``fsspec`` URL (``s3://``, ``gs://``, ``file://``).

The readers (:mod:`~dprdm.index.readers`) name every input by a *source*: a local
:class:`~pathlib.Path`, or a URL string with a scheme.  Local paths are read with the standard
library (the local engine's behaviour is unchanged, and ``fsspec`` is needed only for URLs); URLs
go through ``fsspec``, imported only when a URL is met, so ``s3://bucket/imgs`` and a local folder
list, read and key their files alike.  A remote filesystem needs its own fsspec driver
(``s3fs``, ``gcsfs``), installed by the operator; a missing one is a one-line error.

Nothing here raises on an unreadable file: :func:`read_bytes` returns ``(None, why)`` so a
corrupt or vanished file is an error item of the build, never a crash.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import IO, Any

from dprdm.index.errors import IndexBuildError

__all__ = ["Source", "is_url", "as_source", "read_bytes", "open_binary", "is_file", "is_dir", "list_files", "join",
           "basename", "describe"]

Source = Path | str
"""A local path, or a URL string with a scheme (``s3://b/k``, ``file:///x``)."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | Path) -> bool:
    """True for a string with a ``scheme://`` prefix (a :class:`Path` never is one)."""
    return isinstance(value, str) and bool(_SCHEME.match(value))


def as_source(value: str | Path) -> Source:
    """A URL stays a string; anything else becomes a :class:`Path`."""
    return value if is_url(value) else Path(value)


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise IndexBuildError(f"reading {url!r} needs fsspec: pip install 'dprdm[build]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise IndexBuildError(f"cannot open {url!r}: {exc}") from None


def _unstrip(url: str, fs: Any, path: str) -> str:
    """The URL of ``path`` on the filesystem of ``url`` (same scheme)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.lstrip('/') if protocol != 'file' else path}"


def read_bytes(src: Source) -> tuple[bytes | None, str | None]:
    """The bytes of ``src``, or ``(None, why)`` if it cannot be read (never raises on I/O errors)."""
    if isinstance(src, Path):
        try:
            return src.read_bytes(), None
        except OSError as exc:
            return None, f"unreadable file: {exc.strerror or exc}"
    try:
        fs, path = _fs(src)
        return fs.cat_file(path), None
    except FileNotFoundError:  # fsspec drivers raise it without strerror: word it as the local case
        return None, "unreadable file: No such file or directory"
    except (OSError, IndexBuildError) as exc:
        return None, f"unreadable file: {getattr(exc, 'strerror', None) or exc}"


def open_binary(src: Source) -> IO[bytes]:
    """``src`` opened for binary reading (seekable; the caller closes it).

    Raises:
        OSError: it cannot be opened (as :func:`open` raises).
        IndexBuildError: a URL whose filesystem driver is not installed.
    """
    if isinstance(src, Path):
        return open(src, "rb")
    fs, path = _fs(src)
    return fs.open(path, "rb")  # type: ignore[no-any-return]


def _exists(src: Source, kind: str) -> bool:
    if isinstance(src, Path):
        return src.is_file() if kind == "file" else src.is_dir()
    fs, path = _fs(src)
    try:
        return bool(fs.isfile(path) if kind == "file" else fs.isdir(path))
    except OSError:
        return False


def is_file(src: Source) -> bool:
    """Whether ``src`` names an existing file."""
    return _exists(src, "file")


def is_dir(src: Source) -> bool:
    """Whether ``src`` names an existing folder (a prefix with objects, for object stores)."""
    return _exists(src, "dir")


def list_files(root: str) -> list[tuple[str, Source]]:
    """Every file under the folder URL ``root`` (recursive) as ``(relative POSIX key, URL)``, sorted by key.

    Raises:
        IndexBuildError: ``root`` is not a folder.
    """
    fs, base = _fs(root)
    if not is_dir(root):
        raise IndexBuildError(f"input folder {root!r} does not exist")
    base = base.rstrip("/")
    out = []
    for path in fs.find(base):
        rel = posixpath.relpath(path, base)
        out.append((rel, _unstrip(root, fs, path)))
    return sorted(out)


def join(base_file: Source, relative: str) -> Source:
    """``relative`` resolved against the folder of ``base_file`` (absolute paths/URLs kept as they are)."""
    if is_url(relative):
        return relative
    if isinstance(base_file, Path):
        rel = Path(relative)
        return rel if rel.is_absolute() else base_file.parent / rel
    if relative.startswith("/"):
        scheme = base_file.split("://", 1)[0]
        return f"{scheme}://{relative}"
    return posixpath.join(posixpath.dirname(base_file), relative)


def basename(src: Source) -> str:
    """The last component of ``src`` (a file name, for keys such as ``FILE#ROW``)."""
    return src.name if isinstance(src, Path) else posixpath.basename(src.rstrip("/"))


def describe(src: Source) -> str:
    """A stable name of ``src`` for checkpoint fingerprints (resolved path, or the URL)."""
    return str(src.resolve()) if isinstance(src, Path) else src

