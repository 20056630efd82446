"""Training loops of the ``dprdm-mini`` bundle (public data only).

1. :func:`train_encoder`: the image tower and text head, contrastively against the LOCKED MiniLM
   (multi-positive InfoNCE: images and captions of the same attribute combination are positives).
2. :func:`train_decoder`: a pixel-space RDM UNet (v-prediction) conditioned only on retrieval tokens
   built exactly as at serving time, ``c = lam * (v + noise) + (1 - lam) * u``, where ``v`` is a
   simulated retrieval from the PUBLIC pool (mean of k image embeddings of the same style, a random
   share of them with the same content), ``noise`` is Gaussian, ``u`` the caption or content-only
   prompt. ``lam = 0`` (public-only mode) pairs the full caption with its image.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from . import mini_data as md
from .mini_encoder import MiniEncoderConfig, MiniEncoderModel, MiniLMTextTower, pixels_from_uint8
from .rdm import RDMConfig

__all__ = [
    "EncoderTrainConfig",
    "DecoderTrainConfig",
    "train_encoder",
    "train_decoder",
    "build_unet",
    "make_scheduler",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Encoder training hyper-parameters."""

    steps: int = 700
    batch: int = 256
    lr: float = 2e-3
    seconds: float = 600.0


@dataclass(frozen=True)
class DecoderTrainConfig:
    """Decoder training hyper-parameters (training stops at ``steps`` or ``seconds``)."""

    steps: int = 8000
    batch: int = 64
    lr: float = 1e-3
    seconds: float = 1800.0
    ema: float = 0.999
    sigma_max: float = 0.15
    k_max: int = 64
    p_public_only: float = 0.2
    p_uncond: float = 0.1
    bf16: bool = True


def combo_ids(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """One integer per (shape, colour, fill, background) combination."""
    return ((labels[:, 0] * 4 + labels[:, 1]) * 2 + labels[:, 2]) * 3 + labels[:, 3]


def train_encoder(
    split: md.Split,
    text_tower: MiniLMTextTower,
    cfg: MiniEncoderConfig,
    tcfg: EncoderTrainConfig,
    seed: int,
    log: Log,
) -> tuple[MiniEncoderModel, dict[str, float]]:
    """Train the image tower and text head; returns the model and measurements."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MiniEncoderModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=0.05)
    combos = combo_ids(split.labels)
    t0, step, losses = time.time(), 0, []
    while step < tcfg.steps and time.time() - t0 < tcfg.seconds:
        idx = rng.integers(0, len(split.captions), tcfg.batch)
        texts = [split.captions[i] for i in idx]
        lr = tcfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / tcfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        img = model.image(_augment(pixels_from_uint8(split.images[idx]), rng))
        txt = model.text(text_tower.embed(texts))
        pos = torch.from_numpy(combos[idx][:, None] == combos[idx][None, :]).float()
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = 0.5 * (_multi_pos(logits, pos) + _multi_pos(logits.T, pos.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"encoder step {step} loss {np.mean(losses[-100:]):.3f} ({time.time() - t0:.0f}s)")
        step += 1
    return model.eval(), {
        "encoder_steps": step,
        "encoder_seconds": time.time() - t0,
        "encoder_final_loss": float(np.mean(losses[-50:])),
    }


def _multi_pos(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives per row (mean log-likelihood of the positives)."""
    logp = logits.log_softmax(dim=1)
    return -((logp * pos).sum(1) / pos.sum(1)).mean()


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Small random shifts (+-1 px) so the image tower does not key on exact pixel phases."""
    dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def build_unet(dim: int, size: int = md.IMAGE_SIZE) -> torch.nn.Module:
    """The default decoder's UNet: pixel space, cross-attention in the mid block, pooled class embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=dim,
        attention_head_dim=32,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=dim,
    )


def make_scheduler() -> object:
    """DDIM sampler (v-prediction, cosine schedule, trailing spacing for few steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
    )


class RetrievalSimulator:
    """Builds training conditioning ``c = lam * (v + noise) + (1 - lam) * u`` from the public pool."""

    def __init__(
        self,
        labels: npt.NDArray[np.int64],
        img_emb: npt.NDArray[np.float32],
        caption_emb: npt.NDArray[np.float32],
        content_emb: npt.NDArray[np.float32],
        tcfg: DecoderTrainConfig,
    ) -> None:
        self.emb = torch.from_numpy(img_emb)
        self.cap, self.content = torch.from_numpy(caption_emb), torch.from_numpy(content_emb)
        self.tcfg = tcfg
        style = labels[:, 2] * 3 + labels[:, 3]
        full = combo_ids(labels)
        self.by_style = {int(s): np.flatnonzero(style == s) for s in np.unique(style)}
        self.by_combo = {int(c): np.flatnonzero(full == c) for c in np.unique(full)}
        self.style, self.full = style, full

    def __call__(self, idx: npt.NDArray[np.int64], rng: np.random.Generator) -> torch.Tensor:
        """``(b, d)`` conditioning for the training images ``idx``."""
        out = []
        for i in idx:
            if rng.random() < self.tcfg.p_public_only:
                out.append(self.cap[i])
                continue
            k = int(rng.integers(4, self.tcfg.k_max + 1))
            same = int(rng.binomial(k, rng.uniform(0.05, 1.0)))
            pick = np.concatenate(
                [
                    rng.choice(self.by_combo[int(self.full[i])], same),
                    rng.choice(self.by_style[int(self.style[i])], k - same),
                ]
            )
            v = self.emb[pick].mean(0)
            v = v + float(rng.uniform(0, self.tcfg.sigma_max)) * torch.from_numpy(
                rng.standard_normal(v.shape[0]).astype(np.float32)
            )
            lam = float(rng.uniform(0.3, 1.0))
            u = self.content[i] if rng.random() < 0.7 else self.cap[i]
            out.append(lam * v + (1 - lam) * u)
        return torch.stack(out)


def train_decoder(
    split: md.Split, sim: RetrievalSimulator, rcfg: RDMConfig, tcfg: DecoderTrainConfig, seed: int, log: Log
) -> tuple[torch.nn.Module, object, dict[str, float]]:
    """Train the UNet; returns (EMA UNet, scheduler, measurements)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    unet = build_unet(rcfg.dim).train()
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    sched = make_scheduler()
    noise_sched = DDPMScheduler.from_config(sched.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=0.0)
    acp = noise_sched.alphas_cumprod
    t0, step, losses = time.time(), 0, []
    while step < tcfg.steps and time.time() - t0 < tcfg.seconds:
        idx = rng.integers(0, len(split.images), tcfg.batch)
        x0 = pixels_from_uint8(split.images[idx])
        c = F.normalize(sim(idx, rng), dim=-1) * rcfg.token_scale
        drop = torch.from_numpy(rng.random(tcfg.batch) < tcfg.p_uncond)
        c[drop] = 0.0
        tokens = c[:, None, :].expand(-1, rcfg.k, -1)
        t = torch.from_numpy(rng.integers(0, noise_sched.config.num_train_timesteps, tcfg.batch))
        noise = torch.randn_like(x0)
        a = acp[t].sqrt()[:, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None]
        xt, target = a * x0 + s * noise, a * noise - s * x0
        frac = min(max(step / max(tcfg.steps, 1), (time.time() - t0) / tcfg.seconds), 1.0)
        lr = tcfg.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg.bf16):
            pred = unet(xt, t, encoder_hidden_states=tokens, class_labels=tokens.mean(1)).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(tcfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"decoder step {step} loss {np.mean(losses[-200:]):.4f} ({time.time() - t0:.0f}s)")
        step += 1
    return (
        ema,
        sched,
        {
            "decoder_steps": step,
            "decoder_seconds": time.time() - t0,
            "decoder_final_loss": float(np.mean(losses[-200:])),
        },
    )
