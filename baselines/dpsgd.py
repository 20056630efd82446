"""The one DP-SGD core shared by DP-LDM and DP-LoRA (Opacus; SPEC §9).

Per logical step: a Poisson(q) subsample of the private records (independent coins per record
and step), per-example gradients from Opacus' ``GradSampleModule`` hooks, each clipped to ``C``
in L2 over all trainable parameters, summed, Gaussian noise N(0, (z C)^2) per coordinate added,
divided by the expected batch size ``q N̄``. Large logical batches are split into physical ones by
Opacus' ``BatchMemoryManager``. Accounting: :mod:`dprdm.baselines.accounting`.

**Noise multiplicity** (DP-LoRA, Tsai et al.): each example's loss is the mean over ``m`` (t, noise)
draws. The loss function returns ``b * m`` rows, example-major; Opacus gives one gradient per
ROW, and :func:`fold_multiplicity` averages the ``m`` rows of each example BEFORE clipping, so
one example contributes one clipped gradient (the authors' code clips each copy: sensitivity m C
accounted as C, i.e. epsilon under-counted).

**Randomness** (SPEC §3): Poisson coins and gradient noise are drawn from a numpy generator that
must be ChaCha20 keyed from ``os.urandom`` in production (``dprdm.privacy.new_dp_generator``);
Opacus' own ``secure_mode`` needs ``torchcsprng``, which is not a dependency, so we replace its
noise (``_ChaChaDPOptimizer.add_noise``) and its sampler (:class:`PoissonBatchSampler`). Seeded
generators are accepted only with ``production=False`` and the privacy report then says the
noise is NOT private. Caveat shared with ``privacy.rng``: float Gaussian noise (Mironov 2012).
Diffusion timesteps and noise are training randomness, not DP randomness, and may be seeded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Sampler

from dprdm.privacy import check_dp_generator, new_dp_generator

from .accounting import PrivacyReport, calibrate_noise_multiplier, check_target

__all__ = [
    "DPSGDConfig",
    "DPSGDResult",
    "ChargeFn",
    "LossFn",
    "PoissonBatchSampler",
    "fold_multiplicity",
    "noise_source",
    "train_dpsgd",
]

LossFn = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]
"""``loss_fn(model, idx, m)``: mean over ``len(idx) * m`` rows (example-major) of per-row losses."""


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD hyper-parameters and the privacy target.

    Attributes:
        epsilon, delta: target budget; delta < 1/N̄ (SPEC §3).
        batch_size: expected logical batch size; the sample rate is ``q = batch_size / N̄``.
        steps: logical steps (releases).
        clip_norm: per-example L2 clip norm C.
        lr: AdamW learning rate.
        max_physical_batch: examples per physical batch (BatchMemoryManager).
        multiplicity: (t, noise) draws averaged per example before clipping (m >= 1).
        public_size: declared public size N̄ >= N (``None``: the actual N).
    """

    epsilon: float
    delta: float
    batch_size: int = 8
    steps: int = 10
    clip_norm: float = 1.0
    lr: float = 1e-4
    max_physical_batch: int = 8
    multiplicity: int = 1
    public_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "max_physical_batch", "multiplicity"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; found {v!r}")
        for name in ("clip_norm", "lr"):
            v = float(getattr(self, name))
            if not (v > 0.0) or math.isinf(v):
                raise ValueError(f"{name} must be finite and > 0; found {getattr(self, name)!r}")

    def resolve(self, n: int) -> tuple[int, float]:
        """Return (N̄, q) for a dataset of ``n`` records, validating the target.

        Raises:
            ValueError: naming a bad size, batch or budget.
        """
        if n < 1:
            raise ValueError(f"the private dataset is empty (n={n})")
        public = n if self.public_size is None else self.public_size
        if public < n:
            raise ValueError(f"public size must be >= the dataset size {n}; found {public!r}")
        check_target(epsilon=self.epsilon, delta=self.delta, public_size=public)
        if self.batch_size > public:
            raise ValueError(f"batch_size must be <= the public size {public}; found {self.batch_size}")
        return public, self.batch_size / public


@dataclass(frozen=True)
class DPSGDResult:
    """Outcome of :func:`train_dpsgd`: the privacy report and the number of steps run.

    No training loss is kept or logged: the un-noised loss of a private batch is a statistic of
    the private data that no accountant charges (issue 12, item 3)."""

    report: PrivacyReport
    steps: int


ChargeFn = Callable[[PrivacyReport], None]
"""``charge(report)``: called with a run's privacy report BEFORE any private record is touched
(the report depends only on public inputs); it charges the privacy domain's ledger and raises to
stop the run (a refused budget trains nothing)."""


class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` batches, each record kept independently with probability ``q`` (fresh coins).

    Args:
        n: number of records.
        q: sample rate in (0, 1].
        steps: number of batches.
        rng: the DP generator for the coins.
    """

    def __init__(self, n: int, q: float, steps: int, rng: np.random.Generator) -> None:
        self.n, self.q, self.steps, self.rng = n, float(q), steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(self.rng.random(self.n) < self.q).tolist()


class _ChaChaDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn from a numpy (ChaCha20) generator."""

    def __init__(self, *args: object, dp_rng: np.random.Generator, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.dp_rng = dp_rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            noise = self.dp_rng.standard_normal(tuple(summed.shape), dtype=np.float64) * std
            p.grad = (summed + torch.from_numpy(noise).to(summed.device, summed.dtype)).view_as(p)


def noise_source(rng: np.random.Generator, production: bool) -> str:
    """Human-readable origin of the DP randomness for the privacy report."""
    name = type(rng.bit_generator).__name__
    if production:
        return f"{name} (20 rounds) keyed from os.urandom: production DP noise"
    return f"{name} supplied by the caller (production=False): NOT suitable for a private release"


def fold_multiplicity(params: Sequence[torch.nn.Parameter], m: int) -> None:
    """Average each example's ``m`` per-row gradients in place (``p.grad_sample``: (b m, ...) -> (b, ...)).

    Raises:
        ValueError: if a parameter has no per-sample gradient or its rows are not a multiple of m.
    """
    for p in params:
        gs = p.grad_sample
        if gs is None:
            raise ValueError(f"parameter of shape {tuple(p.shape)} received no per-sample gradient")
        if isinstance(gs, list):
            gs = torch.cat(gs)
        if gs.shape[0] % m:
            raise ValueError(f"{gs.shape[0]} gradient rows are not a multiple of multiplicity {m}")
        p.grad_sample = gs.reshape(gs.shape[0] // m, m, *gs.shape[1:]).mean(1)


def train_dpsgd(
    model: torch.nn.Module,
    loss_fn: LossFn,
    n: int,
    config: DPSGDConfig,
    *,
    method: str,
    rng: np.random.Generator | None = None,
    production: bool = True,
    log: Callable[[str], None] | None = None,
    charge: ChargeFn | None = None,
) -> DPSGDResult:
    """Train the parameters of ``model`` that require grad with DP-SGD on records ``0..n-1``.

    Args:
        model: the module to train; only parameters with ``requires_grad`` change.
        loss_fn: ``loss_fn(wrapped_model, idx, m)`` -> mean loss over ``len(idx) * m`` rows.
        n: number of private records.
        config: hyper-parameters and target budget.
        method: name written into the privacy report.
        rng: DP generator for coins and noise (default: a fresh ChaCha20 from os.urandom).
        production: refuse non-ChaCha generators (tests pass a seeded one with False).
        log: optional progress callback (public facts only: step counts, never a loss).
        charge: see :data:`ChargeFn`; called before the first private record is read.

    Returns:
        The privacy report (epsilon from the project's accountant) and the steps run.

    Raises:
        ValueError: naming a bad configuration, budget or generator.
    """
    public, q = config.resolve(n)
    rng = new_dp_generator() if rng is None else rng
    check_dp_generator(rng, production=production)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    z = calibrate_noise_multiplier(q=q, steps=config.steps, epsilon=config.epsilon, delta=config.delta)
    m = config.multiplicity
    report = PrivacyReport.build(method=method, epsilon_target=config.epsilon, delta=config.delta, q=q,
                                 noise_multiplier=z, steps=config.steps, clip_norm=config.clip_norm,
                                 public_size=public, noise_source=noise_source(rng, production),
                                 production=production,
                                 extra={"batch_size": config.batch_size, "multiplicity": m, "lr": config.lr})
    if report.epsilon > config.epsilon * (1 + 1e-9):
        raise RuntimeError(f"accounted epsilon {report.epsilon} exceeds the target {config.epsilon}")
    if charge is not None:  # charge first: nothing private has been read yet
        charge(report)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = _ChaChaDPOptimizer(torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0), noise_multiplier=z,
                             max_grad_norm=config.clip_norm, expected_batch_size=config.batch_size,
                             loss_reduction="mean", dp_rng=rng)
    loader = DataLoader(range(n), batch_sampler=PoissonBatchSampler(n, q, config.steps, rng),
                        collate_fn=lambda b: torch.tensor(b, dtype=torch.long))
    done = 0
    try:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=config.max_physical_batch,
                                optimizer=opt) as physical:
            for idx in physical:
                if len(idx) == 0:
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                else:
                    loss = loss_fn(gsm, idx, m)
                    with warnings.catch_warnings():  # Opacus' hooks fire on outputs: inputs need no grad
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    fold_multiplicity(params, m)
                last = not opt._check_skip_next_step(pop_next=False)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if last:
                    done += 1
                    if log is not None and (done % 10 == 0 or done == config.steps):
                        log(f"{method}: step {done}/{config.steps}")
    finally:
        gsm._close()
    return DPSGDResult(report=report, steps=done)
