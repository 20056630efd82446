"""DP-LDM (Lyu, Liu et al. 2023): DP-SGD fine-tuning of the attention modules only.

Every weight of the backbone is frozen except, in each ``BasicTransformerBlock``, the self-
attention ``attn1`` and the cross-attention ``attn2`` with the norms in front of them (``norm1``,
``norm2``), and any stand-alone ``Attention`` module (with its group norm). ``from_depth`` keeps
only blocks at UNet depth >= it: ``down_blocks.i`` is depth i, the mid block depth len(down),
``up_blocks.j`` depth len(down) + 1 + j. Loss: the scheduler's epsilon (or v) target.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .backbone import Backbone, diffusion_loss
from .data import ImageSet
from .dpsgd import ChargeFn, DPSGDConfig, DPSGDResult, LossFn, train_dpsgd

__all__ = ["block_depth", "select_attention_parameters", "make_loss", "train_dp_ldm"]


def block_depth(name: str, n_down: int) -> int | None:
    """UNet depth of the module named ``name`` (None outside the down/mid/up blocks)."""
    parts = name.split(".")
    if parts[0] == "down_blocks" and len(parts) > 1:
        return int(parts[1])
    if parts[0] == "mid_block":
        return n_down
    if parts[0] == "up_blocks" and len(parts) > 1:
        return n_down + 1 + int(parts[1])
    return None


def select_attention_parameters(unet: torch.nn.Module, from_depth: int = 0) -> list[str]:
    """Freeze ``unet`` and unfreeze the DP-LDM parameter set; returns the trainable names.

    Raises:
        ValueError: if ``from_depth`` is negative or no attention module is at that depth or deeper.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    if not isinstance(from_depth, int) or from_depth < 0:
        raise ValueError(f"from_depth must be an integer >= 0; found {from_depth!r}")
    unet.requires_grad_(False)
    n_down = len(unet.down_blocks)
    chosen: list[torch.nn.Module] = []
    in_blocks: set[int] = set()
    for name, module in unet.named_modules():
        depth = block_depth(name, n_down)
        if depth is None or depth < from_depth:
            continue
        if isinstance(module, BasicTransformerBlock):
            for attn, norm in (("attn1", "norm1"), ("attn2", "norm2")):
                if getattr(module, attn, None) is not None:
                    chosen += [getattr(module, attn), getattr(module, norm)]
                    in_blocks.add(id(getattr(module, attn)))
        elif isinstance(module, Attention) and id(module) not in in_blocks:
            chosen.append(module)
    if not chosen:
        raise ValueError(f"no attention module at depth >= {from_depth} (UNet depths 0..{2 * n_down})")
    for module in chosen:
        module.requires_grad_(True)
    return [n for n, p in unet.named_parameters() if p.requires_grad]


def make_loss(backbone: Backbone, data: ImageSet, seed: int) -> LossFn:
    """The per-record loss for DP-SGD: rows ``idx`` repeated ``m`` times, random (t, noise) per row.

    The images are mapped to model space once (frozen VAE); the text conditioning is computed
    without gradients (the text model is frozen).
    """
    x0_all = backbone.to_model_space(data.pixels)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor, m: int) -> torch.Tensor:
        rows = idx.repeat_interleave(m)
        with torch.no_grad():
            cond = backbone.conditioner.encode([data.captions[i] for i in rows.tolist()])
        return diffusion_loss(model, backbone.scheduler, x0_all[rows], cond, gen).mean()

    return loss_fn


def train_dp_ldm(backbone: Backbone, data: ImageSet, config: DPSGDConfig, *, from_depth: int = 0, seed: int = 0,
                 rng: np.random.Generator | None = None, production: bool = True,
                 log: Callable[[str], None] | None = None,
                 charge: ChargeFn | None = None) -> tuple[DPSGDResult, list[str]]:
    """Fine-tune the attention modules of ``backbone.unet`` in place with DP-SGD.

    Args:
        backbone: the frozen model (its UNet is modified).
        data: the private records.
        config: DP-SGD settings and target (epsilon, delta).
        from_depth: train only attention at UNet depth >= this.
        seed: training randomness (t, diffusion noise); not DP noise.
        rng: DP generator (default: fresh ChaCha20); see :func:`~dprdm.baselines.dpsgd.train_dpsgd`.
        production: refuse a non-CSPRNG ``rng``.
        log: progress callback (public facts only).
        charge: charges the ledger before any private record is read (:data:`~dprdm.baselines.dpsgd.ChargeFn`).

    Returns:
        The DP-SGD result (privacy report, losses) and the names of the trained parameters.

    Raises:
        ValueError: naming a bad setting or budget.
    """
    names = select_attention_parameters(backbone.unet, from_depth)
    backbone.unet.train()
    try:
        result = train_dpsgd(backbone.unet, make_loss(backbone, data, seed), len(data), config, method="dp-ldm",
                             rng=rng, production=production, log=log, charge=charge)
    finally:
        backbone.unet.eval().requires_grad_(False)
    return result, names
