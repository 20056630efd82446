"""Deterministic test helpers: a fake encoder and synthetic corpora (no model downloads).

:class:`FakeEncoder` implements :class:`dprdm.models.base.Encoder`: an image is resized to 8x8 RGB,
its pixels are projected by a fixed random matrix and normalized.  It is deterministic, fast and
sensitive to content, which is all the index tests need.  Never use it to serve real data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from dprdm.models.base import EncoderIdentity

__all__ = ["FakeEncoder", "random_unit_vectors", "make_image", "write_image_folder"]


class FakeEncoder:
    """Downsampled pixels -> fixed Gaussian projection -> unit rows (float32)."""

    def __init__(self, dimension: int = 32, seed: int = 0) -> None:
        self._dimension = int(dimension)
        self._proj = np.random.default_rng(seed).standard_normal((8 * 8 * 3, self._dimension))
        digest = hashlib.sha256(self._proj.tobytes()).hexdigest()
        self._identity = EncoderIdentity(f"index-testing:fake-{dimension}", digest, self._dimension)
        self.calls = 0

    @property
    def identity(self) -> EncoderIdentity:
        return self._identity

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        self.calls += 1
        if not images:
            return np.zeros((0, self._dimension), np.float32)
        pix = np.stack([np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float64).ravel()
                        for im in images])
        x = (pix / 255.0 - 0.5) @ self._proj
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big"))
                .standard_normal(self._dimension) for t in texts]
        x = np.array(rows).reshape(len(texts), self._dimension)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit_vectors(n: int, d: int, seed: int = 0, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """``n`` iid uniform unit vectors in R^d."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def make_image(seed: int, size: int = 16) -> Image.Image:
    """A random RGB image (distinct content per seed)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def write_image_folder(root: str | Path, n: int, *, start_seed: int = 0, fmt: str = "png") -> list[Path]:
    """Write ``n`` distinct random images into ``root`` (two sub-folders); returns their paths."""
    root = Path(root)
    paths = []
    for i in range(n):
        sub = root / ("a" if i % 2 == 0 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:05d}.{fmt}"
        make_image(start_seed + i).save(path)
        paths.append(path)
    return paths
