"""An RDM-style generator: a diffusers UNet that cross-attends to k retrieval tokens (DP-RDM design).

The conditioning is ONLY the retrieval tokens ``token_j = lambda * release + (1 - lambda) * u_j``.
The server releases ``c = lambda * v_noisy + (1 - lambda) * u`` (one vector); with ``u_j = u`` for
every j that is ``token_j = c``, so a ``(d,)`` conditioning is repeated into k identical tokens. A
caller holding per-token public vectors ``u_j`` (computed from the request alone) builds a
``(k, d)`` token matrix with :func:`mix_tokens` and passes it instead. The prompt is not used: a
separate text token would make retrieval redundant (see the default-bundle notes). Classifier-free
guidance contrasts against all-zero tokens.

Directory layout (``save``/``load`` round-trip)::

    rdm_config.json   RDMConfig fields (+ optional "encoder": the EncoderIdentity it was trained with)
    unet/             diffusers UNet2DConditionModel.save_pretrained
    scheduler/        diffusers scheduler config (DDIM by default)
    vae/              optional AutoencoderKL: latent-space model when present, pixel-space otherwise

A packed two-file form (``save_packed``/``load_packed``: one JSON with every config and one
safetensors file of UNet weights) is used for package data, whose globs do not recurse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from ._torch import default_device, resolve_dtype, sampler_generator, to_pil
from .base import EncoderIdentity, ProgressCallback

__all__ = ["RDMConfig", "RDMGenerator", "mix_tokens", "expand_tokens"]

CONFIG_NAME = "rdm_config.json"
MAX_IMAGES = 64
MAX_STEPS = 1000


@dataclass(frozen=True)
class RDMConfig:
    """How conditioning becomes UNet inputs.

    Attributes:
        dim: conditioning dimension (the paired encoder's).
        k: number of retrieval tokens the UNet attends to.
        token_scale: tokens are multiplied by this before the UNet (helps small-norm embeddings).
        normalize_tokens: L2-normalize each token first (removes the norm shrink of noisy means).
        guidance_scale: classifier-free guidance weight against zero tokens (1 disables it).
        pooled_class_embedding: also feed the mean token as the UNet's ``class_labels``
            (requires ``class_embed_type="projection"``).
    """

    dim: int
    k: int = 4
    token_scale: float = 1.0
    normalize_tokens: bool = True
    guidance_scale: float = 1.0
    pooled_class_embedding: bool = False

    def __post_init__(self) -> None:
        if self.dim < 1 or self.k < 1:
            raise ValueError(f"RDMConfig needs dim >= 1 and k >= 1; found dim={self.dim}, k={self.k}")
        if not np.isfinite(self.token_scale) or self.token_scale <= 0:
            raise ValueError(f"token_scale must be a positive number; found {self.token_scale!r}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1; found {self.guidance_scale!r}")


def mix_tokens(
    noisy_mean: npt.ArrayLike, public_tokens: npt.ArrayLike, lam: float
) -> npt.NDArray[np.float32]:
    """DP-RDM tokens ``token_j = lam * noisy_mean + (1 - lam) * u_j`` (post-processing of the release).

    Args:
        noisy_mean: ``(d,)`` the noisy aggregate ``v_noisy``.
        public_tokens: ``(k, d)`` public vectors ``u_j`` computed from the request alone.
        lam: mixing weight in [0, 1].

    Returns:
        ``(k, d)`` float32 tokens.

    Raises:
        ValueError: on a shape mismatch or ``lam`` outside [0, 1].
    """
    v = np.asarray(noisy_mean, np.float32)
    u = np.asarray(public_tokens, np.float32)
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1]; found {lam!r}")
    if v.ndim != 1 or u.ndim != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(f"need noisy_mean (d,) and public_tokens (k, d); found {v.shape} and {u.shape}")
    return (float(lam) * v[None, :] + (1.0 - float(lam)) * u).astype(np.float32)


def expand_tokens(conditioning: npt.ArrayLike, k: int, dim: int) -> npt.NDArray[np.float32]:
    """Turn a ``(d,)`` release into ``k`` identical tokens, or validate a ``(k, d)`` token matrix.

    Raises:
        ValueError: naming the bad shape or non-finite values.
    """
    c = np.asarray(conditioning, dtype=np.float32)
    if c.ndim == 1:
        c = np.repeat(c[None, :], k, axis=0)
    if c.ndim != 2 or c.shape != (k, dim):
        raise ValueError(
            f"conditioning must have shape ({dim},) or ({k}, {dim}); found {np.shape(conditioning)}"
        )
    if not np.all(np.isfinite(c)):
        raise ValueError("conditioning contains non-finite values")
    return c


def _move(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move to device, casting only when the dtype changes (fp32 modules on CPU are left alone)."""
    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def check_request(n: int, steps: int) -> None:
    """Validate ``n`` and ``steps`` (shared by every generator).

    Raises:
        ValueError: naming the bad value.
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must be an int in [1, {MAX_IMAGES}]; found {n!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}]; found {steps!r}")


class RDMGenerator:
    """Generator behind :class:`dprdm.models.base.Generator` for RDM-style UNets.

    Thread-safe: every call builds its own scheduler from the stored config.
    """

    thread_safe = True

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        config: RDMConfig,
        vae: Any | None = None,
        expected_encoder: EncoderIdentity | None = None,
        device: torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.unet = _move(unet, self.device, self.dtype).eval()
        self.vae = _move(vae, self.device, self.dtype).eval() if vae is not None else None
        self.scheduler = scheduler
        self.config = config
        self.expected_encoder = expected_encoder
        cross = self.unet.config.cross_attention_dim
        if cross != config.dim:
            raise ValueError(f"UNet cross_attention_dim {cross} != conditioning dim {config.dim}")

    @property
    def conditioning_dimension(self) -> int:
        """Dimension of the release it expects."""
        return self.config.dim

    @classmethod
    def load(
        cls, directory: str | Path, device: torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> RDMGenerator:
        """Load from a directory written by :meth:`save`.

        Raises:
            FileNotFoundError: naming the missing file or folder.
            ValueError: if ``rdm_config.json`` is malformed.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        d = Path(directory)
        for rel in (CONFIG_NAME, "unet/config.json", "scheduler/scheduler_config.json"):
            if not (d / rel).is_file():
                raise FileNotFoundError(f"RDM generator file missing: {d / rel}")
        raw = json.loads((d / CONFIG_NAME).read_text())
        enc = raw.pop("encoder", None)
        try:
            cfg = RDMConfig(**raw)
        except TypeError as exc:
            raise ValueError(f"bad {d / CONFIG_NAME}: {exc}") from None
        unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(str(d / "scheduler"), local_files_only=True)
        vae = (
            AutoencoderKL.from_pretrained(str(d / "vae"), local_files_only=True)
            if (d / "vae").is_dir()
            else None
        )
        identity = EncoderIdentity.from_dict(enc) if enc else None
        return cls(unet, scheduler, cfg, vae=vae, expected_encoder=identity, device=device, dtype=dtype)

    def save(self, directory: str | Path) -> None:
        """Write the directory layout described in the module docstring (fp32 safetensors)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = asdict(self.config)
        if self.expected_encoder is not None:
            raw["encoder"] = self.expected_encoder.to_dict()
        (d / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
        self.unet.save_pretrained(str(d / "unet"), safe_serialization=True)
        self.scheduler.save_pretrained(str(d / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(d / "vae"), safe_serialization=True)

    @classmethod
    def load_packed(
        cls, json_path: str | Path, device: torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> RDMGenerator:
        """Load the packed form: ``<name>.json`` (configs) beside ``<name>.safetensors`` (UNet weights).

        Raises:
            FileNotFoundError: naming the missing file.
            ValueError: if the JSON is malformed or the weights do not match the UNet config.
        """
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        p = Path(json_path)
        weights = p.with_suffix(".safetensors")
        for f in (p, weights):
            if not f.is_file():
                raise FileNotFoundError(f"RDM generator file missing: {f}")
        raw = json.loads(p.read_text())
        try:
            cfg = RDMConfig(**raw["rdm"])
            unet = UNet2DConditionModel.from_config(raw["unet"])
            scheduler = DDIMScheduler.from_config(raw["scheduler"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad packed RDM config {p}: {exc!r}") from None
        try:
            unet.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise ValueError(f"weights {weights} do not match the UNet config in {p}: {exc}") from None
        enc = raw.get("encoder")
        identity = EncoderIdentity.from_dict(enc) if enc else None
        return cls(unet, scheduler, cfg, expected_encoder=identity, device=device, dtype=dtype)

    def save_packed(self, json_path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the packed form (pixel-space models only); returns the weights path.

        Raises:
            ValueError: if the model has a VAE (use :meth:`save`).
        """
        from safetensors.torch import save_file

        if self.vae is not None:
            raise ValueError("save_packed supports pixel-space models only; use save() for latent models")
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = {
            "rdm": asdict(self.config),
            "unet": dict(self.unet.config),
            "scheduler": dict(self.scheduler.config),
            **(extra or {}),
        }
        if self.expected_encoder is not None:
            raw["encoder"] = self.expected_encoder.to_dict()
        p.write_text(json.dumps(raw, indent=2, default=list) + "\n")
        state = {k: v.detach().float().contiguous() for k, v in self.unet.state_dict().items()}
        save_file(state, str(p.with_suffix(".safetensors")))
        return p.with_suffix(".safetensors")

    def tokens(self, conditioning: npt.ArrayLike) -> torch.Tensor:
        """The ``(k, d)`` UNet tokens for a release (normalized and scaled per the config)."""
        c = torch.from_numpy(expand_tokens(conditioning, self.config.k, self.config.dim))
        if self.config.normalize_tokens:
            c = torch.nn.functional.normalize(c, dim=-1)
        return c * self.config.token_scale

    def unet_inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments for the UNet from ``(b, k, d)`` tokens (used by training and sampling)."""
        kwargs = {"encoder_hidden_states": tokens}
        if self.config.pooled_class_embedding:
            kwargs["class_labels"] = tokens.mean(1)
        return kwargs

    @torch.no_grad()
    def generate(
        self,
        conditioning: npt.NDArray[np.float32],
        prompt: str,
        n: int,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """Sample ``n`` images conditioned only on the retrieval tokens (``prompt`` is ignored).

        Args:
            conditioning: the release, ``(d,)``, or a ``(k, d)`` token matrix.
            prompt: unused by RDM-style models (kept for the common interface).
            n: images to draw, 1..64.
            steps: denoising steps, 1..1000.
            seed: sampler seed (drives only the diffusion noise); ``None`` for a fresh one.
            progress: called as ``progress(step, steps)`` after each step.

        Returns:
            ``n`` PIL RGB images.

        Raises:
            ValueError: naming a bad shape, non-finite conditioning, or bad ``n``/``steps``/``seed``.
        """
        check_request(n, steps)
        tok = self.tokens(conditioning)
        return self._sample(tok[None].expand(n, -1, -1), steps, seed, progress)

    @torch.no_grad()
    def generate_many(
        self,
        conditionings: npt.ArrayLike,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """One image per release, sampled as one batch (benchmarks, batched serving).

        Args:
            conditionings: ``(b, d)`` releases or ``(b, k, d)`` token matrices, b in 1..64.
            steps: denoising steps.
            seed: sampler seed for the whole batch.
            progress: as in :meth:`generate`.

        Raises:
            ValueError: naming a bad shape, batch size, ``steps`` or ``seed``.
        """
        arr = np.asarray(conditionings, np.float32)
        if arr.ndim not in (2, 3):
            raise ValueError(f"conditionings must be (b, d) or (b, k, d); found {arr.shape}")
        check_request(len(arr), steps)
        tok = torch.stack([self.tokens(c) for c in arr])
        return self._sample(tok, steps, seed, progress)

    def _sample(
        self, cond: torch.Tensor, steps: int, seed: int | None, progress: ProgressCallback | None
    ) -> list[Image.Image]:
        gen = sampler_generator(seed)
        n = cond.shape[0]
        cond = cond.to(self.device, self.dtype)
        guided = self.config.guidance_scale > 1.0
        if guided:
            cond = torch.cat([torch.zeros_like(cond), cond])
        unet_kwargs = self.unet_inputs(cond)
        cfg = self.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device, self.dtype)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            x_in = torch.cat([x, x]) if guided else x
            x_in = scheduler.scale_model_input(x_in, t)
            pred = self.unet(x_in, t, **unet_kwargs).sample
            if guided:
                un, co = pred.chunk(2)
                pred = un + self.config.guidance_scale * (co - un)
            x = scheduler.step(pred, t, x, generator=gen).prev_sample
            if progress is not None:
                progress(i + 1, steps)
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return to_pil(x)
