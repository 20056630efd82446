"""Tiny random text-conditioned backbones built from config (tests and smoke benchmarks; nothing downloads).

Follows diffusers' fast tests: ``block_out_channels=(4, 8)`` UNets with cross-attention, a 2-layer
CLIP text model and the byte-level tokenizer of :func:`dprdm.models.testing.tiny_clip_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["write_tiny_backbone"]


def write_tiny_backbone(directory: str | Path, *, size: int = 8, latent: bool = False, hidden: int = 32,
                        channels: tuple[int, int] = (4, 8), prediction_type: str = "epsilon") -> Path:
    """Write a random backbone in the diffusers layout :func:`~dprdm.baselines.backbone.load_backbone` reads.

    Args:
        directory: output folder.
        size: image side in pixels (latent models: the VAE halves it once).
        latent: add a tiny ``AutoencoderKL`` (latent space) instead of pixel space.
        hidden: text hidden size = cross-attention dimension.
        channels: UNet ``block_out_channels``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.

    Returns:
        The directory.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dprdm.models.testing import tiny_clip_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    in_ch = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=size // 2 if latent else size, in_channels=in_ch, out_channels=in_ch,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=2, cross_attention_dim=hidden,
        attention_head_dim=2,
    )
    unet.save_pretrained(str(d / "unet"))
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type=prediction_type,
                  set_alpha_to_one=True).save_pretrained(str(d / "scheduler"))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37,
                                 layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                                 vocab_size=1000, projection_dim=hidden, max_position_embeddings=77)
                  ).save_pretrained(str(d / "text_encoder"))
    tiny_clip_tokenizer(d / "_tokenizer_src").save_pretrained(str(d / "tokenizer"))
    if latent:
        torch.manual_seed(0)
        AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      norm_num_groups=2).save_pretrained(str(d / "vae"))
    return d
