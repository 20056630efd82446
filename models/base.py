"""The interfaces every encoder and generator backend implements (SPEC §8).

Kept free of torch imports so the index and server layers can type against them cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # annotations only: the base install (no pillow) imports this module
    from PIL import Image

__all__ = ["EncoderIdentity", "Encoder", "IdentityMixin", "Generator", "ProgressCallback"]


@dataclass(frozen=True)
class EncoderIdentity:
    """What an index manifest records about the encoder that built it.

    Two encoders are interchangeable only if all three fields are equal; the server refuses to
    serve an index with a bundle whose encoder identity differs.

    Attributes:
        name: registry name or architecture (e.g. ``"dprdm-mini"``, ``"open_clip:ViT-B-32"``).
        weights_sha256: hex SHA-256 of the weights (file bytes, or a canonical state-dict hash).
        dimension: embedding dimension.
    """

    name: str
    weights_sha256: str
    dimension: int

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form for manifests."""
        return {"name": self.name, "weights_sha256": self.weights_sha256, "dimension": self.dimension}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> EncoderIdentity:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a missing/bad field."""
        try:
            name = str(data["name"])
            weights = str(data["weights_sha256"])
            dim = data["dimension"]
        except KeyError as exc:
            raise ValueError(f"encoder identity is missing field {exc.args[0]!r}") from None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"encoder identity dimension must be a positive int; found {dim!r}")
        return cls(name=name, weights_sha256=weights, dimension=dim)


class IdentityMixin:
    """``identity`` and ``dimension`` properties of an encoder that stores ``self._identity``."""

    _identity: EncoderIdentity

    @property
    def identity(self) -> EncoderIdentity:
        """Name, weights hash and dimension (recorded in index manifests)."""
        return self._identity

    @property
    def dimension(self) -> int:
        """Embedding dimension."""
        return self._identity.dimension


@runtime_checkable
class Encoder(Protocol):
    """A CLIP-like pair of towers mapping images and texts into one normalized space."""

    @property
    def identity(self) -> EncoderIdentity:
        """Name, weights hash and dimension (recorded in index manifests)."""
        ...

    @property
    def dimension(self) -> int:
        """Embedding dimension."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Embed a batch of RGB images; returns ``(n, dimension)`` float32 rows of unit L2 norm."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed a batch of prompts; returns ``(n, dimension)`` float32 rows of unit L2 norm."""
        ...


ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(step, total_steps)`` during denoising."""


@runtime_checkable
class Generator(Protocol):
    """A frozen image generator conditioned on a (noisy) embedding. Generation is post-processing."""

    @property
    def conditioning_dimension(self) -> int:
        """Dimension of the conditioning vector it expects (the paired encoder's dimension)."""
        ...

    def generate(
        self,
        conditioning: npt.NDArray[np.float32],
        prompt: str,
        n: int,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """Generate ``n`` images from one conditioning vector (and the prompt, if the backend uses it).

        ``seed`` drives only the diffusion sampler (never DP randomness).
        """
        ...
