"""Encoders: open_clip from local files or the offline HF cache (tiny model), MiniLM, FakeEncoder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dprdm.models import testing
from dprdm.models.base import Encoder, EncoderIdentity
from dprdm.models.fake import FakeEncoder
from dprdm.models.openclip_encoder import OpenClipEncoder, parse_source, resolve_hf_cache, write_local_dir

IMAGES = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    import open_clip

    cfg = testing.tiny_open_clip_config(dim=16)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    d = tmp_path_factory.mktemp("tinyclip")
    write_local_dir(model, cfg, d)
    return d


def _check_encoder(enc: Encoder, dim: int) -> None:
    assert isinstance(enc, Encoder)
    assert enc.dimension == dim == enc.identity.dimension
    img = enc.encode_images(IMAGES)
    txt = enc.encode_texts(["a red circle", "a blue square", "a red circle"])
    assert img.shape == (2, dim) and txt.shape == (3, dim)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert np.allclose(txt[0], txt[2]) and not np.allclose(txt[0], txt[1])
    assert not np.allclose(img[0], img[1])
    assert enc.encode_texts([]).shape == (0, dim)


def test_open_clip_local_dir(tiny_clip_dir):
    enc = OpenClipEncoder.load(f"local-dir:{tiny_clip_dir}", device=torch.device("cpu"))
    _check_encoder(enc, 16)
    assert enc.identity.name == f"open_clip:local-dir:{tiny_clip_dir.name}"
    assert len(enc.identity.weights_sha256) == 64


def test_open_clip_arch_and_checkpoint_file(tiny_clip_dir, tmp_path):
    import json

    import open_clip

    cfg_file = tmp_path / "TinyTestCLIP.json"
    cfg_file.write_text(json.dumps(testing.tiny_open_clip_config(dim=16)))
    open_clip.add_model_config(cfg_file)
    weights = tiny_clip_dir / "open_clip_model.safetensors"
    enc = OpenClipEncoder.load(f"TinyTestCLIP@{weights}", device=torch.device("cpu"))
    _check_encoder(enc, 16)
    same = OpenClipEncoder.load(f"local-dir:{tiny_clip_dir}", device=torch.device("cpu"))
    assert enc.identity.weights_sha256 == same.identity.weights_sha256
    assert np.allclose(enc.encode_texts(["x"]), same.encode_texts(["x"]), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        OpenClipEncoder.load(f"TinyTestCLIP@{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'NoSuchArch'"):
        OpenClipEncoder.load(f"NoSuchArch@{weights}")


def test_open_clip_offline_hf_cache(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_dir = tmp_path / "hub" / "models--someorg--tiny-clip"
    snap = repo_dir / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    (snap / "open_clip_config.json").write_bytes((tiny_clip_dir / "open_clip_config.json").read_bytes())
    with pytest.raises(
        FileNotFoundError, match="no checkpoint of hf-hub:someorg/tiny-clip.*open_clip_model.safetensors"
    ):
        resolve_hf_cache("someorg/tiny-clip", cache_dir=str(tmp_path / "hub"))
    (snap / "open_clip_model.safetensors").write_bytes(
        (tiny_clip_dir / "open_clip_model.safetensors").read_bytes()
    )
    assert resolve_hf_cache("someorg/tiny-clip", cache_dir=str(tmp_path / "hub")) == snap
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = OpenClipEncoder.load("hf-hub:someorg/tiny-clip", device=torch.device("cpu"))
    _check_encoder(enc, 16)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json of hf-hub:other/repo"):
        OpenClipEncoder.load("hf-hub:other/repo")


@pytest.mark.parametrize("bad", ["ViT-B-32", "ViT-B-32@", "hf-hub:noslash", "local-dir:", "@/x.bin"])
def test_open_clip_source_errors(bad):
    with pytest.raises(ValueError, match="open_clip source"):
        parse_source(bad)


def test_fake_encoder_is_an_encoder():
    _check_encoder(FakeEncoder(dimension=8), 8)


def test_fake_encoder_is_deterministic_torch_free_and_counts_batches():
    enc = FakeEncoder(8, name="fake-x")
    assert enc.identity == EncoderIdentity("fake-x", "0" * 64, 8) == FakeEncoder(8, "fake-x").identity
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    a = enc.encode_images([rgb, rgb.convert("RGBA"), rgb.resize((4, 2))])
    assert np.array_equal(a[0], a[1]) and not np.allclose(a[0], a[2])  # mode-independent, size-aware
    assert np.array_equal(FakeEncoder(8).encode_texts(["x"]), enc.encode_texts(["x"]))
    assert enc.calls == 2 and enc.encode_images([]).shape == (0, 8)
    with pytest.raises(ValueError, match="dimension must be >= 1; found 0"):
        FakeEncoder(0)
    code = "import sys, dprdm.models.fake; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout == "[]\n"


def test_minilm_text_tower_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dprdm.models.mini_encoder import MiniLMTextTower

    tower = MiniLMTextTower()
    emb = tower.embed(["a red circle", "a red disc", "a blue square on a brick wall"])
    assert emb.shape == (3, 384)
    sims = (emb @ emb.T).numpy()
    assert sims[0, 1] > sims[0, 2]
