"""Checkpointed shards of a build: stream, hash, decode and embed a corpus, resumable (SPEC §5).

A :mod:`reader <dprdm.index.readers>` yields raw items in a fixed order; each is hashed (SHA-256
of its bytes), decoded and embedded in batches; every ``shard_size`` items a checkpoint shard is
committed under ``OUTPUT/.build``: ``shard-NNNNNN.vectors.npy`` (the unit embeddings) and then
``shard-NNNNNN.meta.json`` (keys, digests, owners, per-item errors, duplicates skipped), each
written to a temporary file, fsynced and renamed.  The meta file is the commit point: a vectors
file without it, or any ``.tmp``, is discarded on resume.  A crash or Ctrl-C therefore loses at
most the current shard, and ``--resume`` continues after the last committed one, provided the
fingerprint in ``.build/state.json`` (reader, encoder, owner mode) is unchanged.

Unreadable or undecodable items and encoder failures (non-finite or zero embeddings) are recorded
per item and never stop the build.  Exact duplicates met while streaming are skipped before
decoding (set semantics, see :mod:`dprdm.index.records`).

Fixed-size encoder calls (:func:`embed_fixed`): the encoder is always called with exactly
``batch_size`` inputs, a short batch being padded with copies of its last input (whose rows are
discarded).  Real encoders are not batch-invariant (``dprdm-mini`` on CPU: a different batch
size changes the last bits, ~5e-7), but at a FIXED batch size an image's embedding does not
depend on its batch-mates or its position (checked for ``dprdm-mini``), so every engine
(:mod:`~dprdm.index.ray_build` batches differently) and every resume stores the same bytes.

Memory: the images of one batch, one shard of vectors, and the (owner, digest) pairs seen so far.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index.corpus import CorpusItem, CorpusReader
from dprdm.index.errors import IndexBuildError
from dprdm.index.format import MANIFEST, atomic_write_json
from dprdm.models.base import Encoder

__all__ = ["BUILD_DIR", "Shard", "committed_parts", "committed_shards", "prepare_output", "encode_shards", "embed_fixed", "unit_rows", "save_npy_atomic", "decode_image", "thin_meta", "shard_items"]

BUILD_DIR = ".build"
_ITEM_LISTS = ("keys", "digests", "owners", "errors")


def thin_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` without its per-item lists (keys, digests, owners, errors), plus ``rows`` (embedded rows).

    What the build keeps in memory per shard (a few hundred bytes, whatever the shard size);
    :func:`shard_items` reads the lists back from the meta file one shard at a time.
    """
    if "digests" not in meta:
        return meta
    return {**{k: v for k, v in meta.items() if k not in _ITEM_LISTS}, "rows": len(meta["digests"]),
            "owner_mode": meta["owners"] is not None}


def shard_items(build_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The full metadata of a committed shard (its per-item lists), read from its meta file if ``meta`` is thin."""
    if "digests" in meta:
        return meta
    name = str(meta["vectors"]).removesuffix(".vectors.npy")
    return dict(json.loads((build_dir / f"{name}.meta.json").read_text()))


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary file, fsync, then ``os.replace`` onto ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def prepare_output(out: Path, existing: str, fingerprint: dict[str, Any]) -> Path:
    """Create (or reopen, to resume) ``out`` and its checkpoint folder; returns the folder.

    Args:
        out: the index directory.
        existing: ``refuse``, ``resume`` or ``overwrite`` (what to do if ``out`` is occupied).
        fingerprint: what the checkpoints depend on; a resume with another one is refused.

    Raises:
        IndexBuildError: ``out`` is occupied and ``existing`` does not allow it, or is not an
            index directory (overwrite), or has no matching checkpoint (resume).
    """
    build_dir = out / BUILD_DIR
    state = build_dir / "state.json"
    if out.exists() and not out.is_dir():
        raise IndexBuildError(f"output {str(out)!r} exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and existing == "refuse":
        raise IndexBuildError(
            f"output {str(out)!r} already exists; pass --resume to continue an interrupted build "
            "or --overwrite to replace it"
        )
    if occupied and existing == "overwrite":
        if not ((out / MANIFEST).exists() or build_dir.exists()):
            raise IndexBuildError(f"output {str(out)!r} is not an index directory; refusing to delete it")
        shutil.rmtree(out)
    if occupied and existing == "resume":
        if (out / MANIFEST).exists():
            raise IndexBuildError(f"output {str(out)!r} is a finished index; use --overwrite to rebuild it")
        if not state.is_file():
            raise IndexBuildError(f"output {str(out)!r} has no checkpoint to resume ({BUILD_DIR}/state.json)")
        previous = json.loads(state.read_text())
        if previous.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise IndexBuildError(
                f"cannot resume {str(out)!r}: its checkpoint was made with different inputs or encoder "
                f"({previous.get('fingerprint')}); use --overwrite to start again"
            )
        return build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"fingerprint": fingerprint})
    return build_dir


def committed_shards(build_dir: Path) -> list[dict[str, Any]]:
    """Committed shards in order (thin: :func:`thin_meta`); a vectors file without its meta (or any .tmp) is discarded."""
    metas = []
    for meta_path in sorted(build_dir.glob("shard-*.meta.json")):
        meta = json.loads(meta_path.read_text())
        vec_path = build_dir / meta["vectors"]
        if not vec_path.is_file():
            raise IndexBuildError(f"checkpoint {str(meta_path)!r} has lost its vectors file; use --overwrite")
        metas.append(thin_meta(meta))
    for i, meta in enumerate(metas):
        if meta["shard"] != i or meta["start"] != (metas[i - 1]["end"] if i else 0):
            raise IndexBuildError(f"checkpoints in {str(build_dir)!r} are not contiguous at shard {i}; use --overwrite")
    known = {m["vectors"] for m in metas} | {f"shard-{m['shard']:06d}.meta.json" for m in metas}
    for stray in build_dir.glob("shard-*"):
        if stray.name not in known:
            stray.unlink()
    return metas


def committed_parts(build_dir: Path, prefix: str = "part") -> dict[int, dict[str, Any]]:
    """Committed out-of-order checkpoints ``PREFIX-NNNNNN`` (distributed builds) by number.

    A part is committed once its meta file exists (written after its vectors); any other
    ``PREFIX-*`` file (vectors without meta, ``.tmp``) is an interrupted write and is removed.

    Raises:
        IndexBuildError: a committed part lost its vectors file.
    """
    parts: dict[int, dict[str, Any]] = {}
    for meta_path in sorted(build_dir.glob(f"{prefix}-*.meta.json")):
        meta = json.loads(meta_path.read_text())
        if not (build_dir / meta["vectors"]).is_file():
            raise IndexBuildError(f"checkpoint {str(meta_path)!r} has lost its vectors file; use --overwrite")
        parts[int(meta["shard"])] = thin_meta(meta)
    known = {m["vectors"] for m in parts.values()} | {f"{prefix}-{n:06d}.meta.json" for n in parts}
    for stray in build_dir.glob(f"{prefix}-*"):
        if stray.name not in known:
            stray.unlink()
    return parts


class Shard:
    """One checkpoint shard being filled: per embedded row its key, digest and owner, plus errors."""

    def __init__(self, number: int, start: int) -> None:
        self.number, self.start = number, start
        self.keys: list[str] = []
        self.digests: list[str] = []
        self.owners: list[str] = []
        self.vectors: list[npt.NDArray[np.float32]] = []
        self.errors: list[dict[str, str]] = []
        self.duplicates = 0

    def commit(self, build_dir: Path, end: int, dim: int, owner_mode: bool, *, prefix: str = "shard") -> dict[str, Any]:
        """Write ``PREFIX-NNNNNN.vectors.npy`` then (the commit point) ``PREFIX-NNNNNN.meta.json``; returns the thin meta."""
        name = f"{prefix}-{self.number:06d}"
        vecs = np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)
        save_npy_atomic(build_dir / f"{name}.vectors.npy", vecs)
        meta = {
            "shard": self.number, "start": self.start, "end": end, "vectors": f"{name}.vectors.npy",
            "keys": self.keys, "digests": self.digests, "owners": self.owners if owner_mode else None,
            "errors": self.errors, "duplicates": self.duplicates,
        }
        atomic_write_json(build_dir / f"{name}.meta.json", meta)  # the commit point
        return thin_meta(meta)


class _ImageBytes(io.BytesIO):
    def __repr__(self) -> str:  # PIL quotes the file in its errors: keep reports free of memory addresses
        return "<image bytes>"


def decode_image(data: bytes) -> Any:
    """The RGB PIL image of encoded bytes (raises whatever the decoder raises on bad bytes)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(_ImageBytes(data)) as im:
            return im.convert("RGB")


def encode_shards(
    reader: CorpusReader,
    encoder: Encoder,
    build_dir: Path,
    *,
    batch_size: int,
    shard_size: int,
    progress: bool,
    owner_mode: bool,
) -> list[dict[str, Any]]:
    """Embed the items not yet checkpointed in ``build_dir``, committing a shard every ``shard_size``.

    Returns:
        The (thin, :func:`thin_meta`) metadata of every committed shard, old and new, in order.

    Raises:
        IndexBuildError: broken checkpoints, or an encoder returning the wrong shape.
    """
    from tqdm import tqdm

    metas = committed_shards(build_dir)
    start = metas[-1]["end"] if metas else 0
    seen: set[tuple[str, str]] = set()
    for meta in metas:
        full = shard_items(build_dir, meta)
        seen.update(zip(full["owners"] or [""] * len(full["digests"]), full["digests"], strict=True))
    dim = encoder.dimension
    shard = Shard(len(metas), start)
    batch: list[tuple[str, str, str, Any]] = []

    def flush() -> None:
        if batch:
            _embed(encoder, batch, shard, dim, batch_size)
            batch.clear()

    pos = start
    with tqdm(total=reader.total(), initial=start, unit="img", desc="encoding", disable=not progress,
              dynamic_ncols=True, smoothing=0.05) as bar:
        for item in reader.iter_from(start):
            _take(item, shard, batch, seen, owner_mode)
            pos += 1
            bar.update(1)
            if len(batch) >= batch_size:
                flush()
            if pos - shard.start >= shard_size:
                flush()
                metas.append(shard.commit(build_dir, pos, dim, owner_mode))
                shard = Shard(shard.number + 1, pos)
        flush()
        if pos > shard.start:
            metas.append(shard.commit(build_dir, pos, dim, owner_mode))
    return metas


def _take(item: CorpusItem, shard: Shard, batch: list[tuple[str, str, str, Any]],
          seen: set[tuple[str, str]], owner_mode: bool) -> None:
    if item.data is None:
        shard.errors.append({"key": item.key, "error": item.error or "no data"})
        return
    digest = hashlib.sha256(item.data).hexdigest()
    owner = (item.owner or "") if owner_mode else ""
    if owner_mode and not owner:
        shard.errors.append({"key": item.key, "error": "missing owner"})
        return
    if (owner, digest) in seen:
        shard.duplicates += 1
        return
    try:
        image = decode_image(item.data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-item error, never a crash
        shard.errors.append({"key": item.key, "error": f"cannot decode image: {type(exc).__name__}: {exc}"[:300]})
        return
    seen.add((owner, digest))
    batch.append((item.key, digest, owner, image))


def embed_fixed(
    encode: Callable[[list[Any]], Any], inputs: list[Any], batch_size: int, dim: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Embed ``inputs`` (at most ``batch_size``) in ONE encoder call of exactly ``batch_size`` inputs.

    The batch is padded with copies of its last input (their rows are discarded); rows are then
    normalized in float64 and rounded to float32.  Both build engines embed through here.

    Returns:
        ``(unit rows, ok)``: ``(n, dim)`` float32 (rows where ``ok`` is False are meaningless) and
        the mask of finite, non-zero embeddings.

    Raises:
        IndexBuildError: the encoder returned another shape.
    """
    n = len(inputs)
    if not 0 < n <= batch_size:
        raise IndexBuildError(f"embed_fixed takes 1 to {batch_size} inputs; found {n}")
    vecs = np.asarray(encode(list(inputs) + [inputs[-1]] * (batch_size - n)), dtype=np.float64)
    if vecs.shape != (batch_size, dim):
        raise IndexBuildError(f"encoder returned shape {vecs.shape} for {batch_size} images of dimension {dim}")
    return unit_rows(vecs[:n])


def unit_rows(vecs: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Rows of ``vecs`` (float64) divided by their L2 norm, rounded to float32, and the mask of
    rows with a finite non-zero norm (other rows are zero).  The one normalization of every build path."""
    norms = np.linalg.norm(vecs, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    unit = np.zeros(vecs.shape, np.float32)
    unit[ok] = (vecs[ok] / norms[ok, None]).astype(np.float32)
    return unit, ok


def _embed(encoder: Encoder, batch: list[tuple[str, str, str, Any]], shard: Shard, dim: int, batch_size: int) -> None:
    unit, ok = embed_fixed(encoder.encode_images, [b[3] for b in batch], batch_size, dim)
    for i, (key, digest, owner, _img) in enumerate(batch):
        if not ok[i]:
            shard.errors.append({"key": key, "error": "encoder produced a non-finite or zero embedding"})
            continue
        shard.keys.append(key)
        shard.digests.append(digest)
        shard.owners.append(owner)
    if np.any(ok):
        shard.vectors.append(unit[ok])
