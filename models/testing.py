"""Tiny random models built from config, for tests (ours and other packages'). Nothing downloads.

Follows diffusers' own fast tests: ``block_out_channels=(4, 8)``-sized UNets, seeded construction.
The torch-free fake encoder of the server and index tests is :class:`dprdm.models.fake.FakeEncoder`.

:func:`mirror_bundle` builds a tiny from-config MIRROR of an example bundle (``models/bundles/``):
the same pipeline class, conditioning path, encoder type and file layout, with random weights.

Size (~690 lines, over the ~400 guideline): the mirrors are built from the tiny pipelines above and
stay beside them, so one file holds every from-config model the tests use.
"""

from __future__ import annotations

import copy
import json
import zlib
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
    "PUBLISHED_IMAGE_ENCODERS",
    "EXAMPLE_BUNDLES",
    "MIRROR_SIZE",
    "open_clip_vision_facts",
    "tiny_mirror_open_clip_config",
    "open_clip_vision_to_hf",
    "mirror_bundle",
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


def tiny_unclip_pipeline(
    tmp: str | Path, dim: int = 32, *, image_encoder: Any = None, feature_extractor: Any = None
) -> Any:
    """A random ``StableUnCLIPImg2ImgPipeline`` (32x32 images, image embeddings of ``dim``).

    ``image_encoder``/``feature_extractor``: the pipeline's own CLIP image encoder and processor
    (default: :func:`tiny_clip_vision` of ``dim``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    if image_encoder is None:
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


# --- Tiny mirrors of the example bundles (issue 16 item 6) ------------------------------------------

EXAMPLE_BUNDLES = ("sd21-unclip-h", "sd21-unclip-l", "kandinsky-2.2-bigg", "sd15-ip-adapter-h")
"""The example bundles for real weights in ``models/bundles/`` (see ``models/README.md``)."""

MIRROR_SIZE = 32
"""Output size of a mirror whose example bundle fixes ``generator.size``."""

_H14 = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
}
PUBLISHED_IMAGE_ENCODERS: dict[str, dict[str, Any]] = {
    "sd21-unclip-h": {"config": "stabilityai/stable-diffusion-2-1-unclip: image_encoder/config.json", **_H14},
    "sd21-unclip-l": {
        "config": "stabilityai/stable-diffusion-2-1-unclip-small: image_encoder/config.json",
        "hidden_act": "quick_gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "projection_dim": 768,
    },
    "kandinsky-2.2-bigg": {
        "config": "kandinsky-community/kandinsky-2-2-prior: image_encoder/config.json",
        "hidden_act": "gelu",
        "hidden_size": 1664,
        "intermediate_size": 8192,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "projection_dim": 1280,
    },
    "sd15-ip-adapter-h": {"config": "h94/IP-Adapter: models/image_encoder/config.json", **_H14},
}
"""The CLIPVisionModelWithProjection config each example's pipeline ships as its own image encoder
(the fields that fix the architecture), as published in the ``config.json`` named by ``config``.
A mirror's pipeline image encoder uses its ``hidden_act``; the tests compare the rest with the
open_clip architecture the example bundle names (:func:`open_clip_vision_facts`)."""

_PLAIN_VIT_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}


def _plain_vit_config(arch: str) -> dict[str, Any]:
    """open_clip's config of ``arch``, refused unless it is a plain ViT CLIP the mirror can copy."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    extra = set(cfg["vision_cfg"]) - _PLAIN_VIT_KEYS
    if extra or set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}:
        raise ValueError(
            f"open_clip architecture {arch!r} is not a plain ViT CLIP (extra keys {sorted(extra)})"
        )
    return dict(cfg)


def open_clip_vision_facts(arch: str) -> dict[str, Any]:
    """An open_clip architecture's image tower in ``CLIPVisionConfig`` terms (as :data:`PUBLISHED_IMAGE_ENCODERS`).

    Raises:
        ValueError: unknown architecture, or not a plain ViT CLIP.
    """
    cfg = _plain_vit_config(arch)
    v = cfg["vision_cfg"]
    return {
        "hidden_act": "quick_gelu" if cfg.get("quick_gelu") else "gelu",
        "hidden_size": v["width"],
        "intermediate_size": int(v["width"] * v.get("mlp_ratio", 4.0)),
        "num_hidden_layers": v["layers"],
        "num_attention_heads": v["width"] // v.get("head_width", 64),
        "patch_size": v["patch_size"],
        "image_size": v["image_size"],
        "projection_dim": cfg["embed_dim"],
    }


def tiny_mirror_open_clip_config(arch: str) -> dict[str, Any]:
    """A tiny open_clip config mirroring ``arch``: its embedding dimension, activation (QuickGELU or
    GELU) and MLP ratio, with a 2-layer 32-wide ViT on 32px images and a 1-layer text tower."""
    cfg = _plain_vit_config(arch)
    tiny: dict[str, Any] = {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "mlp_ratio": cfg["vision_cfg"].get("mlp_ratio", 4.0),
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    if cfg.get("quick_gelu"):
        tiny["quick_gelu"] = True
    return tiny


def open_clip_vision_to_hf(model: Any, hidden_act: str) -> Any:
    """The image tower of an open_clip ViT ``CLIP`` as a ``CLIPVisionModelWithProjection`` (weights
    copied), the way the publishers converted ViT-H/14, ViT-L/14 and ViT-bigG/14 for their pipelines.

    ``hidden_act``: the converted model's activation (``"gelu"`` or ``"quick_gelu"``).

    Raises:
        ValueError: the tower is not a plain ViT (class-token pooling, ``nn.MultiheadAttention``).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vis = model.visual
    blocks = list(vis.transformer.resblocks)
    if (
        not isinstance(blocks[0].attn, torch.nn.MultiheadAttention)
        or getattr(vis, "pool_type", "tok") != "tok"
    ):
        raise ValueError(
            "open_clip_vision_to_hf needs a plain ViT (nn.MultiheadAttention, class-token pooling)"
        )
    width = vis.conv1.out_channels
    size = vis.image_size[0] if isinstance(vis.image_size, tuple) else vis.image_size
    hf = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=blocks[0].mlp.c_fc.out_features,
            num_hidden_layers=len(blocks),
            num_attention_heads=blocks[0].attn.num_heads,
            image_size=size,
            patch_size=vis.conv1.kernel_size[0],
            projection_dim=vis.proj.shape[1],
            hidden_act=hidden_act,
            layer_norm_eps=1e-5,
        )
    )
    src = vis.state_dict()
    out = {
        "vision_model.embeddings.class_embedding": src["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": src["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "vision_model.pre_layrnorm.weight": src["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": src["ln_pre.bias"],
        "vision_model.post_layernorm.weight": src["ln_post.weight"],
        "vision_model.post_layernorm.bias": src["ln_post.bias"],
        "visual_projection.weight": src["proj"].T,
    }
    for i in range(len(blocks)):
        a, b = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for proj, w, bias in zip(
            ("q", "k", "v"),
            src[a + "attn.in_proj_weight"].chunk(3),
            src[a + "attn.in_proj_bias"].chunk(3),
            strict=True,
        ):
            out[f"{b}self_attn.{proj}_proj.weight"], out[f"{b}self_attn.{proj}_proj.bias"] = w, bias
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{b}{theirs}.weight"], out[f"{b}{theirs}.bias"] = (
                src[f"{a}{ours}.weight"],
                src[f"{a}{ours}.bias"],
            )
    hf.load_state_dict({k: v.clone().contiguous() for k, v in out.items()}, strict=True)
    return hf.eval()


def _swap_root(value: Any, root: Path) -> Any:
    """``value`` with ``${DPRDM_MODELS}`` replaced by ``root`` in every string (recursively)."""
    if isinstance(value, str):
        return value.replace("${DPRDM_MODELS}", str(root))
    if isinstance(value, list):
        return [_swap_root(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _swap_root(v, root) for k, v in value.items()}
    return value


def _mirror_unclip(gen: dict[str, Any], vision: Any, processor: Any, dim: int, scratch: Path) -> None:
    pipe = tiny_unclip_pipeline(scratch, dim, image_encoder=vision, feature_extractor=processor)
    pipe.save_pretrained(gen["path"])


def _key(gen: dict[str, Any], key: str) -> str:
    if key not in gen:
        raise ValueError(f"a {gen.get('type')} example bundle needs generator.{key}; found {sorted(gen)}")
    return str(gen[key])


def _mirror_kandinsky(gen: dict[str, Any], vision: Any, processor: Any, dim: int, scratch: Path) -> None:
    tiny_kandinsky_pipeline(dim).save_pretrained(gen["path"])
    # the prior's layout: image_encoder/ beside image_processor/
    encoder_dir = Path(_key(gen, "image_encoder"))
    vision.save_pretrained(encoder_dir)
    processor.save_pretrained(encoder_dir.parent / "image_processor")


def _mirror_ip_adapter(gen: dict[str, Any], vision: Any, processor: Any, dim: int, scratch: Path) -> None:
    pipe = tiny_sd_ip_adapter_pipeline(scratch)
    pipe.save_pretrained(gen["path"])
    write_ip_adapter_weights(pipe.unet, _key(gen, "ip_adapter"), image_embed_dim=dim)
    vision.save_pretrained(_key(gen, "image_encoder"))  # h94's models/image_encoder/ has no processor config


_MIRROR_BUILDERS = {
    "stable-unclip": _mirror_unclip,
    "kandinsky-2.2": _mirror_kandinsky,
    "sd-ip-adapter": _mirror_ip_adapter,
}


def mirror_bundle(example: str, root: str | Path, *, mispair: bool = False) -> Path:
    """Build a tiny from-config mirror of the example bundle ``example`` under ``root``; return its JSON.

    The mirror is derived FROM the example's JSON: every file the example names under
    ``${DPRDM_MODELS}`` is written at the same place under ``root`` (the publishers' layout), by the
    same pipeline class, with the same conditioning keys. Its bundle file has exactly the example's
    keys; the values that differ: ``${DPRDM_MODELS}`` -> ``root``, the open_clip architecture ``A`` ->
    ``dprdm-mirror-A`` (:func:`tiny_mirror_open_clip_config`, registered with open_clip in this
    process), ``name`` -> ``<example>-mirror``, and a fixed ``generator.size`` -> :data:`MIRROR_SIZE`.

    The encoder is a random tiny open_clip model of the example's architecture family at the real
    embedding dimension; the pipeline's own image encoder is its image tower converted to
    ``CLIPVisionModelWithProjection`` (:func:`open_clip_vision_to_hf`, with the publisher's
    activation), so the pair passes the pairing check, as the real pair should. ``mispair=True``
    converts ANOTHER random tower instead (the check must refuse the pair). Several examples may
    share one ``root`` (the ViT-H/14 files are shared, as under a real models folder), but a
    mispaired mirror needs a root of its own.

    Raises:
        ValueError: an example whose encoder is not ``open_clip:ARCH@FILE`` or whose generator type
            has no mirror, naming it.
        FileNotFoundError: unknown example.
    """
    import open_clip
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    from .registry import BUNDLES_DIR

    src = BUNDLES_DIR / f"{example}.json"
    if not src.is_file() or example not in PUBLISHED_IMAGE_ENCODERS:
        raise FileNotFoundError(f"no example bundle {example!r}; examples: {list(EXAMPLE_BUNDLES)}")
    root = Path(root)
    example_doc = json.loads(src.read_text())
    doc = _swap_root(copy.deepcopy(example_doc), root)
    spec = str(example_doc["encoder"])
    arch, sep, ckpt = spec.removeprefix("open_clip:").partition("@")
    if not spec.startswith("open_clip:") or not sep or arch.startswith(("local-dir:", "hf-hub:")):
        raise ValueError(f"example {example!r}: encoder {spec!r} is not 'open_clip:ARCH@FILE'")
    gen = doc["generator"]
    if gen.get("type") not in _MIRROR_BUILDERS:
        raise ValueError(f"example {example!r}: generator type {gen.get('type')!r} has no mirror")
    tiny_arch, cfg = f"dprdm-mirror-{arch}", tiny_mirror_open_clip_config(arch)
    configs = root / ".open_clip_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{tiny_arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(configs / f"{tiny_arch}.json")
    seed = zlib.crc32(arch.encode())
    torch.manual_seed(seed)
    encoder = open_clip.CLIP(**cfg).eval()
    checkpoint = Path(_swap_root(ckpt, root))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(checkpoint))
    if mispair:
        torch.manual_seed(seed + 1)
        encoder = open_clip.CLIP(**cfg).eval()
    vision = open_clip_vision_to_hf(encoder, PUBLISHED_IMAGE_ENCODERS[example]["hidden_act"])
    size = cfg["vision_cfg"]["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    _MIRROR_BUILDERS[gen["type"]](
        gen, vision, processor, int(cfg["embed_dim"]), root / ".mirror-scratch" / example
    )
    doc["name"] = f"{example}-mirror"
    doc["encoder"] = f"open_clip:{tiny_arch}@{checkpoint}"
    if "size" in gen:
        gen["size"] = MIRROR_SIZE
    out = root / f"{example}-mirror{'-mispaired' if mispair else ''}.json"
    out.write_text(json.dumps(doc, indent=2))
    return out
