"""The dprdm-mini pieces: procedural data, encoder save/load, training CLI wiring, quality metrics."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from dprdm.models import mini_data as md
from dprdm.models.quality import frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")


def test_data_is_deterministic_and_well_formed():
    a = md.make_split(40, md.PUBLIC_STYLES, seed=5)
    b = md.make_split(40, md.PUBLIC_STYLES, seed=5)
    c = md.make_split(40, md.PUBLIC_STYLES, seed=6)
    assert a.images.shape == (40, 24, 24, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    assert a.labels.shape == (40, 4)


def test_private_style_is_a_new_combination_of_public_features():
    assert md.PRIVATE_STYLE not in md.PUBLIC_STYLES
    fills = {f for f, _ in md.PUBLIC_STYLES}
    backgrounds = {b for _, b in md.PUBLIC_STYLES}
    assert md.PRIVATE_STYLE[0] in fills and md.PRIVATE_STYLE[1] in backgrounds
    pub = md.make_split(300, md.PUBLIC_STYLES, seed=1)
    striped, dotted = md.FILLS.index("striped"), md.BACKGROUNDS.index("dotted")
    assert not np.any((pub.labels[:, 2] == striped) & (pub.labels[:, 3] == dotted))


def test_captions_and_prompts():
    attrs = md.Attributes(shape=0, colour=0, fill=1, background=2)
    assert md.caption(attrs) == "a red striped circle on a brick wall"
    assert md.caption(md.Attributes(1, 2, 0, 0)) == "a blue square"
    held = md.heldout_prompts()
    assert len(held) == 2 * len(md.SHAPES) * len(md.COLOURS)
    train_caps = {
        md.caption(md.Attributes(s, c, 0, 0), t) for s in range(4) for c in range(4) for t in (0, 1)
    }
    assert not train_caps & {p for p, _, _ in held}


@pytest.mark.parametrize(
    ("n", "styles", "match"),
    [(0, md.PUBLIC_STYLES, "n must be"), (3, (), "styles"), (3, (("wavy", "plain"),), "unknown style")],
)
def test_make_split_validates(n, styles, match):
    with pytest.raises(ValueError, match=match):
        md.make_split(n, styles, seed=0)


def test_mini_encoder_roundtrip(tmp_path):
    from dprdm.models.base import Encoder
    from dprdm.models.mini_encoder import MiniEncoder, MiniEncoderConfig, MiniEncoderModel, MiniLMTextTower

    torch.manual_seed(0)
    model = MiniEncoderModel(MiniEncoderConfig(dim=8, channels=(8, 16)))
    MiniEncoder.save(model, tmp_path)
    tower = MiniLMTextTower()
    enc = MiniEncoder.load(tmp_path, text_tower=tower)
    assert isinstance(enc, Encoder)
    split = md.make_split(4, md.PUBLIC_STYLES, seed=0)
    img = enc.encode_images([split.pil(i) for i in range(4)])
    assert img.shape == (4, 8) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert np.allclose(img, enc.encode_pixels(split.images), atol=1e-5)
    txt = enc.encode_texts(["a red circle"])
    assert txt.shape == (1, 8)
    assert enc.identity.name == "dprdm-mini" and enc.identity.dimension == 8
    again = MiniEncoder.load(tmp_path, text_tower=tower)
    assert again.identity == enc.identity
    with pytest.raises(TypeError, match="texts must be strings"):
        enc.encode_texts([3])  # type: ignore[list-item]


def test_train_default_registers_a_parser():
    from dprdm.cli import train_default as train_cli
    from dprdm.models import train_default

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    train_cli.register(sub)
    args = parser.parse_args(["train-default", "--decoder-seconds", "5", "--seed", "3"])
    assert args.seed == 3 and args.decoder_seconds == 5 and args.out == train_default.WEIGHTS_DIR
    bad = parser.parse_args(["train-default", "--dim", "0"])
    with pytest.raises(ValueError, match="--dim must be >= 1; found 0"):
        train_default.run(bad)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="equal d"):
        frechet_distance(a, a[:, :3])


@pytest.mark.slow
def test_default_bundle_draws_recognisable_prompted_shapes():
    """Committed weights: public-only generations match their prompts far above chance (0.0625)."""
    from dprdm.models.quality import train_judge
    from dprdm.models.registry import load_bundle

    bundle = load_bundle()
    judge, scores = train_judge(steps=300)
    assert min(scores.shape, scores.colour) > 0.95
    prompts = md.heldout_prompts()
    u = bundle.encoder.encode_texts([p for p, _, _ in prompts])
    images = bundle.generator.generate_many(u[:32], steps=20, seed=0)
    pred = judge.predict(np.stack([np.asarray(im) for im in images]))
    target = np.array([(s, c) for _, s, c in prompts[:32]])
    assert (pred[:, :2] == target).all(1).mean() > 0.4
