"""Quality measurements for the ``dprdm-mini`` bundle: an attribute/style judge and a Fréchet distance.

- :class:`Judge`: a small CNN with four heads (shape, colour, fill, background) trained on labelled
  public-style AND private-style images generated with their own seeds (never the private demo
  corpus). It scores whether a generated image matches its prompt and carries the private style.
- :func:`frechet_distance`: Fréchet distance between Gaussian fits of two feature sets (here the
  dprdm-mini image tower's embeddings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from . import mini_data as md
from .mini_encoder import pixels_from_uint8

__all__ = ["Judge", "JudgeScores", "frechet_distance", "train_judge", "JUDGE_SEEDS"]

JUDGE_SEEDS = (31, 32, 33)  # train public, train private-style, held-out test
_HEADS = (len(md.SHAPES), len(md.COLOURS), len(md.FILLS), len(md.BACKGROUNDS))


class Judge(nn.Module):
    """Four-headed CNN classifier on 24x24 images."""

    def __init__(self) -> None:
        super().__init__()
        chans = (32, 64, 96)
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            ]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(c_in, n) for n in _HEADS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each head for ``(n, 3, 24, 24)`` pixels in [-1, 1]."""
        h = self.features(x)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """``(n, 4)`` predicted labels (shape, colour, fill, background) of ``(n, 24, 24, 3)`` images."""
        self.eval()
        out = []
        for i in range(0, len(images), 512):
            logits = self(pixels_from_uint8(images[i : i + 512]))
            out.append(torch.stack([lg.argmax(1) for lg in logits], 1))
        return torch.cat(out).numpy() if out else np.zeros((0, 4), np.int64)


@dataclass(frozen=True)
class JudgeScores:
    """Accuracy of the judge on held-out REAL images (how far its verdicts can be trusted)."""

    shape: float
    colour: float
    fill: float
    background: float
    train_seconds: float


def train_judge(
    n_public: int = 4000, n_private: int = 2000, steps: int = 600, seed: int = 0
) -> tuple[Judge, JudgeScores]:
    """Train the judge on public- and private-style images; evaluate on a held-out mix.

    Returns:
        The judge and its held-out accuracy per attribute.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pub = md.make_split(n_public, md.PUBLIC_STYLES, seed=JUDGE_SEEDS[0])
    priv = md.make_split(n_private, (md.PRIVATE_STYLE,), seed=JUDGE_SEEDS[1])
    images = np.concatenate([pub.images, priv.images])
    labels = torch.from_numpy(np.concatenate([pub.labels, priv.labels]))
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    t0 = time.time()
    judge.train()
    for step in range(steps):
        idx = rng.integers(0, len(images), 128)
        x = pixels_from_uint8(images[idx])
        x = torch.roll(x, shifts=tuple(int(v) for v in rng.integers(-1, 2, 2)), dims=(2, 3))
        x = x + 0.05 * torch.randn_like(x)  # robustness to sampler noise
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = sum(F.cross_entropy(lg, labels[idx, j]) for j, lg in enumerate(judge(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.time() - t0
    test = md.make_split(1200, md.PUBLIC_STYLES + (md.PRIVATE_STYLE,), seed=JUDGE_SEEDS[2])
    pred = judge.predict(test.images)
    acc = (pred == test.labels).mean(0)
    return judge.eval(), JudgeScores(*(float(a) for a in acc), train_seconds=seconds)


def frechet_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Fréchet distance ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` between Gaussian fits.

    Raises:
        ValueError: if the feature sets have different widths or fewer than 2 rows.
    """
    from scipy import linalg

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"need two (n >= 2, d) feature arrays of equal d; found {x.shape} and {y.shape}")
    mu = x.mean(0) - y.mean(0)
    sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean, _ = linalg.sqrtm(sa @ sb, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(sa.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(mu @ mu + np.trace(sa + sb - 2 * np.real(covmean)))
