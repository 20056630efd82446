"""The DP-SGD core: per-sample gradients vs a batch-size-1 reference, clipping with noise
multiplicity, Poisson batches through BatchMemoryManager, randomness rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprdm.baselines.backbone import Backbone, load_backbone
from dprdm.baselines.dp_lora import LoraSettings, add_lora
from dprdm.baselines.dpsgd import DPSGDConfig, _ChaChaDPOptimizer, fold_multiplicity, train_dpsgd
from dprdm.baselines.tiny import write_tiny_backbone

N = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_backbone(tmp_path_factory.mktemp("bb"), size=8))


@pytest.fixture()
def lora_backbone(backbone_dir: str) -> Backbone:
    bb = load_backbone(backbone_dir)
    add_lora(bb.unet, LoraSettings(rank=2))
    with torch.no_grad():  # non-zero B so every adapter weight has a gradient
        for name, p in bb.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return bb


def _fixed_loss(bb: Backbone, same_draw_for_copies: bool = False):
    """Loss whose (t, noise) depends only on (record, copy): reproducible in a batch or alone."""
    x0 = torch.linspace(-1, 1, N * 3 * 64).reshape(N, 3, 8, 8)
    with torch.no_grad():
        cond = bb.conditioner.encode(["a red circle", "a blue square", "stripes", ""])

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor, m: int) -> torch.Tensor:
        losses = []
        for i in idx.tolist():
            for j in range(m):
                g = torch.Generator().manual_seed(100 * i + (0 if same_draw_for_copies else j))
                t = torch.randint(0, 1000, (1,), generator=g)
                noise = torch.randn((1, 3, 8, 8), generator=g)
                losses.append((t, noise, i))
        t = torch.cat([a for a, _, _ in losses])
        noise = torch.cat([b for _, b, _ in losses])
        rows = torch.tensor([c for _, _, c in losses])
        xt = bb.scheduler.add_noise(x0[rows], noise, t)
        pred = model(xt, t, encoder_hidden_states=cond["encoder_hidden_states"][rows]).sample
        return ((pred - noise) ** 2).flatten(1).mean(1).mean()

    return loss_fn


def _params(bb: Backbone) -> list[torch.nn.Parameter]:
    return [p for p in bb.unet.parameters() if p.requires_grad]


@pytest.mark.parametrize("m", [1, 3])
def test_per_sample_gradients_match_batch_size_one_reference(lora_backbone: Backbone, m: int) -> None:
    from opacus import GradSampleModule

    bb = lora_backbone
    loss_fn, params = _fixed_loss(bb), _params(bb)
    reference = []
    for i in range(N):
        bb.unet.zero_grad()
        loss_fn(bb.unet, torch.tensor([i]), m).backward()
        reference.append([p.grad.clone() for p in params])
    gsm = GradSampleModule(bb.unet, batch_first=True, loss_reduction="mean")
    try:
        loss_fn(gsm, torch.arange(N), m).backward()
        fold_multiplicity(params, m)
        for k, p in enumerate(params):
            assert p.grad_sample.shape == (N, *p.shape)
            for i in range(N):
                torch.testing.assert_close(p.grad_sample[i], reference[i][k], rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()


def _clipped_sum_norm(bb: Backbone, loss_fn, m: int, clip: float, fold: bool) -> float:
    from opacus import GradSampleModule

    params = _params(bb)
    gsm = GradSampleModule(bb.unet, batch_first=True, loss_reduction="mean")
    opt = _ChaChaDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                             expected_batch_size=1, dp_rng=np.random.default_rng(0))
    try:
        loss_fn(gsm, torch.tensor([1]), m).backward()
        if fold:
            fold_multiplicity(params, m)
        opt.clip_and_accumulate()
        return float(torch.sqrt(sum((p.summed_grad ** 2).sum() for p in params)))
    finally:
        gsm._close()


def test_one_example_contributes_at_most_the_clip_norm_with_multiplicity(lora_backbone: Backbone) -> None:
    clip, m = 1e-4, 4  # far below the raw gradient norm: clipping is active
    assert _clipped_sum_norm(lora_backbone, _fixed_loss(lora_backbone), m, clip, fold=True) <= clip * (1 + 1e-5)
    # identical copies make the authors' per-copy clipping visible: the example moves the sum by m C
    same = _fixed_loss(lora_backbone, same_draw_for_copies=True)
    assert _clipped_sum_norm(lora_backbone, same, m, clip, fold=True) <= clip * (1 + 1e-5)
    assert _clipped_sum_norm(lora_backbone, same, m, clip, fold=False) == pytest.approx(m * clip, rel=1e-3)


def test_training_changes_only_trainable_parameters_and_reports_budget(lora_backbone: Backbone) -> None:
    bb = lora_backbone
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    cfg = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=2, steps=3, max_physical_batch=1, multiplicity=2)
    res = train_dpsgd(bb.unet, _fixed_loss(bb), N, cfg, method="test", rng=np.random.default_rng(3), production=False)
    assert res.report.epsilon <= 5.0 and res.report.steps == 3 and res.report.sample_rate == 0.5
    assert res.steps == 3
    changed = {k for k, v in bb.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert "NOT suitable" in res.report.noise_source and res.report.production is False


def test_empty_poisson_batches_still_step(lora_backbone: Backbone) -> None:
    # q = 1/4 over 4 records: with this seed some logical batches are empty; noise is still added
    bb = lora_backbone
    cfg = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=1, steps=3)
    rng = np.random.default_rng(7)
    coins = np.random.default_rng(7).random((3, N)) < 0.25
    assert (coins.sum(1) == 0).any()
    res = train_dpsgd(bb.unet, _fixed_loss(bb), N, cfg, method="test", rng=rng, production=False)
    assert res.steps == 3


def test_charge_comes_first_and_nothing_private_is_logged(lora_backbone: Backbone) -> None:
    """Issue 12 item 3: the ledger is charged before any private record is read (a refusal trains
    nothing), and the progress log carries public facts only (never the private batch's loss)."""
    bb = lora_backbone
    cfg = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=2, steps=10, max_physical_batch=2)
    calls: list[str] = []
    inner = _fixed_loss(bb)

    def loss(model: torch.nn.Module, idx: torch.Tensor, m: int) -> torch.Tensor:
        calls.append("loss")
        return inner(model, idx, m)

    def refuse(report: object) -> None:
        calls.append("charge")
        raise ValueError("ledger refused the charge")

    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    with pytest.raises(ValueError, match="refused"):
        train_dpsgd(bb.unet, loss, N, cfg, method="t", rng=np.random.default_rng(1), production=False, charge=refuse)
    assert calls == ["charge"]
    assert all(torch.equal(v, before[k]) for k, v in bb.unet.state_dict().items())
    lines: list[str] = []
    charged: list[object] = []
    calls.clear()

    def accept(report: object) -> None:
        calls.append("charge")
        charged.append(report)

    res = train_dpsgd(bb.unet, loss, N, cfg, method="t", rng=np.random.default_rng(1), production=False,
                      log=lines.append, charge=accept)
    assert charged == [res.report] and calls[0] == "charge" and "loss" in calls
    assert lines == ["t: step 10/10"] and not any("loss" in line for line in lines)


def test_production_refuses_a_seeded_generator(lora_backbone: Backbone) -> None:
    cfg = DPSGDConfig(epsilon=5.0, delta=1e-3, batch_size=2, steps=1)
    with pytest.raises(ValueError, match="refused"):
        train_dpsgd(lora_backbone.unet, _fixed_loss(lora_backbone), N, cfg, method="t",
                    rng=np.random.default_rng(0), production=True)


@pytest.mark.parametrize(("kwargs", "match"), [({"batch_size": 0}, "batch_size"), ({"multiplicity": 0}, "multiplicity"),
                                               ({"clip_norm": -1.0}, "clip_norm")])
def test_config_names_bad_values(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPSGDConfig(epsilon=1.0, delta=1e-5, **kwargs)


def test_resolve_refuses_delta_too_large_for_the_public_size() -> None:
    with pytest.raises(ValueError, match="delta"):
        DPSGDConfig(epsilon=1.0, delta=0.1, batch_size=2).resolve(20)
    with pytest.raises(ValueError, match="public size"):
        DPSGDConfig(epsilon=1.0, delta=1e-5, public_size=5).resolve(20)
