"""Tiny random models built from config, for tests (ours and other packages'). Nothing downloads.

Follows diffusers' own fast tests: ``block_out_channels=(4, 8)``-sized UNets, seeded construction.
The torch-free fake encoder of the server and index tests is :class:`dprdm.models.fake.FakeEncoder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "tiny_clip_tokenizer",
    "tiny_rdm_generator",
    "tiny_unclip_pipeline",
    "tiny_kandinsky_pipeline",
    "tiny_sd_ip_adapter_pipeline",
    "write_ip_adapter_weights",
    "tiny_open_clip_config",
    "write_tiny_open_clip",
    "tiny_clip_vision",
    "MirrorEncoder",
]


def tiny_clip_tokenizer(directory: str | Path) -> Any:
    """A byte-level CLIP tokenizer with no merges (vocab 514), written to ``directory`` and loaded."""
    from transformers import CLIPTokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table (printable bytes map to themselves)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep, strict=True)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def _tiny_text_encoder(hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=hidden,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
            projection_dim=hidden,
        )
    ).eval()


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2,
    ).eval()


def tiny_rdm_generator(dim: int = 16, k: int = 3, guidance_scale: float = 2.0, latent: bool = False) -> Any:
    """A random pixel- (or latent-) space :class:`~dprdm.models.rdm.RDMGenerator` with 16x16 output."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from .rdm import RDMConfig, RDMGenerator

    torch.manual_seed(0)
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=8 if latent else 16,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        cross_attention_dim=dim,
        attention_head_dim=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=dim,
    )
    sched = DDIMScheduler(
        prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    cfg = RDMConfig(dim=dim, k=k, token_scale=4.0, guidance_scale=guidance_scale, pooled_class_embedding=True)
    return RDMGenerator(unet, sched, cfg, vae=_tiny_vae() if latent else None, device=torch.device("cpu"))


def tiny_unclip_pipeline(tmp: str | Path, dim: int = 32) -> Any:
    """A random ``StableUnCLIPImg2ImgPipeline`` (32x32 images, image embeddings of ``dim``)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    image_encoder, feature_extractor = tiny_clip_vision(dim)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(4, 8),
        attention_head_dim=2,
        norm_num_groups=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=dim * 2,
        cross_attention_dim=32,
        layers_per_block=1,
        upcast_attention=True,
        use_linear_projection=True,
    ).eval()
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=dim).eval(),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tiny_clip_tokenizer(Path(tmp) / "tokenizer_src"),
        text_encoder=_tiny_text_encoder(),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        vae=_tiny_vae(),
    )


def tiny_kandinsky_pipeline(dim: int = 32) -> Any:
    """A random ``KandinskyV22Pipeline`` (64x64 images, image embeddings of ``dim``)."""
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=dim,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    ).eval()
    torch.manual_seed(0)
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    ).eval()
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return KandinskyV22Pipeline(unet=unet, scheduler=sched, movq=movq)


def tiny_sd_ip_adapter_pipeline(tmp: str | Path) -> Any:
    """A random ``StableDiffusionPipeline`` (add IP-Adapter weights with :func:`write_ip_adapter_weights`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        cross_attention_dim=32,
        attention_head_dim=2,
    ).eval()
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=tiny_clip_tokenizer(Path(tmp) / "tokenizer_src"),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def write_ip_adapter_weights(unet: Any, path: str | Path, image_embed_dim: int = 16) -> Path:
    """Write random IP-Adapter weights for ``unet`` (original format: ``image_proj.*``, ``ip_adapter.*``)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    key_id = 1
    cross = unet.config.cross_attention_dim
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0).state_dict()
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
        key_id += 2
    proj = ImageProjection(
        cross_attention_dim=cross, image_embed_dim=image_embed_dim, num_image_text_embeds=4
    )
    psd = proj.state_dict()
    state.update(
        {
            "image_proj.proj.weight": psd["image_embeds.weight"],
            "image_proj.proj.bias": psd["image_embeds.bias"],
            "image_proj.norm.weight": psd["norm.weight"],
            "image_proj.norm.bias": psd["norm.bias"],
        }
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    return p


def tiny_open_clip_config(dim: int = 16) -> dict[str, Any]:
    """``model_cfg`` of a tiny open_clip CLIP (32px ViT, 1-layer text transformer)."""
    return {
        "embed_dim": dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def write_tiny_open_clip(directory: str | Path, dim: int = 16, seed: int = 0) -> Path:
    """A random tiny open_clip CLIP (:func:`tiny_open_clip_config`) written as a local directory
    (``open_clip:local-dir:<directory>``); returns ``directory``."""
    import open_clip

    from .openclip_encoder import write_local_dir

    cfg = tiny_open_clip_config(dim=dim)
    torch.manual_seed(seed)
    write_local_dir(open_clip.CLIP(**cfg), cfg, Path(directory))
    return Path(directory)


def tiny_clip_vision(dim: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """A random ``CLIPVisionModelWithProjection`` (32px, projection ``dim``) and its ``CLIPImageProcessor``.

    The image encoder of the tiny unCLIP; saved with ``save_pretrained`` it is also a Kandinsky 2.2
    prior's or an IP-Adapter's ``image_encoder/`` folder.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=dim,
            projection_dim=dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            intermediate_size=37,
            patch_size=4,
        )
    ).eval()
    return model, CLIPImageProcessor(crop_size=32, size=32)


class MirrorEncoder:
    """An :class:`~dprdm.models.base.Encoder` whose image tower IS a pipeline's own image encoder.

    ``encode_images`` returns the reference's ``image_embeds`` made unit; texts are hashed (tests only).
    The ideal pairing: it agrees with the pipeline's encoder exactly.
    """

    def __init__(self, reference: Any) -> None:
        import hashlib

        from .base import EncoderIdentity

        self.reference = reference
        h = hashlib.sha256()
        for name, t in sorted(reference.image_encoder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        self._identity = EncoderIdentity("mirror:clip-vision", h.hexdigest(), reference.dimension)

    @property
    def identity(self) -> Any:
        return self._identity

    @property
    def dimension(self) -> int:
        return self._identity.dimension

    def encode_images(self, images: Any) -> Any:
        e = self.reference.embed(images)
        return (e / e.norm(dim=-1, keepdim=True)).numpy().astype("float32")

    def encode_texts(self, texts: Any) -> Any:
        from .fake import FakeEncoder

        return FakeEncoder(self.dimension).encode_texts(texts)
