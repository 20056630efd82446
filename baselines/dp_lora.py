"""DP-LoRA (Tsai et al. 2024): LoRA adapters on the attention projections, trained with DP-SGD.

Adapters (``peft``) go on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attention module
of the UNet (optionally only at depth >= ``from_depth``, see :mod:`dp_ldm`); the base weights
stay frozen. ``lora_B`` starts at zero, so the adapted model equals the base model before
training. Opacus computes per-sample gradients of the adapters' ``nn.Linear`` layers.

Noise multiplicity m: each example's loss is the mean over m independent (t, noise) draws,
averaged BEFORE clipping (:func:`dprdm.baselines.dpsgd.fold_multiplicity`): one example, one
clipped gradient, accounted as one record. The authors' code clips each copy separately, so one
example moves the sum by up to m C while being accounted at C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .backbone import Backbone
from .data import ImageSet
from .dp_ldm import block_depth, make_loss
from .dpsgd import ChargeFn, DPSGDConfig, DPSGDResult, train_dpsgd

__all__ = ["LoraSettings", "attention_projection_names", "add_lora", "lora_state", "load_lora", "train_dp_lora"]

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scale numerator (``alpha``; scaling = alpha / rank) and the minimum UNet depth."""

    rank: int = 4
    alpha: float = 4.0
    from_depth: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1; found {self.rank!r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"LoRA alpha must be > 0; found {self.alpha!r}")
        if not isinstance(self.from_depth, int) or self.from_depth < 0:
            raise ValueError(f"from_depth must be an integer >= 0; found {self.from_depth!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def attention_projection_names(unet: torch.nn.Module, from_depth: int = 0) -> list[str]:
    """Full names of the attention projections (``nn.Linear``) at UNet depth >= ``from_depth``."""
    from diffusers.models.attention_processor import Attention

    n_down = len(unet.down_blocks)
    out = []
    for name, module in unet.named_modules():
        depth = block_depth(name, n_down)
        if isinstance(module, Attention) and depth is not None and depth >= from_depth:
            for proj in PROJECTIONS:
                sub = module.get_submodule(proj)
                if isinstance(sub, torch.nn.Linear):
                    out.append(f"{name}.{proj}")
    return out


def add_lora(unet: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze ``unet``, inject LoRA adapters on the attention projections; returns trainable names.

    Raises:
        ValueError: if no attention projection exists at ``settings.from_depth`` or deeper.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = attention_projection_names(unet, settings.from_depth)
    if not targets:
        raise ValueError(f"no attention projection at depth >= {settings.from_depth}")
    unet.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, init_lora_weights=True,
                        target_modules=targets)
    inject_adapter_in_model(config, unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights (``lora_`` parameters), detached fp32 copies."""
    return {n: p.detach().float().contiguous().clone() for n, p in unet.named_parameters() if "lora_" in n}


def load_lora(unet: torch.nn.Module, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
    """Inject adapters per ``settings`` and load ``state`` (from :func:`lora_state`).

    Raises:
        ValueError: if the state's keys differ from the injected adapters'.
    """
    add_lora(unet, settings)
    unet.requires_grad_(False)
    expected = {n for n, _ in unet.named_parameters() if "lora_" in n}
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)[:3]
        raise ValueError(f"LoRA weights do not match the model's adapters (e.g. {diff})")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def train_dp_lora(backbone: Backbone, data: ImageSet, config: DPSGDConfig, settings: LoraSettings, *, seed: int = 0,
                  rng: np.random.Generator | None = None, production: bool = True,
                  log: Callable[[str], None] | None = None,
                  charge: ChargeFn | None = None) -> tuple[DPSGDResult, list[str]]:
    """Add LoRA adapters to ``backbone.unet`` and train them with DP-SGD (``config.multiplicity`` = m).

    Args:
        backbone: the frozen model (adapters are injected into its UNet).
        data: the private records.
        config: DP-SGD settings, target (epsilon, delta) and noise multiplicity.
        settings: LoRA rank, alpha and minimum depth.
        seed: training randomness (t, diffusion noise); not DP noise.
        rng: DP generator (default: fresh ChaCha20).
        production: refuse a non-CSPRNG ``rng``.
        log: progress callback (public facts only).
        charge: charges the ledger before any private record is read (:data:`~dprdm.baselines.dpsgd.ChargeFn`).

    Returns:
        The DP-SGD result and the names of the adapter parameters.

    Raises:
        ValueError: naming a bad setting or budget.
    """
    names = add_lora(backbone.unet, settings)
    backbone.unet.train()
    try:
        result = train_dpsgd(backbone.unet, make_loss(backbone, data, seed), len(data), config, method="dp-lora",
                             rng=rng, production=production, log=log, charge=charge)
    finally:
        backbone.unet.eval().requires_grad_(False)
    return result, names
