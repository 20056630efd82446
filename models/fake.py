"""The one fake encoder of the test suites and benchmarks: deterministic, torch-free, no weights.

Every text and every image maps to a unit Gaussian vector seeded by the SHA-256 of its content
(a text's UTF-8 bytes; an image's size and RGB pixels), so equal inputs embed equally and distinct
inputs get unrelated embeddings (cosine about N(0, 1/d)). The embeddings mean nothing: never
serve real data with it.

The index tests build with it, the server's ``hash-<dim>`` fake bundles (``dprdm.server.testing``)
serve with it, and both record the same identity (``name``, all-zero weights hash, ``dimension``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from .base import EncoderIdentity, IdentityMixin

__all__ = ["FakeEncoder"]


class FakeEncoder(IdentityMixin):
    """Deterministic encoder: texts and images hashed to unit vectors (implements ``Encoder``).

    Args:
        dimension: embedding dimension.
        name: the identity's name, recorded in index manifests (weights hash: 64 zeros).

    Attributes:
        calls: how many ``encode_images``/``encode_texts`` batches it has embedded (tests count).

    Raises:
        ValueError: if ``dimension`` is not positive.
    """

    def __init__(self, dimension: int = 16, name: str = "fake") -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1; found {dimension}")
        self._identity = EncoderIdentity(name=name, weights_sha256="0" * 64, dimension=int(dimension))
        self.calls = 0

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit vectors seeded by the SHA-256 of each text's UTF-8 bytes."""
        self.calls += 1
        return self._embed([t.encode() for t in texts])

    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Unit vectors seeded by the SHA-256 of each image's size and RGB pixels (mode-independent)."""
        self.calls += 1
        return self._embed([_image_bytes(im) for im in images])

    def _embed(self, payloads: list[bytes]) -> npt.NDArray[np.float32]:
        rows = np.empty((len(payloads), self.dimension), np.float64)
        for i, data in enumerate(payloads):
            seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
            rows[i] = np.random.default_rng(seed).standard_normal(self.dimension)
        unit: npt.NDArray[np.float32] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        return unit


def _image_bytes(image: Image.Image) -> bytes:
    rgb = image.convert("RGB")
    return f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()
