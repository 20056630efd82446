"""Build an index with a tiny open_clip model made from config (random weights, no download)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from dprdm.index import BuildConfig, build_index, verify
from dprdm.index.readers import FolderReader
from dprdm.index.testing import write_image_folder
from dprdm.models.base import Encoder, EncoderIdentity, IdentityMixin

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

_TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class _TinyOpenClip(IdentityMixin):
    """Minimal adapter: open_clip model -> the Encoder protocol."""

    def __init__(self, tmp_path) -> None:
        cfg = tmp_path / "dprdm-index-tiny-clip.json"
        cfg.write_text(json.dumps(_TINY))
        open_clip.add_model_config(cfg)
        torch.manual_seed(0)
        self.model = open_clip.create_model("dprdm-index-tiny-clip", pretrained=None).eval()
        self.preprocess = open_clip.image_transform(32, is_train=False)
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
        self._identity = EncoderIdentity("open_clip:dprdm-index-tiny-clip", h.hexdigest(), _TINY["embed_dim"])

    def encode_images(self, images):
        with torch.no_grad():
            x = self.model.encode_image(torch.stack([self.preprocess(im) for im in images]), normalize=True)
        return x.numpy().astype(np.float32)

    def encode_texts(self, texts):
        tok = open_clip.get_tokenizer("dprdm-index-tiny-clip")
        with torch.no_grad():
            return self.model.encode_text(tok(list(texts)), normalize=True).numpy().astype(np.float32)


def test_build_with_tiny_open_clip(tmp_path):
    enc = _TinyOpenClip(tmp_path)
    assert isinstance(enc, Encoder)
    write_image_folder(tmp_path / "imgs", 10)
    res = build_index(FolderReader(tmp_path / "imgs"), enc,
                      BuildConfig(output=tmp_path / "idx", corpus_id="oc", public_size=16, progress=False,
                                  batch_size=4))
    idx = verify(res.path)
    assert idx.count == 10 and idx.encoder == enc.identity
    u = enc.encode_texts(["a photo"])[0]
    out = idx.search_subsampled(u, k=3, q=1.0, rng=np.random.default_rng(0))
    assert out.vectors.shape == (3, 24)
