"""Issue 16 items 3, 4 and 7: each pipeline receives what its own image path gives; encoder pairing;
half precision on CPU. Tiny random models built from config; nothing downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dprdm.models import registry, testing
from dprdm.models._torch import bf16_supported_on_cpu
from dprdm.models.conditioning import ClipVisionReference, mean_norm, pairing, probe_images
from dprdm.models.pipelines import IPAdapterGenerator, UnCLIPGenerator

CPU = torch.device("cpu")
IMAGE = Image.fromarray(
    (np.random.default_rng(3).random((40, 40, 3)) * 255).astype(np.uint8), "RGB"
)

pytestmark = pytest.mark.usefixtures("one_thread")


class _UNetInputs:
    """Records the keyword inputs of a UNet's first forward call."""

    def __init__(self, unet):
        self.seen: list[dict] = []
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.seen.append({"args": args, **kwargs})

    def take(self) -> dict:
        first = self.seen[0]
        self.seen.clear()
        return first

    def close(self):
        self._handle.remove()


def _release(reference: ClipVisionReference, image: Image.Image) -> tuple[np.ndarray, float]:
    """The unit vector a paired encoder releases for ``image`` and that image's own embedding norm."""
    e = reference.embed([image])[0]
    return (e / e.norm()).numpy(), float(e.norm())


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_unclip_receives_what_its_own_encode_image_gives(tmp_path):
    pipe = testing.tiny_unclip_pipeline(tmp_path, dim=32)
    gen = UnCLIPGenerator.from_pipeline(pipe, guidance_scale=2.0, size=32, device=CPU, noise_level=250)
    rec = _UNetInputs(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    pipe(image=IMAGE, prompt="a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
         noise_level=250, generator=torch.Generator().manual_seed(5), output_type="np")
    own = rec.take()["class_labels"]  # [zeros; image_normalizer-noised image_embeds ++ noise-level embedding]
    c, norm = _release(gen.reference, IMAGE)
    gen.embedding_scale = norm
    gen.generate(c, "a red circle", n=1, steps=2, seed=5)
    ours = rec.take()["class_labels"]
    rec.close()
    _close(ours, own)
    assert own.shape == (2, 64) and torch.count_nonzero(own[0]) == 0


def test_kandinsky_receives_the_prior_embeddings_and_its_zero_image_negative(tmp_path):
    from diffusers import KandinskyV22PriorPipeline

    vision, processor = testing.tiny_clip_vision(dim=24, seed=4)
    vision.save_pretrained(tmp_path / "prior" / "image_encoder")
    processor.save_pretrained(tmp_path / "prior" / "image_processor")
    testing.tiny_kandinsky_pipeline(dim=24).save_pretrained(tmp_path / "k22")
    # The prior's own path: image_encoder(image_processor(image)).image_embeds, negative get_zero_embed().
    px = processor(IMAGE, return_tensors="pt").pixel_values
    with torch.no_grad():
        own_pos = vision(px).image_embeds
        prior_like = type("P", (), {"image_encoder": vision, "device": CPU})()
        own_neg = KandinskyV22PriorPipeline.get_zero_embed(prior_like)
    gen = registry.load_generator(
        {"type": "kandinsky-2.2", "path": "k22", "image_encoder": "prior/image_encoder", "size": 64,
         "embedding_scale": 1.0}, tmp_path, device="cpu",
    )
    _close(torch.from_numpy(gen.negative)[None], own_neg)
    rec = _UNetInputs(gen.pipe.unet)
    gen.pipe(image_embeds=own_pos, negative_image_embeds=own_neg, num_inference_steps=2, guidance_scale=4.0,
             height=64, width=64, generator=torch.Generator().manual_seed(1), output_type="np")
    own = rec.take()["added_cond_kwargs"]["image_embeds"]
    c, norm = _release(gen.reference, IMAGE)
    gen.embedding_scale = norm
    gen.generate(c, "", n=1, steps=2, seed=1)
    ours = rec.take()["added_cond_kwargs"]["image_embeds"]
    rec.close()
    _close(ours, own)
    assert torch.count_nonzero(own[0]) > 0, "the negative is the zero image's embedding, not zeros"


def test_ip_adapter_receives_what_prepare_ip_adapter_image_embeds_gives(tmp_path):
    pipe = testing.tiny_sd_ip_adapter_pipeline(tmp_path)
    weights = testing.write_ip_adapter_weights(pipe.unet, tmp_path / "ip" / "ip.safetensors", image_embed_dim=16)
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None)
    vision, processor = testing.tiny_clip_vision(dim=16, seed=2)
    pipe.register_modules(image_encoder=vision, feature_extractor=processor)
    gen = IPAdapterGenerator.from_pipeline(pipe, guidance_scale=2.0, size=32, device=CPU)
    rec = _UNetInputs(pipe.unet)
    pipe(prompt="a red circle", ip_adapter_image=IMAGE, num_inference_steps=2, guidance_scale=2.0,
         height=32, width=32, generator=torch.Generator().manual_seed(9), output_type="np")
    own = rec.take()["added_cond_kwargs"]["image_embeds"]
    c, norm = _release(gen.reference, IMAGE)
    gen.embedding_scale = norm
    gen.generate(c, "a red circle", n=1, steps=2, seed=9)
    ours = rec.take()["added_cond_kwargs"]["image_embeds"]
    rec.close()
    assert len(ours) == len(own) == 1
    _close(ours[0], own[0])


def test_mean_norm_scale_is_measured_on_public_probe_images(tmp_path):
    pipe = testing.tiny_unclip_pipeline(tmp_path, dim=32)
    pipe.save_pretrained(tmp_path / "unclip")
    gen = registry.load_generator({"type": "stable-unclip", "path": "unclip", "noise_level": 3}, tmp_path,
                                  device="cpu")
    assert gen.noise_level == 3 and gen.embedding_scale_source.startswith("mean-norm")
    expected = float(gen.reference.embed(probe_images()).norm(dim=-1).mean())
    assert gen.embedding_scale == pytest.approx(expected) and gen.embedding_scale != pytest.approx(1.0)
    assert mean_norm(gen.reference) == pytest.approx(expected)
    testing.tiny_kandinsky_pipeline(dim=24).save_pretrained(tmp_path / "k22")
    with pytest.raises(ValueError, match="needs 'image_encoder'.*or 'negative_embedding'"):
        registry.load_generator({"type": "kandinsky-2.2", "path": "k22"}, tmp_path, device="cpu")
    np.save(tmp_path / "neg.npy", np.ones(24, np.float32))
    with pytest.raises(ValueError, match="no image encoder to measure 'mean-norm'"):
        registry.load_generator({"type": "kandinsky-2.2", "path": "k22", "negative_embedding": "neg.npy"},
                                tmp_path, device="cpu")
    k = registry.load_generator({"type": "kandinsky-2.2", "path": "k22", "negative_embedding": "neg.npy",
                                 "embedding_scale": 7.5}, tmp_path, device="cpu")
    assert k.embedding_scale == 7.5 and np.array_equal(k.negative, np.ones(24, np.float32))


@pytest.fixture(scope="module")
def unclip_bundle(tmp_path_factory):
    """A tiny open_clip encoder (dim 32) next to a tiny unCLIP whose own image encoder is unrelated."""
    root = tmp_path_factory.mktemp("pairing")
    testing.write_tiny_open_clip(root / "clip", dim=32)
    testing.tiny_unclip_pipeline(root, dim=32).save_pretrained(root / "unclip")
    f = root / "tiny-unclip.json"
    f.write_text(json.dumps({"name": "tiny-unclip", "encoder": "open_clip:local-dir:clip",
                             "generator": {"type": "stable-unclip", "path": "unclip", "size": 32}}))
    return f


def test_a_disagreeing_encoder_is_refused_with_one_line_naming_both(unclip_bundle):
    with pytest.raises(registry.BundleMismatchError) as err:
        registry.load_bundle(unclip_bundle, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "encoder open_clip:local-dir:clip and the image_encoder of" in msg and "unclip" in msg
    assert "disagree on 12 public images: mean cosine" in msg and "< 0.98; refusing the pair" in msg
    report = registry.load_bundle(unclip_bundle, device="cpu", refuse=False).checks
    assert [(c.name, c.ok) for c in report] == [("dimension", True), ("pairing", False)]


def test_the_pipelines_own_encoder_pairs_and_the_threshold_is_the_bundles(unclip_bundle, monkeypatch):
    from dprdm.models.conditioning import ClipVisionReference as Ref

    vision, processor = testing.tiny_clip_vision(dim=32)  # the tiny unCLIP's own image encoder
    mirror = testing.MirrorEncoder(Ref(vision, processor, "mirror"))
    r = pairing(mirror, Ref(vision, processor, "mirror"))
    assert r.mean_cosine > 0.9999 and r.images == 12
    monkeypatch.setattr(registry, "load_encoder", lambda *a, **k: mirror)
    bundle = registry.load_bundle(unclip_bundle, device="cpu")
    assert all(c.ok for c in bundle.checks) and "agree on 12 public images" in bundle.checks[-1].detail
    lax = unclip_bundle.parent / "lax.json"
    lax.write_text(json.dumps({**json.loads(unclip_bundle.read_text()), "name": "lax", "min_pairing_cosine": -1}))
    monkeypatch.undo()
    assert registry.load_bundle(lax, device="cpu").checks[-1].ok  # an operator's stated threshold


@pytest.mark.skipif(not bf16_supported_on_cpu(), reason="this torch has no bf16 CPU kernels")
def test_tiny_mirrors_run_in_bf16_on_cpu(tmp_path):
    import open_clip

    from dprdm.models.openclip_encoder import write_local_dir

    cfg = testing.tiny_open_clip_config(dim=16)
    torch.manual_seed(0)
    write_local_dir(open_clip.CLIP(**cfg), cfg, tmp_path / "clip")
    spec = f"open_clip:local-dir:{tmp_path / 'clip'}"
    half = registry.load_encoder(spec, device="cpu", dtype="bfloat16")
    full = registry.load_encoder(spec, device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.identity == full.identity
    imgs = probe_images()[:4]
    a, b = half.encode_images(imgs), full.encode_images(imgs)
    assert a.dtype == np.float32 and np.min(np.sum(a * b, axis=1)) > 0.99
    assert np.min(np.sum(half.encode_texts(["a red circle"]) * full.encode_texts(["a red circle"]))) > 0.99
    pipe = testing.tiny_unclip_pipeline(tmp_path, dim=32)
    pipe.save_pretrained(tmp_path / "unclip")
    testing.tiny_kandinsky_pipeline(dim=24).save_pretrained(tmp_path / "k22")
    vision, processor = testing.tiny_clip_vision(dim=24)
    vision.save_pretrained(tmp_path / "prior" / "image_encoder")
    gens = [
        UnCLIPGenerator.load(tmp_path / "unclip", guidance_scale=2.0, size=32, device=CPU, dtype="bfloat16"),
        registry.load_generator({"type": "kandinsky-2.2", "path": "k22", "image_encoder": "prior/image_encoder",
                                 "size": 32}, tmp_path, device="cpu", dtype="bfloat16"),
        testing.tiny_rdm_generator(dim=16),
    ]
    gens[2] = type(gens[2])(gens[2].unet, gens[2].scheduler, gens[2].config, device=CPU, dtype="bfloat16")
    for gen in gens:
        assert gen.dtype == torch.bfloat16
        c = np.random.default_rng(0).standard_normal(gen.conditioning_dimension).astype(np.float32)
        images = gen.generate(c / np.linalg.norm(c), "a red circle", n=1, steps=2, seed=0)
        assert images[0].mode == "RGB" and np.asarray(images[0]).std() > 0
    assert next(gens[1].reference.image_encoder.parameters()).dtype == torch.bfloat16
