"""Private training images for the baselines: a folder of images with captions.

Captions come from ``metadata.jsonl`` (Hugging Face ``imagefolder`` convention: one JSON object
per line with ``file_name`` and ``text``), else from a sidecar ``<stem>.txt`` per image, else the
empty caption. One image with its caption is one record (the unit of privacy, SPEC §3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageSet", "load_image_dir", "write_image_dir", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageSet:
    """``pixels``: ``(n, 3, s, s)`` float32 in [-1, 1]; ``captions``: one string per image."""

    pixels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _captions(d: Path, files: list[Path]) -> list[str]:
    meta = d / "metadata.jsonl"
    if meta.is_file():
        table: dict[str, str] = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[str(row["file_name"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}; {exc}") from None
        return [table.get(f.name, "") for f in files]
    return [f.with_suffix(".txt").read_text().strip() if f.with_suffix(".txt").is_file() else "" for f in files]


def load_image_dir(directory: str | Path, size: int) -> ImageSet:
    """Load every image of ``directory`` (sorted by name), RGB, resized to ``size`` x ``size``.

    Args:
        directory: folder with images and optional captions.
        size: side in pixels the model works with.

    Returns:
        The image set.

    Raises:
        FileNotFoundError: if the folder is missing or holds no image.
        ValueError: on an unreadable image or a malformed ``metadata.jsonl``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"data directory not found: {d}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32))
        except OSError as exc:
            raise ValueError(f"unreadable image {f}: {exc}") from None
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return ImageSet(pixels=pixels.contiguous(), captions=_captions(d, files))


def write_image_dir(directory: str | Path, images: np.ndarray, captions: list[str]) -> Path:
    """Write ``(n, h, w, 3)`` uint8 images as PNGs with a ``metadata.jsonl`` (tests, benchmarks).

    Raises:
        ValueError: if the counts differ.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        name = f"{i:06d}.png"
        Image.fromarray(np.asarray(img, np.uint8), "RGB").save(d / name)
        lines.append(json.dumps({"file_name": name, "text": cap}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d
