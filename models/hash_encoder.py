"""A deterministic, dependency-free test encoder (no torch): hashed texts, mean-colour images.

Used by the tests of every layer (models, index, server) and by the load benchmark, so it lives
apart from ``dprdm.models.testing``, which builds tiny torch/diffusers models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from .base import EncoderIdentity, IdentityMixin

__all__ = ["HashEncoder"]


class HashEncoder(IdentityMixin):
    """Deterministic encoder: texts hashed to unit vectors, images embedded by their mean colour."""

    def __init__(self, dimension: int = 16, name: str = "hash-test") -> None:
        self._identity = EncoderIdentity(name=name, weights_sha256="0" * 64, dimension=dimension)

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit vectors seeded by the SHA-256 of each text."""
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.dimension))
        return _unit(rows, self.dimension)

    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Unit vectors from the mean RGB of each image (tiled over the dimension)."""
        rows = []
        for im in images:
            mean = np.asarray(im.convert("RGB"), np.float64).mean((0, 1)) / 255.0 + 0.01
            rows.append(np.resize(mean, self.dimension) * np.linspace(1.0, 2.0, self.dimension))
        return _unit(rows, self.dimension)


def _unit(rows: list[Any], dim: int) -> npt.NDArray[np.float32]:
    if not rows:
        return np.zeros((0, dim), np.float32)
    a = np.asarray(rows, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
