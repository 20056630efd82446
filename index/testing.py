"""Deterministic synthetic corpora for tests and benchmarks: unit vectors and image folders.

The fake encoder to embed them with is :class:`dprdm.models.fake.FakeEncoder`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["random_unit_vectors", "make_image", "write_image_folder"]


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
