"""DPAgg-TI (Peetathawatchai et al. 2025): noisy aggregate of per-image textual-inversion embeddings.

1. Poisson subsample: each private record kept with probability q (DP coins from ``rng``).
2. For each kept image i, learn a token embedding e_i against the FROZEN model: the prompt
   ``template.format(caption=...)`` contains the placeholder word, whose input embedding is
   replaced by e_i (:class:`~dprdm.baselines.backbone.Conditioner`), and e_i minimizes the
   denoising loss of image i alone. Rows are optimized together but independently (per-row loss
   summed; Adam is per coordinate), so e_i is a function of record i and public inputs only.
3. d_i = e_i - e0, with e0 the public initializer's embedding, normalized to norm C (``"normalize"``,
   the paper's choice) or clipped to norm <= C (``"clip"``). Either way ||d_i|| <= C.
4. Release ``e = e0 + (sum_i d_i + N(0, (z C)^2 I)) / (q N̄)``: the denominator is public, so the
   noisy sum is one Poisson-subsampled Gaussian of sensitivity C under add/remove, accounted as
   ``SubsampledGaussianEvent(q, z)`` once, with z calibrated to (epsilon, delta).

Noise and coins come from ``rng`` (ChaCha20 from os.urandom by default; seeded generators only
with ``production=False``). The inversion's own randomness (t, diffusion noise) is training
randomness and may be seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dprdm.privacy import check_dp_generator, new_dp_generator

from .accounting import PrivacyReport, calibrate_noise_multiplier, check_target
from .backbone import Backbone, diffusion_loss
from .data import ImageSet
from .dpsgd import noise_source

__all__ = ["TISettings", "DPAggResult", "invert_images", "aggregate", "train_dpagg_ti"]

DEFAULT_TEMPLATE = "{caption} in the style of *"
MODES = ("normalize", "clip")


@dataclass(frozen=True)
class TISettings:
    """DPAgg-TI settings.

    Attributes:
        epsilon, delta: target budget of the single release (delta < 1/N̄).
        sample_rate: Poisson rate q in (0, 1].
        clip_norm: C, the norm of each per-image offset d_i.
        steps: optimization steps per image.
        lr: Adam learning rate of the inversion.
        batch: images inverted together (independently).
        template: training prompt with ``{caption}`` and the placeholder word.
        init_word: public word whose embedding is e0 (empty: the placeholder's own embedding).
        mode: ``"normalize"`` (||d_i|| = C) or ``"clip"`` (||d_i|| <= C).
        public_size: declared N̄ >= N (None: N).
    """

    epsilon: float
    delta: float
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    steps: int = 50
    lr: float = 5e-2
    batch: int = 8
    template: str = DEFAULT_TEMPLATE
    init_word: str = "style"
    mode: str = "normalize"
    public_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1]; found {self.sample_rate!r}")
        for name in ("clip_norm", "lr"):
            v = float(getattr(self, name))
            if not v > 0 or math.isinf(v):
                raise ValueError(f"{name} must be finite and > 0; found {getattr(self, name)!r}")
        for name in ("steps", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; found {v!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; found {self.mode!r}")
        if "{caption}" not in self.template:
            raise ValueError(f"template must contain '{{caption}}'; found {self.template!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class DPAggResult:
    """The released embedding (``(token_dim,)``), its initializer e0 and the privacy report."""

    embedding: torch.Tensor
    init: torch.Tensor
    report: PrivacyReport


def invert_images(backbone: Backbone, data: ImageSet, idx: np.ndarray, settings: TISettings, init: torch.Tensor,
                  seed: int = 0) -> torch.Tensor:
    """Per-image textual inversion: one learned embedding per record in ``idx`` (rows independent).

    Returns:
        ``(len(idx), token_dim)`` embeddings.

    Raises:
        ValueError: if the template lacks the backbone's placeholder word.
    """
    placeholder = backbone.conditioner.placeholder
    prompts_all = [settings.template.format(caption=c).strip() for c in data.captions]
    if any(placeholder not in p.split() for p in prompts_all):
        raise ValueError(f"template {settings.template!r} lacks the placeholder word {placeholder!r}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    x0_all = backbone.to_model_space(data.pixels)
    for start in range(0, len(idx), settings.batch):
        rows = torch.as_tensor(idx[start:start + settings.batch], dtype=torch.long)
        emb = init.detach().clone()[None].repeat(len(rows), 1).requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=settings.lr)
        prompts = [prompts_all[i] for i in rows.tolist()]
        for _ in range(settings.steps):
            cond = backbone.conditioner.encode(prompts, inject=emb)
            loss = diffusion_loss(backbone.unet, backbone.scheduler, x0_all[rows], cond, gen).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(emb.detach())
    if not out:
        return torch.zeros(0, init.shape[0])
    return torch.cat(out)


def aggregate(embeddings: torch.Tensor, init: torch.Tensor, *, clip_norm: float, noise_multiplier: float,
              expected_count: float, mode: str, rng: np.random.Generator) -> torch.Tensor:
    """``e0 + (sum_i bound(e_i - e0) + N(0, (z C)^2 I)) / expected_count``.

    Args:
        embeddings: ``(k, d)`` per-image embeddings of the subsample (k may be 0).
        init: ``(d,)`` public initializer e0.
        clip_norm: C.
        noise_multiplier: z.
        expected_count: the public denominator q N̄.
        mode: ``"normalize"`` or ``"clip"``.
        rng: DP generator for the noise.

    Returns:
        ``(d,)`` released embedding (float32).

    Raises:
        ValueError: on a bad mode or denominator.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; found {mode!r}")
    if not expected_count > 0:
        raise ValueError(f"expected_count must be > 0; found {expected_count!r}")
    d = (embeddings - init[None]).double()
    norms = d.norm(dim=1, keepdim=True)
    if mode == "normalize":
        scale = clip_norm / norms.clamp(min=1e-12)
    else:
        scale = (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
    total = (d * scale).sum(0)
    noise = torch.from_numpy(rng.standard_normal(init.shape[0])) * (noise_multiplier * clip_norm)
    return (init.double() + (total + noise) / expected_count).float()


def train_dpagg_ti(backbone: Backbone, data: ImageSet, settings: TISettings, *, seed: int = 0,
                   rng: np.random.Generator | None = None, production: bool = True,
                   log: Callable[[str], None] | None = None,
                   charge: Callable[[PrivacyReport], None] | None = None) -> DPAggResult:
    """Run DPAgg-TI on ``data`` against the frozen ``backbone``.

    Args:
        backbone: the frozen model (unchanged).
        data: the private records.
        settings: see :class:`TISettings`.
        seed: inversion randomness (not DP noise).
        rng: DP generator for coins and noise (default: fresh ChaCha20).
        production: refuse a non-CSPRNG ``rng``.
        log: progress callback (public facts only).
        charge: called with the privacy report before any private record is read (it charges
            the domain's ledger and raises to stop the run); see ``dprdm.baselines.dpsgd.ChargeFn``.

    Returns:
        The released embedding with its privacy report.

    Raises:
        ValueError: naming a bad setting or budget.
    """
    n = len(data)
    if n < 1:
        raise ValueError("the private dataset is empty")
    public = n if settings.public_size is None else settings.public_size
    if public < n:
        raise ValueError(f"public size must be >= the dataset size {n}; found {public!r}")
    check_target(epsilon=settings.epsilon, delta=settings.delta, public_size=public)
    rng = new_dp_generator() if rng is None else rng
    check_dp_generator(rng, production=production)
    q = float(settings.sample_rate)
    z = calibrate_noise_multiplier(q=q, steps=1, epsilon=settings.epsilon, delta=settings.delta)
    report = PrivacyReport.build(method="dpagg-ti", epsilon_target=settings.epsilon, delta=settings.delta, q=q,
                                 noise_multiplier=z, steps=1, clip_norm=settings.clip_norm, public_size=public,
                                 noise_source=noise_source(rng, production), production=production,
                                 extra={"ti_steps": settings.steps, "mode": settings.mode,
                                        "denominator": "q * public_size (public)"})
    if charge is not None:  # charge first: nothing private has been read yet
        charge(report)
    keep = np.flatnonzero(rng.random(n) < q)
    cond = backbone.conditioner
    init = cond.word_embedding(settings.init_word) if settings.init_word else cond.placeholder_embedding()
    if log is not None:
        log(f"dpagg-ti: inverting the subsampled images ({settings.steps} steps each), noise multiplier {z:.4f}")
    emb = invert_images(backbone, data, keep, settings, init, seed)
    released = aggregate(emb, init, clip_norm=settings.clip_norm, noise_multiplier=z, expected_count=q * public,
                         mode=settings.mode, rng=rng)
    return DPAggResult(embedding=released, init=init, report=report)
