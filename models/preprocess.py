"""Splitting an encoder into CPU preprocessing and the model call (distributed index builds).

The :class:`~dprdm.models.base.Encoder` protocol embeds PIL images in one call. A distributed
build (:mod:`dprdm.index.ray_build`) wants the per-image work (decode, resize, to pixels) in
cheap CPU tasks and only the model call in the (GPU) encoder actors, so :func:`split_encoder`
returns two halves:

* ``preprocess``: a small picklable callable, list of RGB PIL images -> list of uint8 arrays,
  that needs neither torch nor the weights (CPU tasks never load the model);
* ``encode``: list of those arrays -> ``(n, d)`` embeddings, run where the encoder lives.

Contract: ``encode(preprocess(images))`` is **bytewise equal** to ``encoder.encode_images(images)``
(a test checks it for ``dprdm-mini`` and the fake encoder), so both build engines store the same
vectors.  Encoders with a known split: ``dprdm-mini`` (resize to the tower's input, then
``encode_pixels``, chunked exactly like ``encode_images``).  Any other encoder gets the generic
split: the decoded RGB pixels travel as an array and are turned back into the same PIL image
(lossless) before ``encode_images``; its own preprocessing then runs in the actor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from PIL import Image

    from .base import Encoder

__all__ = ["RgbPixels", "ResizedRgb", "split_encoder", "preprocess_for"]

Encode = Callable[[Sequence[npt.NDArray[np.uint8]]], npt.NDArray[np.float32]]

_MINI_CHUNK = 512  # MiniEncoder.encode_images embeds in chunks of 512: the split must chunk alike


@dataclass(frozen=True)
class RgbPixels:
    """Generic preprocessing: the RGB pixels as ``(h, w, 3)`` uint8 (lossless, any size)."""

    def __call__(self, images: Sequence[Image.Image]) -> list[npt.NDArray[np.uint8]]:
        return [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]


@dataclass(frozen=True)
class ResizedRgb:
    """``dprdm-mini`` preprocessing: RGB, bilinear resize to ``size`` x ``size`` (as ``pixels_from_pil``)."""

    size: int

    def __call__(self, images: Sequence[Image.Image]) -> list[npt.NDArray[np.uint8]]:
        from PIL import Image

        out = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
            out.append(np.asarray(im, dtype=np.uint8))
        return out


def _mini_class() -> type | None:
    module = sys.modules.get("dprdm.models.mini_encoder")  # loaded iff a MiniEncoder exists
    return getattr(module, "MiniEncoder", None) if module is not None else None


def preprocess_for(encoder: Encoder) -> Callable[[Sequence[Image.Image]], list[npt.NDArray[np.uint8]]]:
    """The picklable CPU half of :func:`split_encoder` (ship it to CPU tasks; it holds no weights)."""
    mini = _mini_class()
    if mini is not None and isinstance(encoder, mini):
        return ResizedRgb(int(encoder.model.cfg.image_size))  # type: ignore[attr-defined]
    return RgbPixels()


def split_encoder(
    encoder: Encoder,
) -> tuple[Callable[[Sequence[Image.Image]], list[npt.NDArray[np.uint8]]], Encode]:
    """``(preprocess, encode)`` with ``encode(preprocess(imgs)) == encoder.encode_images(imgs)`` bytewise.

    Args:
        encoder: any :class:`~dprdm.models.base.Encoder`.

    Returns:
        The CPU half (picklable, torch-free) and the model half (bound to ``encoder``).
    """
    pre = preprocess_for(encoder)
    if isinstance(pre, ResizedRgb):
        pixels = encoder.encode_pixels  # type: ignore[attr-defined]
        dim = encoder.dimension

        def encode_mini(arrays: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
            if not len(arrays):
                return np.zeros((0, dim), np.float32)
            x = np.stack(arrays)
            return np.concatenate([pixels(x[i : i + _MINI_CHUNK]) for i in range(0, len(x), _MINI_CHUNK)])

        return pre, encode_mini

    def encode_generic(arrays: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        from PIL import Image

        return encoder.encode_images([Image.fromarray(np.ascontiguousarray(a), "RGB") for a in arrays])

    return pre, encode_generic
