"""open_clip encoders loaded from local files only (SPEC §8). Nothing here downloads.

Accepted sources (the part of a registry spec after ``open_clip:``):

- ``ARCH@/path/to/weights.{safetensors,bin,pt,pth}``: a built-in (or ``add_model_config``-registered)
  architecture name plus a local checkpoint file.
- ``local-dir:/path``: a folder with ``open_clip_config.json`` and a checkpoint (open_clip's layout).
- ``hf-hub:org/repo``: a model already in the local Hugging Face cache (``HF_HOME`` /
  ``HF_HUB_CACHE``). Files are resolved with ``huggingface_hub.try_to_load_from_cache`` and never
  fetched, whether or not ``HF_HUB_OFFLINE=1`` is set; a missing file is named in the error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from ._torch import default_device, resolve_dtype, sha256_file
from .base import EncoderIdentity, IdentityMixin

__all__ = ["OpenClipSource", "OpenClipEncoder", "parse_source", "resolve_hf_cache"]

CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


@dataclass(frozen=True)
class OpenClipSource:
    """Where an open_clip model comes from: ``kind`` is ``"arch"``, ``"local-dir"`` or ``"hf-hub"``."""

    kind: str
    name: str
    path: Path | None = None


def parse_source(text: str) -> OpenClipSource:
    """Parse the source part of an ``open_clip:`` spec (see the module docstring).

    Raises:
        ValueError: naming the malformed source.
    """
    if text.startswith("local-dir:"):
        path = text[len("local-dir:") :]
        if not path:
            raise ValueError("open_clip source 'local-dir:' needs a path")
        return OpenClipSource("local-dir", f"local-dir:{Path(path).name}", Path(path))
    if text.startswith("hf-hub:"):
        repo = text[len("hf-hub:") :]
        if repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
            raise ValueError(f"open_clip source {text!r}: expected 'hf-hub:org/repo'")
        return OpenClipSource("hf-hub", text)
    arch, sep, path = text.partition("@")
    if not sep or not arch or not path:
        raise ValueError(
            f"open_clip source {text!r}: expected 'ARCH@/path/to/checkpoint', 'local-dir:/path' or "
            "'hf-hub:org/repo' (pretrained tags would download and are not accepted)"
        )
    return OpenClipSource("arch", arch, Path(path))


def resolve_hf_cache(repo: str, cache_dir: str | None = None) -> Path:
    """Snapshot folder of ``repo`` in the local HF cache holding its open_clip config and weights.

    Raises:
        FileNotFoundError: naming the missing file, the repository and the cache searched.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cache = cache_dir or constants.HF_HUB_CACHE
    config = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache)
    if not isinstance(config, str):
        raise FileNotFoundError(
            f"open_clip_config.json of hf-hub:{repo} is not in the local Hugging Face cache {cache} "
            "(nothing is downloaded; copy the model into the cache or use local-dir:)"
        )
    for name in CHECKPOINT_NAMES:
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str):
            return Path(found).parent
    raise FileNotFoundError(
        f"no checkpoint of hf-hub:{repo} in the local Hugging Face cache {cache}; "
        f"looked for {', '.join(CHECKPOINT_NAMES)}"
    )


def _checkpoint_in(directory: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no open_clip checkpoint in {directory}; looked for {', '.join(CHECKPOINT_NAMES)}"
    )


class OpenClipEncoder(IdentityMixin):
    """An open_clip CLIP model behind :class:`dprdm.models.base.Encoder` (fp32 on CPU, bf16/fp16 on GPUs)."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        identity: EncoderIdentity,
        device: torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._identity = identity

    @classmethod
    def load(
        cls,
        source: str | OpenClipSource,
        device: torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> OpenClipEncoder:
        """Build from a local source (see :func:`parse_source`).

        Raises:
            FileNotFoundError: naming a missing checkpoint, config or directory.
            ValueError: on a malformed source or unknown architecture.
        """
        import open_clip

        src = parse_source(source) if isinstance(source, str) else source
        if src.kind == "arch":
            assert src.path is not None
            if not src.path.is_file():
                raise FileNotFoundError(f"open_clip checkpoint not found: {src.path}")
            if src.name not in open_clip.list_models():
                raise ValueError(f"unknown open_clip architecture {src.name!r}; see open_clip.list_models()")
            model, _, preprocess = open_clip.create_model_and_transforms(src.name, pretrained=str(src.path))
            tokenizer = open_clip.get_tokenizer(src.name)
            checkpoint, name = src.path, f"open_clip:{src.name}"
        else:
            directory = src.path if src.kind == "local-dir" else resolve_hf_cache(src.name[len("hf-hub:") :])
            assert directory is not None
            if not (directory / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"open_clip config not found: {directory / 'open_clip_config.json'}")
            checkpoint = _checkpoint_in(directory)
            spec = f"local-dir:{directory}"
            model, _, preprocess = open_clip.create_model_and_transforms(spec)
            tokenizer = open_clip.get_tokenizer(spec)
            name = f"open_clip:{src.name}"
        dim = int(_embed_dim(model))
        identity = EncoderIdentity(name=name, weights_sha256=sha256_file(checkpoint), dimension=dim)
        return cls(model, preprocess, tokenizer, identity, device=device, dtype=dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> npt.NDArray[np.float32]:
        """Embed RGB images with the model's own preprocessing. Returns unit rows, float32."""
        out = []
        for i in range(0, len(images), batch_size):
            px = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch_size]])
            out.append(self.model.encode_image(px.to(self.device, self.dtype), normalize=True).float().cpu())
        return _rows(out, self.dimension)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> npt.NDArray[np.float32]:
        """Embed prompts. Returns unit rows, float32.

        Raises:
            TypeError: if an item is not a string.
        """
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings; found {type(t).__name__}: {t!r}")
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(self.model.encode_text(tok, normalize=True).float().cpu())
        return _rows(out, self.dimension)


def _embed_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    with torch.no_grad():
        return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])


def _rows(chunks: list[torch.Tensor], dim: int) -> npt.NDArray[np.float32]:
    if not chunks:
        return np.zeros((0, dim), np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


def write_local_dir(model: Any, model_cfg: dict[str, Any], directory: str | Path) -> Path:
    """Save an open_clip model in the ``local-dir:`` layout (config JSON + safetensors); for tests/tools."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "open_clip_model.safetensors"))
    return d / "open_clip_model.safetensors"
