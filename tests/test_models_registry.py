"""The bundle registry: named JSON bundles, encoder specs, and refusal of mismatched pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dprdm.models import registry, testing
from dprdm.models.base import EncoderIdentity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    testing.write_tiny_open_clip(root / "clip", dim=16)
    enc = registry.load_encoder(f"open_clip:local-dir:{root / 'clip'}")
    gen = testing.tiny_rdm_generator(dim=16, k=2)
    gen.expected_encoder = enc.identity
    gen.save_packed(root / "dec.json")
    gen.expected_encoder = EncoderIdentity("open_clip:other", "f" * 64, 16)
    gen.save_packed(root / "wrong.json")
    return root, enc.identity


def _write(path, **fields):
    path.write_text(json.dumps(fields))
    return path


def test_load_bundle_by_path_and_name(parts, tmp_path, monkeypatch):
    root, ident = parts
    f = _write(
        root / "tiny-pair.json",
        name="tiny-pair",
        description="test",
        encoder="open_clip:local-dir:clip",
        generator={"type": "rdm-packed", "path": "dec.json"},
        encoder_identity=ident.to_dict(),
    )
    bundle = registry.load_bundle(f)
    assert bundle.name == "tiny-pair"
    assert bundle.encoder.identity == ident
    u = bundle.encoder.encode_texts(["a red circle"])[0]
    images = bundle.generator.generate(u, "a red circle", n=1, steps=2, seed=0)
    assert images[0].size == (16, 16)
    bundle.check_index(ident)
    with pytest.raises(registry.BundleMismatchError, match="index vs bundle 'tiny-pair'"):
        bundle.check_index(EncoderIdentity("open_clip:other", ident.weights_sha256, 16))
    monkeypatch.setenv("DPRDM_BUNDLE_PATH", str(root))
    with pytest.warns(UserWarning, match="skipping .*dec.json"):  # packed model configs are not bundles
        names = [b.name for b in registry.list_bundles()]
    assert "tiny-pair" in names
    assert registry.load_bundle("tiny-pair").encoder.identity == ident


def test_generator_declared_identity_mismatch_is_refused(parts):
    root, _ = parts
    f = _write(
        root / "bad.json",
        name="bad",
        encoder="open_clip:local-dir:clip",
        generator={"type": "rdm-packed", "path": "wrong.json"},
    )
    with pytest.raises(registry.BundleMismatchError, match="generator of bundle 'bad'"):
        registry.load_bundle(f)


def test_bundle_declared_identity_mismatch_is_refused(parts):
    root, ident = parts
    other = EncoderIdentity(ident.name, "0" * 64, ident.dimension)
    f = _write(
        root / "bad2.json",
        name="bad2",
        encoder="open_clip:local-dir:clip",
        generator={"type": "rdm-packed", "path": "dec.json"},
        encoder_identity=other.to_dict(),
    )
    with pytest.raises(registry.BundleMismatchError, match="bundle 'bad2' declaration"):
        registry.load_bundle(f)


def test_dimension_mismatch_is_refused(parts, tmp_path):
    root, _ = parts
    testing.tiny_rdm_generator(dim=8, k=2).save_packed(tmp_path / "dec8.json")
    f = _write(
        tmp_path / "dim.json",
        name="dim",
        encoder=f"open_clip:local-dir:{root / 'clip'}",
        generator={"type": "rdm-packed", "path": "dec8.json"},
    )
    with pytest.raises(
        registry.BundleMismatchError, match="encoder dimension 16 != generator conditioning dimension 8"
    ):
        registry.load_bundle(f)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"name": "x", "encoder": "dprdm-mini"}, ValueError, "missing field 'generator'"),
        (
            {"name": "x", "encoder": "e", "generator": {"type": "gan", "path": "p"}},
            ValueError,
            "generator.type",
        ),
    ],
)
def test_malformed_bundles(tmp_path, fields, error, match):
    with pytest.raises(error, match=match):
        registry.read_bundle(_write(tmp_path / "b.json", **fields))


def test_unknown_names_and_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown bundle 'nope'.*dprdm-mini"):
        registry.load_bundle("nope")
    with pytest.raises(ValueError, match="unknown encoder spec 'clip:ViT'"):
        registry.load_encoder("clip:ViT")
    with pytest.raises(FileNotFoundError, match="mini_encoder.json"):
        registry.load_encoder(f"dprdm-mini:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        registry.load_encoder(f"open_clip:ViT-B-32@{tmp_path / 'w.bin'}")
    with pytest.raises(ValueError, match="needs a 'path'"):
        registry.load_generator({"type": "rdm"})
    with pytest.raises(ValueError, match="needs 'ip_adapter'"):
        registry.load_generator({"type": "sd-ip-adapter", "path": str(tmp_path)})


def test_default_bundle_is_listed():
    names = [b.name for b in registry.list_bundles()]
    assert registry.DEFAULT_BUNDLE in names


def test_default_bundle_loads_and_generates():
    bundle = registry.load_bundle()
    assert bundle.encoder.identity.name == "dprdm-mini"
    assert bundle.generator.conditioning_dimension == bundle.encoder.dimension
    u = bundle.encoder.encode_texts(["a picture of a red circle"])[0]
    a = bundle.generator.generate(u, "", n=1, steps=2, seed=0)
    b = bundle.generator.generate(u, "", n=1, steps=2, seed=0)
    assert a[0].size == (24, 24)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
