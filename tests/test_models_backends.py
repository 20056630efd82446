"""Generator backends with tiny random diffusers models: shapes, determinism, conditioning matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprdm.models import testing
from dprdm.models.base import Generator
from dprdm.models.pipelines import IPAdapterGenerator, KandinskyGenerator, UnCLIPGenerator
from dprdm.models.rdm import RDMGenerator, expand_tokens, mix_tokens

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _arr(images):
    return np.stack([np.asarray(im, np.int16) for im in images])


def _check_backend(gen: Generator, size: int, prompt: str = "a red circle") -> None:
    rng = np.random.default_rng(0)
    c1 = rng.standard_normal(gen.conditioning_dimension).astype(np.float32)
    c2 = rng.standard_normal(gen.conditioning_dimension).astype(np.float32)
    calls: list[tuple[int, int]] = []
    a = gen.generate(c1, prompt, n=2, steps=2, seed=7, progress=lambda i, t: calls.append((i, t)))
    assert len(a) == 2 and all(im.size == (size, size) and im.mode == "RGB" for im in a)
    assert calls[-1] == (2, 2)
    b = gen.generate(c1, prompt, n=2, steps=2, seed=7)
    assert np.array_equal(_arr(a), _arr(b)), "same seed and conditioning must give the same images"
    c = gen.generate(c2, prompt, n=2, steps=2, seed=7)
    assert np.abs(_arr(a) - _arr(c)).max() > 0, "the conditioning must change the output"
    d = gen.generate(c1, prompt, n=2, steps=2, seed=8)
    assert np.abs(_arr(a) - _arr(d)).max() > 0, "the seed must change the output"


def test_rdm_pixel_roundtrip_and_behaviour(tmp_path):
    gen = testing.tiny_rdm_generator(dim=16, k=3)
    assert isinstance(gen, Generator)
    _check_backend(gen, 16)
    gen.save(tmp_path / "rdm")
    again = RDMGenerator.load(tmp_path / "rdm", device=CPU)
    c = np.linspace(-1, 1, 16, dtype=np.float32)
    assert np.array_equal(_arr(gen.generate(c, "", 1, 2, 3)), _arr(again.generate(c, "", 1, 2, 3)))
    gen.save_packed(tmp_path / "packed" / "dec.json")
    packed = RDMGenerator.load_packed(tmp_path / "packed" / "dec.json", device=CPU)
    assert np.array_equal(_arr(gen.generate(c, "", 1, 2, 3)), _arr(packed.generate(c, "", 1, 2, 3)))


def test_rdm_latent_with_vae():
    gen = testing.tiny_rdm_generator(dim=8, k=2, latent=True)
    _check_backend(gen, 16)


def test_rdm_ignores_prompt_and_accepts_token_matrix():
    gen = testing.tiny_rdm_generator(dim=16, k=3)
    c = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    a = gen.generate(c, "a red circle", 1, 2, 0)
    b = gen.generate(c, "something else", 1, 2, 0)
    assert np.array_equal(_arr(a), _arr(b))
    tokens = np.repeat(c[None], 3, axis=0)
    assert np.array_equal(_arr(gen.generate(tokens, "", 1, 2, 0)), _arr(a))
    u = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    mixed = mix_tokens(c, u, 0.5)
    assert mixed.shape == (3, 16)
    assert np.allclose(mix_tokens(c, u, 1.0), np.repeat(c[None], 3, 0))
    assert np.abs(_arr(gen.generate(mixed, "", 1, 2, 0)) - _arr(a)).max() > 0


@pytest.mark.parametrize(
    ("conditioning", "n", "steps", "seed", "match"),
    [
        (np.zeros(15, np.float32), 1, 2, 0, r"shape \(16,\) or \(3, 16\)"),
        (np.full(16, np.nan, np.float32), 1, 2, 0, "non-finite"),
        (np.ones(16, np.float32), 0, 2, 0, "n must be"),
        (np.ones(16, np.float32), 1, 0, 0, "steps must be"),
        (np.ones(16, np.float32), 1, 2, -1, "seed must be"),
    ],
)
def test_rdm_rejects_bad_requests(conditioning, n, steps, seed, match):
    gen = testing.tiny_rdm_generator(dim=16, k=3)
    with pytest.raises(ValueError, match=match):
        gen.generate(conditioning, "", n, steps, seed)


def test_token_helpers_validate():
    with pytest.raises(ValueError, match="lam must be in"):
        mix_tokens(np.zeros(4), np.zeros((2, 4)), 1.5)
    with pytest.raises(ValueError, match="need noisy_mean"):
        mix_tokens(np.zeros(4), np.zeros((2, 5)), 0.5)
    assert expand_tokens(np.ones(4), 2, 4).shape == (2, 4)


def test_rdm_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="rdm_config.json"):
        RDMGenerator.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="dec.json"):
        RDMGenerator.load_packed(tmp_path / "dec.json")


def test_stable_unclip_from_pretrained(tmp_path):
    pipe = testing.tiny_unclip_pipeline(tmp_path, dim=32)
    pipe.save_pretrained(tmp_path / "unclip")
    gen = UnCLIPGenerator.load(tmp_path / "unclip", guidance_scale=2.0, size=32, device=CPU)
    assert gen.conditioning_dimension == 32
    _check_backend(gen, 32)


def test_kandinsky_decoder_from_pretrained(tmp_path):
    testing.tiny_kandinsky_pipeline(dim=24).save_pretrained(tmp_path / "k22")
    gen = KandinskyGenerator.load(tmp_path / "k22", guidance_scale=4.0, size=64, device=CPU)
    assert gen.conditioning_dimension == 24
    _check_backend(gen, 64)


def test_sd_ip_adapter_from_pretrained(tmp_path):
    pipe = testing.tiny_sd_ip_adapter_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "sd")
    weights = testing.write_ip_adapter_weights(
        pipe.unet, tmp_path / "ip" / "ip-adapter.safetensors", image_embed_dim=16
    )
    gen = IPAdapterGenerator.load(tmp_path / "sd", weights, guidance_scale=2.0, size=32, device=CPU)
    assert gen.conditioning_dimension == 16
    _check_backend(gen, 32)


def test_pipelines_name_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        UnCLIPGenerator.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        KandinskyGenerator.load(tmp_path / "nope")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="IP-Adapter weights not found"):
        IPAdapterGenerator.load(tmp_path / "sd", tmp_path / "missing.safetensors")
