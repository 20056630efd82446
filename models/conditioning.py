"""How a release becomes a diffusers pipeline's image-embedding input, and encoder pairing (SPEC §8).

Our encoders return unit vectors; Stable unCLIP, Kandinsky 2.2 and IP-Adapter were trained on their
CLIP image encoder's UNNORMALISED ``image_embeds`` (``CLIPVisionModelWithProjection(px).image_embeds``).
A release ``c`` is therefore passed as ``embedding_scale * c``, where the scale is declared by the
bundle or measured as the mean ``image_embeds`` norm of the pipeline's own image encoder on
:func:`probe_images` (fixed, public, procedural images). The pipeline's own image encoder (a
:class:`ClipVisionReference`) also checks the pairing: the bundle's encoder and it must point the
same way on the probe images (:func:`pairing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._torch import default_device, resolve_dtype
from .base import Encoder

__all__ = ["ClipVisionReference", "PairingReport", "probe_images", "mean_norm", "pairing"]

PROBE_SIZE = 224


class ClipVisionReference:
    """A pipeline's own CLIP image encoder: the path its ``encode_image`` / ``_encode_image`` takes.

    Args:
        image_encoder: a ``transformers.CLIPVisionModelWithProjection``.
        feature_extractor: the ``CLIPImageProcessor`` the pipeline uses with it.
        source: where it came from (named in errors).
    """

    def __init__(self, image_encoder: Any, feature_extractor: Any, source: str) -> None:
        self.image_encoder = image_encoder.eval()
        self.feature_extractor = feature_extractor
        self.source = source

    @classmethod
    def load(
        cls, directory: str | Path, device: torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> ClipVisionReference:
        """Load a ``CLIPVisionModelWithProjection`` folder (e.g. Kandinsky 2.2 prior ``image_encoder/``,
        IP-Adapter ``models/image_encoder/``); its processor comes from the folder, else from a sibling
        ``image_processor/`` (the prior's layout), else CLIP's defaults at the model's image size.

        Raises:
            FileNotFoundError: naming the missing ``config.json``.
        """
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"image encoder folder needs config.json: {d / 'config.json'} not found")
        dev = device or default_device()
        model = CLIPVisionModelWithProjection.from_pretrained(str(d), local_files_only=True)
        model = model.to(dev, resolve_dtype(dtype, dev))
        for proc_dir in (d, d.parent / "image_processor"):
            if (proc_dir / "preprocessor_config.json").is_file():
                processor = CLIPImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)
                break
        else:
            size = int(model.config.image_size)
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model, processor, str(d))

    @property
    def dimension(self) -> int:
        """``projection_dim`` of the encoder."""
        return int(self.image_encoder.config.projection_dim)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.image_encoder.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unnormalised ``image_embeds`` ``(n, d)``, float32 on the CPU (exactly the pipeline's path)."""
        device, dtype = self._device_dtype()
        px = self.feature_extractor(images=list(images), return_tensors="pt").pixel_values
        return self.image_encoder(px.to(device=device, dtype=dtype)).image_embeds.float().cpu()

    @torch.no_grad()
    def zero_embed(self) -> torch.Tensor:
        """``image_embeds`` of an all-zero pixel tensor, ``(d,)`` float32 (Kandinsky prior ``get_zero_embed``)."""
        device, dtype = self._device_dtype()
        size = int(self.image_encoder.config.image_size)
        zero = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
        return self.image_encoder(zero)["image_embeds"][0].float().cpu()


def probe_images() -> list[Image.Image]:
    """A fixed set of 12 public 224x224 images: 8 procedural mini-data scenes and 4 gradients/patterns.

    Procedural and deterministic (no data files); the same on every machine.
    """
    from .mini_data import PUBLIC_STYLES, make_split

    split = make_split(8, PUBLIC_STYLES, seed=20261203)
    out = [Image.fromarray(a).resize((PROBE_SIZE, PROBE_SIZE), Image.BICUBIC) for a in split.images]
    y, x = np.mgrid[0:PROBE_SIZE, 0:PROBE_SIZE].astype(np.float32) / (PROBE_SIZE - 1)
    patterns = [
        np.stack([x, y, 1 - x], -1),
        np.stack([y, 0.5 + 0 * x, x * y], -1),
        np.repeat((((x * 8).astype(int) + (y * 8).astype(int)) % 2)[..., None], 3, -1).astype(np.float32),
        np.stack([0.5 + 0.5 * np.sin(12 * x), 0.5 + 0.5 * np.cos(9 * y), 0.5 + 0 * x], -1),
    ]
    out += [Image.fromarray((p * 255).round().astype(np.uint8), "RGB") for p in patterns]
    return out


def mean_norm(reference: ClipVisionReference, images: Sequence[Image.Image] | None = None) -> float:
    """Mean L2 norm of the reference's ``image_embeds`` on ``images`` (default :func:`probe_images`)."""
    emb = reference.embed(list(images) if images is not None else probe_images())
    return float(emb.norm(dim=-1).mean())


@dataclass(frozen=True)
class PairingReport:
    """Cosines between the bundle's encoder and the pipeline's own image encoder on the probe images."""

    mean_cosine: float
    min_cosine: float
    images: int


def pairing(
    encoder: Encoder, reference: ClipVisionReference, images: Sequence[Image.Image] | None = None
) -> PairingReport:
    """Embed ``images`` (default :func:`probe_images`) with both and compare directions.

    Raises:
        ValueError: if the two dimensions differ.
    """
    imgs = list(images) if images is not None else probe_images()
    if encoder.dimension != reference.dimension:
        raise ValueError(f"encoder dimension {encoder.dimension} != image encoder dimension {reference.dimension}")
    ours = np.asarray(encoder.encode_images(imgs), np.float64)
    theirs = reference.embed(imgs).double().numpy()
    ours /= np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    theirs /= np.maximum(np.linalg.norm(theirs, axis=1, keepdims=True), 1e-12)
    cos = np.sum(ours * theirs, axis=1)
    return PairingReport(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()), images=len(imgs))
