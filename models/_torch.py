"""Small torch helpers shared by the backends: device/dtype choice, hashing, image conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "default_device",
    "default_dtype",
    "sha256_file",
    "to_pil",
    "sampler_generator",
]


def default_device() -> torch.device:
    """CUDA when present (unless ``DPRDM_DEVICE`` says otherwise), else CPU."""
    name = os.environ.get("DPRDM_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on a GPU that supports it, else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes.

    Raises:
        FileNotFoundError: naming the path when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    h = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(n, 3, h, w)`` tensor in [-1, 1] to PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy()), "RGB") for a in arr]


def sampler_generator(seed: int | None) -> torch.Generator:
    """The diffusion sampler's generator (CPU, so results match across devices).

    A client seed drives only this generator; ``None`` draws a fresh seed from ``os.urandom``.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None; found {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)
