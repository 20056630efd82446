"""Generators wrapping diffusers pipelines conditioned on CLIP image embeddings (SPEC §8).

Each is loaded with ``from_pretrained(local_dir, local_files_only=True)``: nothing is downloaded.
fp32 on CPU; bf16/fp16 on a GPU (see :func:`dprdm.models._torch.default_dtype`).

The release ``c`` (a unit-scale vector) is passed as ``embedding_scale * c``: the pipelines were
trained on their CLIP image encoder's unnormalised ``image_embeds`` (see
:mod:`dprdm.models.conditioning`). Everything else matches the pipeline's own image path:

- :class:`UnCLIPGenerator`: Stable unCLIP (``StableUnCLIPImg2ImgPipeline``), ``image_embeds`` plus
  the text prompt; the pipeline applies its ``image_normalizer`` and ``noise_level`` itself
  (``_encode_image``), negative = zeros.
- :class:`KandinskyGenerator`: Kandinsky 2.2 decoder (``KandinskyV22Pipeline``), ``image_embeds``
  against the prior's embedding of a zero image (``get_zero_embed``); the prompt is not used.
- :class:`IPAdapterGenerator`: Stable Diffusion + IP-Adapter, ``ip_adapter_image_embeds`` (negative
  = zeros, as ``encode_image``) plus the text prompt.

Each call runs on its own ``from_pipe`` view with fresh scheduler state, so concurrent calls on one
generator (the server's worker threads) never share a scheduler; the weights are shared.

Size (~415 lines, over the ~400 guideline): the three diffusers backends share the call,
conditioning and per-call pipeline code; one file keeps their conventions side by side.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from ._torch import default_device, resolve_dtype, sampler_generator
from .base import EncoderIdentity, ProgressCallback
from .conditioning import ClipVisionReference
from .rdm import check_request

__all__ = ["UnCLIPGenerator", "KandinskyGenerator", "IPAdapterGenerator", "PIPELINE_GENERATORS"]


def _require_dir(path: str | Path, what: str) -> Path:
    d = Path(path)
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{what} pipeline folder needs model_index.json: {d / 'model_index.json'} not found"
        )
    return d


def _dtype_kwargs(device: torch.device, dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """``from_pretrained`` dtype argument: omitted for fp32 (the default), so any diffusers >= 0.27 works;
    ``dtype=`` where diffusers deprecates ``torch_dtype=`` (0.36+), ``torch_dtype=`` before."""
    from diffusers.utils import deprecation_utils

    resolved = resolve_dtype(dtype, device)
    if resolved == torch.float32:
        return {}
    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if new else "torch_dtype": resolved}


def _scale(value: float) -> float:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"embedding_scale must be a positive number; found {value!r}")
    return float(value)


def _vector(conditioning: npt.ArrayLike, dim: int) -> npt.NDArray[np.float32]:
    c = np.asarray(conditioning, dtype=np.float32)
    if c.shape != (dim,):
        raise ValueError(f"conditioning must have shape ({dim},); found {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("conditioning contains non-finite values")
    return c


class _PipelineGenerator:
    """Shared plumbing: device/dtype, validation, seeding and progress reporting."""

    what = "diffusers"
    thread_safe = True  # each call gets its own scheduler state (see _call_pipe)

    def __init__(
        self,
        pipe: Any,
        dim: int,
        guidance_scale: float,
        size: int | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        embedding_scale: float = 1.0,
        reference: ClipVisionReference | None = None,
    ) -> None:
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipe = pipe.to(self.device) if self.dtype == torch.float32 else pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.dim = dim
        self.guidance_scale = guidance_scale
        self.size = size
        self.expected_encoder = expected_encoder
        self.embedding_scale = _scale(embedding_scale)
        self.embedding_scale_source = "declared"
        self.reference = reference
        """The pipeline's own CLIP image encoder, when it has one (pairing check, scale measurement)."""
        self._serial = threading.Lock()

    @property
    def conditioning_dimension(self) -> int:
        """Dimension of the image embedding the pipeline expects."""
        return self.dim

    def _size_kwargs(self) -> dict[str, int]:
        return {"height": self.size, "width": self.size} if self.size else {}

    def _embed(self, conditioning: npt.ArrayLike) -> torch.Tensor:
        """The pipeline's ``image_embeds`` for a release: ``embedding_scale * c``, shape ``(1, dim)``."""
        c = torch.from_numpy(_vector(conditioning, self.dim))[None] * self.embedding_scale
        return c.to(self.device, self.dtype)

    def _call_pipe(self) -> Any:
        """A view of the pipeline sharing its weights with fresh scheduler state (diffusers' server guide)."""
        from diffusers.utils import logging as diffusers_logging

        fresh = {
            name: getattr(self.pipe, name).from_config(getattr(self.pipe, name).config)
            for name in ("scheduler", "image_noising_scheduler")
            if getattr(self.pipe, name, None) is not None
        }
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # from_pipe's notes about dtypes of shared modules
        try:
            pipe = type(self.pipe).from_pipe(self.pipe, **fresh)
        finally:
            diffusers_logging.set_verbosity(level)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(
        self,
        conditioning: npt.NDArray[np.float32],
        prompt: str,
        n: int,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """Generate ``n`` images from one conditioning vector (see the class docstring for the prompt).

        Args:
            conditioning: the release, shape ``(dim,)``.
            prompt: the text prompt (used by unCLIP and IP-Adapter).
            n: images, 1..64.
            steps: denoising steps, 1..1000.
            seed: seeds only the diffusion sampler; ``None`` for a fresh one.
            progress: called as ``progress(step, steps)``.

        Returns:
            ``n`` PIL RGB images.

        Raises:
            ValueError: naming a bad shape, non-finite value, ``n``, ``steps`` or ``seed``.
        """
        check_request(n, steps)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string; found {type(prompt).__name__}")
        kwargs = self._call_kwargs(self._embed(conditioning), prompt)
        kwargs.update(self._size_kwargs())
        kwargs.update(self._progress_kwargs(progress, steps))
        with torch.no_grad(), (nullcontext() if self.thread_safe else self._serial):
            out = self._call_pipe()(
                num_inference_steps=steps,
                num_images_per_prompt=n,
                generator=sampler_generator(seed),
                guidance_scale=self.guidance_scale,
                output_type="pil",
                **kwargs,
            )
        return [im.convert("RGB") for im in out.images]

    def _call_kwargs(self, embeds: torch.Tensor, prompt: str) -> dict[str, Any]:
        raise NotImplementedError

    def _progress_kwargs(self, progress: ProgressCallback | None, steps: int) -> dict[str, Any]:
        if progress is None:
            return {}

        def on_step_end(_pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            progress(i + 1, steps)
            return tensors

        return {"callback_on_step_end": on_step_end}


class UnCLIPGenerator(_PipelineGenerator):
    """Stable unCLIP: the release is the CLIP image embedding; the prompt conditions the UNet's text path.

    The pipeline's ``_encode_image`` then normalises, noises (``noise_level``) and un-normalises it,
    and appends the noise-level embedding, exactly as for an image it encoded itself.
    """

    what = "Stable unCLIP"
    thread_safe = False
    """Calls on one unCLIP pipeline run one at a time (the generation pool and :meth:`generate`
    itself serialise them): even with a fresh scheduler and noising scheduler per call, concurrent
    calls were seen to differ from the same calls run alone (about one CI run in ten, under load;
    the shared component responsible was not found). Issue 16 item 1 allows serialising per
    pipeline; Kandinsky and IP-Adapter calls still run concurrently."""

    def __init__(self, pipe: Any, dim: int, guidance_scale: float, *args: Any, noise_level: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(pipe, dim, guidance_scale, *args, **kwargs)
        limit = int(pipe.image_noising_scheduler.config.num_train_timesteps)
        if not isinstance(noise_level, int) or isinstance(noise_level, bool) or not 0 <= noise_level < limit:
            raise ValueError(f"noise_level must be an int in [0, {limit - 1}]; found {noise_level!r}")
        self.noise_level = noise_level
        if self.reference is None and getattr(pipe, "image_encoder", None) is not None:
            self.reference = ClipVisionReference(
                self.pipe.image_encoder, self.pipe.feature_extractor, "the pipeline's image_encoder"
            )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        guidance_scale: float = 10.0,
        size: int | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> UnCLIPGenerator:
        """Load a ``StableUnCLIPImg2ImgPipeline`` folder.

        ``options``: ``dtype``, ``embedding_scale`` (default 1), ``noise_level`` (default 0).

        Raises:
            FileNotFoundError: naming the missing ``model_index.json``.
        """
        from diffusers import StableUnCLIPImg2ImgPipeline

        d = _require_dir(directory, cls.what)
        dev = device or default_device()
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(
            str(d), local_files_only=True, **_dtype_kwargs(dev, options.get("dtype"))
        )
        return cls.from_pipeline(pipe, guidance_scale, size, expected_encoder, dev, **options)

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        guidance_scale: float = 10.0,
        size: int | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> UnCLIPGenerator:
        """Wrap an already-built pipeline (its image normalizer fixes the dimension)."""
        dim = int(pipe.image_normalizer.mean.shape[-1])
        return cls(pipe, dim, guidance_scale, size, expected_encoder, device, **options)

    def _call_kwargs(self, embeds: torch.Tensor, prompt: str) -> dict[str, Any]:
        return {"image_embeds": embeds, "prompt": prompt, "noise_level": self.noise_level}

    def _progress_kwargs(self, progress: ProgressCallback | None, steps: int) -> dict[str, Any]:
        if progress is None:
            return {}
        return {"callback": lambda i, _t, _latents: progress(i + 1, steps), "callback_steps": 1}


class KandinskyGenerator(_PipelineGenerator):
    """Kandinsky 2.2 decoder: the release replaces the prior's image embedding; the prompt is unused.

    The negative image embedding is the prior's ``get_zero_embed`` (its image encoder on an all-zero
    pixel tensor): taken from ``reference`` when given, else ``negative``, else zeros (tests only; a
    bundle must give one or the other).
    """

    what = "Kandinsky 2.2 decoder"

    def __init__(self, pipe: Any, dim: int, guidance_scale: float, *args: Any,
                 negative: npt.ArrayLike | None = None, **kwargs: Any) -> None:
        super().__init__(pipe, dim, guidance_scale, *args, **kwargs)
        if negative is None and self.reference is not None:
            negative = self.reference.zero_embed().numpy()
        self.negative = np.zeros(dim, np.float32) if negative is None else _vector(negative, dim)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        guidance_scale: float = 4.0,
        size: int | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> KandinskyGenerator:
        """Load a ``KandinskyV22Pipeline`` folder.

        ``options``: ``dtype``, ``embedding_scale``, ``reference`` (the prior's image encoder),
        ``negative`` (the unconditional image embedding).

        Raises:
            FileNotFoundError: naming the missing ``model_index.json``.
        """
        from diffusers import KandinskyV22Pipeline

        d = _require_dir(directory, cls.what)
        dev = device or default_device()
        pipe = KandinskyV22Pipeline.from_pretrained(
            str(d), local_files_only=True, **_dtype_kwargs(dev, options.get("dtype"))
        )
        return cls.from_pipeline(pipe, guidance_scale, size, expected_encoder, dev, **options)

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        guidance_scale: float = 4.0,
        size: int | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> KandinskyGenerator:
        """Wrap an already-built pipeline (the UNet's ``encoder_hid_dim`` fixes the dimension)."""
        dim = int(pipe.unet.config.encoder_hid_dim)
        return cls(pipe, dim, guidance_scale, size, expected_encoder, device, **options)

    def _call_kwargs(self, embeds: torch.Tensor, prompt: str) -> dict[str, Any]:
        neg = torch.from_numpy(self.negative)[None].to(self.device, self.dtype)
        return {"image_embeds": embeds, "negative_image_embeds": neg}


class IPAdapterGenerator(_PipelineGenerator):
    """Stable Diffusion + IP-Adapter: ``ip_adapter_image_embeds`` (negative = zeros) with the text prompt."""

    what = "Stable Diffusion + IP-Adapter"

    @classmethod
    def load(
        cls,
        directory: str | Path,
        ip_adapter: str | Path,
        guidance_scale: float = 7.5,
        size: int | None = None,
        scale: float = 1.0,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> IPAdapterGenerator:
        """Load a ``StableDiffusionPipeline`` folder and an IP-Adapter weights file.

        ``ip_adapter`` is the original single-file format, e.g. ``ip-adapter_sd15.safetensors``.
        ``options``: ``dtype``, ``embedding_scale``, ``reference`` (the adapter's image encoder).

        Raises:
            FileNotFoundError: naming the missing pipeline folder or IP-Adapter file.
        """
        from diffusers import StableDiffusionPipeline

        d = _require_dir(directory, cls.what)
        weights = Path(ip_adapter)
        if not weights.is_file():
            raise FileNotFoundError(f"IP-Adapter weights not found: {weights}")
        dev = device or default_device()
        pipe = StableDiffusionPipeline.from_pretrained(
            str(d),
            local_files_only=True,
            **_dtype_kwargs(dev, options.get("dtype")),
            safety_checker=None,
            requires_safety_checker=False,
        )
        pipe.load_ip_adapter(
            str(weights.parent),
            subfolder="",
            weight_name=weights.name,
            image_encoder_folder=None,
            local_files_only=True,
        )
        return cls.from_pipeline(pipe, guidance_scale, size, scale, expected_encoder, dev, **options)

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        guidance_scale: float = 7.5,
        size: int | None = None,
        scale: float = 1.0,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        **options: Any,
    ) -> IPAdapterGenerator:
        """Wrap a pipeline whose UNet already has IP-Adapter weights loaded.

        Raises:
            ValueError: if the UNet has no IP-Adapter image projection.
        """
        proj = getattr(pipe.unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if not layers:
            raise ValueError("the Stable Diffusion UNet has no IP-Adapter loaded (encoder_hid_proj is empty)")
        dim = int(layers[0].image_embeds.in_features)
        pipe.set_ip_adapter_scale(scale)
        if options.get("reference") is None and getattr(pipe, "image_encoder", None) is not None:
            options["reference"] = ClipVisionReference(
                pipe.image_encoder, pipe.feature_extractor, "the pipeline's image_encoder"
            )
        return cls(pipe, dim, guidance_scale, size, expected_encoder, device, **options)

    def _call_kwargs(self, embeds: torch.Tensor, prompt: str) -> dict[str, Any]:
        # prepare_ip_adapter_image_embeds chunks (negative, positive) along dim 0; encode_image's
        # negative for a plain (non-"plus") adapter is zeros_like(image_embeds).
        pair = torch.stack([torch.zeros_like(embeds), embeds]) if self.guidance_scale > 1 else embeds[None]
        return {"ip_adapter_image_embeds": [pair], "prompt": prompt}


PIPELINE_GENERATORS: dict[str, type[_PipelineGenerator]] = {
    "stable-unclip": UnCLIPGenerator,
    "kandinsky-2.2": KandinskyGenerator,
    "sd-ip-adapter": IPAdapterGenerator,
}
