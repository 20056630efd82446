"""Deterministic, procedurally generated captioned images for the ``dprdm-mini`` bundle.

Every image is one large shape (4 shapes x 4 colours) with a fill (solid or striped) on a
background (plain, dotted, or a brick texture cropped from scikit-image's bundled ``brick``
photograph). The PUBLIC styles are five (fill, background) pairs; the PRIVATE demo style is the
sixth pair, ``striped`` on ``dotted``: both features appear in public data, never together. See
``models/DATA_CARD.md``.

Images are drawn at 4x with PIL and downscaled (anti-aliasing); the same seed always gives the
same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "SHAPES",
    "COLOURS",
    "FILLS",
    "BACKGROUNDS",
    "PUBLIC_STYLES",
    "PRIVATE_STYLE",
    "Attributes",
    "Split",
    "caption",
    "content_prompt",
    "heldout_prompts",
    "make_split",
    "render",
]

IMAGE_SIZE = 24
_SCALE = 4
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 205, 20),
}
FILLS: tuple[str, ...] = ("solid", "striped")
BACKGROUNDS: tuple[str, ...] = ("plain", "dotted", "brick")
PUBLIC_STYLES: tuple[tuple[str, str], ...] = (
    ("solid", "plain"),
    ("striped", "plain"),
    ("solid", "dotted"),
    ("solid", "brick"),
    ("striped", "brick"),
)
PRIVATE_STYLE: tuple[str, str] = ("striped", "dotted")

_TRAIN_TEMPLATES: tuple[str, ...] = ("a {colour} {fill}{shape}{bg}", "{colour} {fill}{shape}{bg}")
_HELDOUT_TEMPLATES: tuple[str, ...] = ("a picture of a {colour} {shape}", "an image of a {colour} {shape}")
_BG_PHRASES = {"plain": "", "dotted": " on a dotted background", "brick": " on a brick wall"}


@dataclass(frozen=True)
class Attributes:
    """The labels of one image (indices into SHAPES, COLOURS, FILLS, BACKGROUNDS)."""

    shape: int
    colour: int
    fill: int
    background: int

    def names(self) -> tuple[str, str, str, str]:
        """Return ``(shape, colour, fill, background)`` as words."""
        return (
            SHAPES[self.shape],
            list(COLOURS)[self.colour],
            FILLS[self.fill],
            BACKGROUNDS[self.background],
        )


@dataclass(frozen=True)
class Split:
    """A generated split: ``images`` is ``(n, 24, 24, 3)`` uint8, ``labels`` ``(n, 4)`` int64
    (shape, colour, fill, background), ``captions`` one caption per image."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    captions: list[str]

    def pil(self, i: int) -> Image.Image:
        """Image ``i`` as a PIL RGB image."""
        return Image.fromarray(self.images[i], "RGB")


def caption(attrs: Attributes, template: int = 0) -> str:
    """Full caption naming content and style (the public training captions).

    Args:
        attrs: image labels.
        template: index into the training templates.

    Returns:
        e.g. ``"a red striped circle on a brick wall"``; solid fill and plain background are unnamed.
    """
    shape, colour, fill, bg = attrs.names()
    fill_word = "striped " if fill == "striped" else ""
    return _TRAIN_TEMPLATES[template % len(_TRAIN_TEMPLATES)].format(
        colour=colour, fill=fill_word, shape=shape, bg=_BG_PHRASES[bg]
    )


def content_prompt(shape: str, colour: str) -> str:
    """The content-only prompt a user sends (no style words), e.g. ``"a red circle"``."""
    return f"a {colour} {shape}"


def heldout_prompts() -> list[tuple[str, int, int]]:
    """Prompts in phrasings never used in training: ``(prompt, shape index, colour index)``."""
    out = []
    for t in _HELDOUT_TEMPLATES:
        for si, shape in enumerate(SHAPES):
            for ci, colour in enumerate(COLOURS):
                out.append((t.format(colour=colour, shape=shape), si, ci))
    return out


@lru_cache(maxsize=1)
def _brick_texture() -> npt.NDArray[np.float32]:
    """scikit-image's bundled brick photograph (grey, 512x512) scaled to [0, 1]."""
    from skimage import data  # local import: only the generator needs scikit-image

    return data.brick().astype(np.float32) / 255.0


def _background(bg: str, rng: np.random.Generator) -> Image.Image:
    size = IMAGE_SIZE * _SCALE
    base = int(rng.integers(185, 225))
    if bg == "brick":
        tex = _brick_texture()
        crop = IMAGE_SIZE * 8
        y, x = rng.integers(0, tex.shape[0] - crop, size=2)
        patch = tex[y : y + crop, x : x + crop]
        patch = (patch - patch.min()) / max(float(np.ptp(patch)), 1e-6)
        tint = np.array([170, 90, 60], np.float32) + rng.uniform(-15, 15, 3)
        rgb = (0.45 + 0.55 * patch[..., None]) * tint
        return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BILINEAR)
    img = Image.new("RGB", (size, size), (base, base, base))
    if bg == "dotted":
        draw = ImageDraw.Draw(img)
        period, r = 4 * _SCALE, 1.1 * _SCALE
        oy, ox = rng.integers(0, period, size=2)
        dark = base - 120
        for cy in range(int(oy) - period, size + period, period):
            for cx in range(int(ox) - period, size + period, period):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(dark, dark, dark))
    return img


def _shape_mask(shape: str, rng: np.random.Generator) -> Image.Image:
    size = IMAGE_SIZE * _SCALE
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.32, 0.40)
    cx, cy = size / 2 + rng.uniform(-2, 2) * _SCALE, size / 2 + rng.uniform(-2, 2) * _SCALE
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=255)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def render(attrs: Attributes, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Draw one image.

    Args:
        attrs: what to draw.
        rng: the only source of jitter (size, position, tint, texture phase).

    Returns:
        ``(24, 24, 3)`` uint8 array.
    """
    shape, colour, fill, bg = attrs.names()
    img = _background(bg, rng)
    size = IMAGE_SIZE * _SCALE
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    layer = Image.new("RGB", (size, size), rgb)
    if fill == "striped":
        draw = ImageDraw.Draw(layer)
        period = 4 * _SCALE
        off = int(rng.integers(0, period))
        dark = tuple(int(c * 0.25) for c in rgb)
        for y in range(off - period, size, period):
            draw.rectangle([0, y, size, y + period // 2 - 1], fill=dark)
    img.paste(layer, (0, 0), _shape_mask(shape, rng))
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS), dtype=np.uint8)


def make_split(n: int, styles: tuple[tuple[str, str], ...], seed: int) -> Split:
    """Generate ``n`` images with content uniform over shapes x colours and style uniform over ``styles``.

    Args:
        n: number of images (>= 1).
        styles: allowed ``(fill, background)`` pairs.
        seed: seed of the ``numpy`` generator (deterministic output).

    Returns:
        The split.

    Raises:
        ValueError: if ``n < 1``, ``styles`` is empty or names an unknown fill/background.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; found {n}")
    if not styles:
        raise ValueError("styles must not be empty")
    for fill, bg in styles:
        if fill not in FILLS or bg not in BACKGROUNDS:
            raise ValueError(f"unknown style {(fill, bg)!r}; fills {FILLS}, backgrounds {BACKGROUNDS}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((n, 4), np.int64)
    captions = []
    for i in range(n):
        fill, bg = styles[int(rng.integers(len(styles)))]
        attrs = Attributes(
            shape=int(rng.integers(len(SHAPES))),
            colour=int(rng.integers(len(COLOURS))),
            fill=FILLS.index(fill),
            background=BACKGROUNDS.index(bg),
        )
        images[i] = render(attrs, rng)
        labels[i] = (attrs.shape, attrs.colour, attrs.fill, attrs.background)
        captions.append(caption(attrs, template=int(rng.integers(len(_TRAIN_TEMPLATES)))))
    return Split(images=images, labels=labels, captions=captions)
