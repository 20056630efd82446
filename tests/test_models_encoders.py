"""Encoders: open_clip from local files or the offline HF cache (tiny model), MiniLM, HashEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dprdm.models import testing
from dprdm.models.base import Encoder
from dprdm.models.openclip_encoder import OpenClipEncoder, parse_source, resolve_hf_cache, write_local_dir

IMAGES = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and steadiest on a shared CPU) single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_hash_encoder_is_an_encoder():
    _check_encoder(testing.HashEncoder(dimension=8), 8)


def test_minilm_text_tower_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dprdm.models.mini_encoder import MiniLMTextTower

    tower = MiniLMTextTower()
    emb = tower.embed(["a red circle", "a red disc", "a blue square on a brick wall"])
    assert emb.shape == (3, 384)
    sims = (emb @ emb.T).numpy()
    assert sims[0, 1] > sims[0, 2]
