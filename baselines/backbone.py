"""The frozen text-conditioned diffusion model the baselines adapt, behind one small interface.

Two sources (``load_backbone``):

* a diffusers directory (``save_pretrained`` layout): ``unet/``, ``scheduler/``, ``text_encoder/``
  (a CLIP text model), ``tokenizer/`` and, for a latent model, ``vae/`` (pixel space without it);
* a model bundle of the registry (``bundle:dprdm-mini`` or ``bundle:/path/to/bundle.json``) whose
  generator is an RDM UNet: the prompt is embedded by the bundle's text tower (the DP-RDM
  public-only conditioning, lambda = 0) and fed as the UNet's tokens.

Textual inversion uses a placeholder word that the tokenizer maps to ONE existing token; a
forward hook on the text model's input-embedding table replaces that token's embedding with a
per-prompt vector (:meth:`Conditioner.encode` with ``inject``). No vocabulary is changed.

Training loss: the scheduler's own target (epsilon for ``prediction_type="epsilon"``, the
velocity for ``"v_prediction"``), mean squared error per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["Backbone", "Conditioner", "load_backbone", "diffusion_loss", "DEFAULT_PLACEHOLDER"]

DEFAULT_PLACEHOLDER = "*"
BUNDLE_PREFIX = "bundle:"


class Conditioner:
    """Prompts -> UNet keyword arguments, with optional textual-inversion injection.

    Args:
        tokenizer: a Hugging Face tokenizer.
        embedding: the text model's input-embedding table (``nn.Embedding``).
        placeholder: the word whose single token receives the injected vector.

    Raises:
        ValueError: if the placeholder is not exactly one token.
    """

    def __init__(self, tokenizer: Any, embedding: torch.nn.Embedding, placeholder: str = DEFAULT_PLACEHOLDER) -> None:
        ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"placeholder {placeholder!r} must be one token for this tokenizer; found {len(ids)}")
        self.tokenizer, self.embedding, self.placeholder = tokenizer, embedding, placeholder
        self.token_id = int(ids[0])
        self._inject: torch.Tensor | None = None
        embedding.register_forward_hook(self._hook)

    @property
    def token_dim(self) -> int:
        """Dimension of an input token embedding (a textual-inversion vector)."""
        return int(self.embedding.weight.shape[1])

    def placeholder_embedding(self) -> torch.Tensor:
        """The placeholder token's own (public) embedding, a detached copy."""
        return self.embedding.weight[self.token_id].detach().clone()

    def word_embedding(self, word: str) -> torch.Tensor:
        """Mean input embedding of ``word``'s tokens (a public initializer for inversion)."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"initializer word {word!r} has no tokens")
        return self.embedding.weight[torch.tensor(ids)].detach().mean(0).clone()

    def _hook(self, module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._inject is None:
            return None
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        vec = self._inject.to(output.dtype)[:, None, :].expand_as(output)
        return torch.where(mask, vec, output)

    def encode(self, prompts: Sequence[str], inject: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for ``prompts``; ``inject`` (n, token_dim) replaces the placeholder.

        Raises:
            ValueError: if ``inject`` is given and a prompt lacks the placeholder, or shapes differ.
        """
        if inject is not None:
            if inject.shape != (len(prompts), self.token_dim):
                raise ValueError(f"inject must have shape ({len(prompts)}, {self.token_dim}); found {tuple(inject.shape)}")
            missing = [p for p in prompts if self.placeholder not in p.split()]
            if missing:
                raise ValueError(f"prompt {missing[0]!r} lacks the placeholder word {self.placeholder!r}")
        self._inject = inject
        try:
            return self._encode(list(prompts))
        finally:
            self._inject = None

    def unconditional(self, n: int) -> dict[str, torch.Tensor]:
        """The classifier-free-guidance reference for ``n`` rows."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The frozen modules behind the conditioning (for :meth:`Backbone.freeze`)."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ClipConditioner(Conditioner):
    """A CLIP text encoder: ``encoder_hidden_states`` = last hidden state (padded to max length)."""

    def __init__(self, tokenizer: Any, text_encoder: Any, placeholder: str = DEFAULT_PLACEHOLDER) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        super().__init__(tokenizer, text_encoder.get_input_embeddings(), placeholder)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def unconditional(self, n: int) -> dict[str, torch.Tensor]:
        return self.encode([""] * n)

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder]


class MiniConditioner(Conditioner):
    """The ``dprdm-mini`` text tower (MiniLM + head) feeding an RDM UNet's retrieval tokens."""

    def __init__(self, encoder: Any, generator: Any, placeholder: str = DEFAULT_PLACEHOLDER) -> None:
        self.encoder, self.generator = encoder, generator
        tower = encoder.text_tower
        super().__init__(tower.tokenizer, tower.model.get_input_embeddings(), placeholder)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tower = self.encoder.text_tower
        tok = tower.tokenizer(prompts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = tower.model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
        return self._tokens(self.encoder.model.text(pooled))

    def _tokens(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.generator.config
        if cfg.normalize_tokens:
            c = F.normalize(c, dim=-1)
        tokens = (c * cfg.token_scale)[:, None, :].expand(-1, cfg.k, -1)
        return self.generator.unet_inputs(tokens)

    def unconditional(self, n: int) -> dict[str, torch.Tensor]:
        cfg = self.generator.config
        return self.generator.unet_inputs(torch.zeros(n, cfg.k, cfg.dim))

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder.model, self.encoder.text_tower.model]


@dataclass
class Backbone:
    """A frozen text-conditioned diffusion model.

    Attributes:
        unet: the diffusers ``UNet2DConditionModel`` (fine-tuned in place by DP-LDM/DP-LoRA).
        scheduler: the sampling scheduler; its config also defines the training noise schedule.
        conditioner: prompts -> UNet kwargs.
        vae: ``AutoencoderKL`` for latent models, ``None`` for pixel space.
        source: how to reload it (``{"type": "diffusers"|"bundle", "path": ...}``).
        guidance_scale: default classifier-free guidance weight.
    """

    unet: Any
    scheduler: Any
    conditioner: Conditioner
    vae: Any | None
    source: dict[str, str]
    guidance_scale: float = 1.0

    def freeze(self) -> None:
        """Set every weight of the UNet, text model and VAE to ``requires_grad=False``."""
        for module in [self.unet, self.vae, *self.conditioner.modules()]:
            if module is not None:
                module.requires_grad_(False)

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> what the UNet denoises (VAE latent mean, or the pixels)."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @property
    def image_size(self) -> int:
        """Side of the images the model works with, in pixels."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return int(self.unet.config.sample_size) * factor

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, steps: int, generator: torch.Generator,
               guidance_scale: float | None = None, inject: torch.Tensor | None = None) -> list[Image.Image]:
        """Generate one image per prompt (DDIM-style loop of the backbone's scheduler).

        Raises:
            ValueError: on bad ``steps``/``guidance_scale`` or a prompt without the placeholder.
        """
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise ValueError(f"steps must be an int in [1, 1000]; found {steps!r}")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if not g >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1; found {guidance_scale!r}")
        n = len(prompts)
        cond = self.conditioner.encode(prompts, inject)
        if g > 1.0:
            un = self.conditioner.unconditional(n)
            cond = {k: torch.cat([un[k], v]) for k, v in cond.items()}
        cfg = self.unet.config
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]) if g > 1.0 else x, t)
            pred = self.unet(x_in, t, **cond).sample
            if g > 1.0:
                u, c = pred.chunk(2)
                pred = u + g * (c - u)
            x = sched.step(pred, t, x, generator=generator).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a, "RGB") for a in arr]


def diffusion_loss(unet: Any, scheduler: Any, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                   generator: torch.Generator) -> torch.Tensor:
    """Per-row denoising loss: random t and noise, MSE against the scheduler's target.

    Args:
        unet: the (possibly Opacus-wrapped) UNet.
        scheduler: a diffusers scheduler with ``add_noise``/``get_velocity`` and ``alphas_cumprod``.
        x0: ``(b, c, h, w)`` clean model-space inputs.
        cond: UNet keyword arguments with batch ``b``.
        generator: drives t and the diffusion noise (training randomness, not DP noise).

    Returns:
        ``(b,)`` losses.
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    xt = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    target = scheduler.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon' or 'v_prediction'")
    pred = unet(xt, t, **cond).sample
    return ((pred.float() - target) ** 2).flatten(1).mean(1)


def load_backbone(spec: str | Path, placeholder: str = DEFAULT_PLACEHOLDER) -> Backbone:
    """Load a backbone from a diffusers directory or ``bundle:NAME_OR_PATH``.

    Raises:
        FileNotFoundError: naming a missing directory or component.
        ValueError: on an unsupported component or placeholder.
    """
    text = str(spec)
    if text.startswith(BUNDLE_PREFIX):
        return _load_bundle(text[len(BUNDLE_PREFIX):], placeholder)
    return _load_diffusers(Path(text), placeholder)


def _load_diffusers(d: Path, placeholder: str) -> Backbone:
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    for rel in ("unet/config.json", "scheduler/scheduler_config.json", "text_encoder", "tokenizer"):
        if not (d / rel).exists():
            raise FileNotFoundError(f"model directory {d} lacks {rel} (diffusers save_pretrained layout expected)")
    sched_cfg = json.loads((d / "scheduler/scheduler_config.json").read_text())
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if sched_cls is None:
        raise ValueError(f"unknown scheduler class {sched_cfg.get('_class_name')!r} in {d / 'scheduler'}")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(d / "unet"), local_files_only=True).eval()
    vae = None
    if (d / "vae").is_dir():
        vae = diffusers.AutoencoderKL.from_pretrained(str(d / "vae"), local_files_only=True).eval()
    cond = ClipConditioner(CLIPTokenizer.from_pretrained(str(d / "tokenizer")),
                           CLIPTextModel.from_pretrained(str(d / "text_encoder"), local_files_only=True), placeholder)
    bb = Backbone(unet=unet, scheduler=sched_cls.from_pretrained(str(d / "scheduler")), conditioner=cond, vae=vae,
                  source={"type": "diffusers", "path": str(d.resolve())})
    bb.freeze()
    return bb


def _load_bundle(name: str, placeholder: str) -> Backbone:
    from dprdm.models.registry import load_bundle

    bundle = load_bundle(name)
    gen = bundle.generator
    if not hasattr(gen, "unet_inputs") or not hasattr(bundle.encoder, "text_tower"):
        raise ValueError(f"bundle {name!r}: baselines need an RDM generator and a dprdm-mini style text tower")
    gen.unet.float()
    bb = Backbone(unet=gen.unet, scheduler=gen.scheduler, conditioner=MiniConditioner(bundle.encoder, gen, placeholder),
                  vae=gen.vae, source={"type": "bundle", "path": name}, guidance_scale=gen.config.guidance_scale)
    bb.freeze()
    return bb
