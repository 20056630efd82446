"""``dprdm baseline train|sample``: the DP fine-tuning baselines from the command line.

    dprdm baseline train --method dp-ldm|dp-lora|dpagg-ti --model MODEL --data DIR \\
        --epsilon E --delta D --out OUT [--public-size N] [method options]
    dprdm baseline sample --model OUT --prompt "a red circle" [--n 4] [--steps 50] --out IMAGES

MODEL is a diffusers directory (``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``,
optional ``vae/``) or ``bundle:NAME`` (e.g. ``bundle:dprdm-mini``). DP coins and noise come from
ChaCha20 keyed from os.urandom; ``--insecure-dp-seed`` replaces it with a seeded generator for
reproducible experiments and the privacy report then says the run is NOT a private release.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .args import CliError

__all__ = ["register", "run_train", "run_sample"]


def _cli_error(msg: str) -> Exception:
    return CliError(msg)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``baseline`` with sub-commands ``train`` and ``sample`` (``func`` returns the exit status)."""
    p = subparsers.add_parser("baseline", help="train and sample the DP fine-tuning baselines (SPEC §9)")
    sub = p.add_subparsers(dest="baseline_command", metavar="SUBCOMMAND", required=True)
    t = sub.add_parser("train", help="train a baseline at a target (epsilon, delta)")
    t.add_argument("--method", required=True, choices=("dp-ldm", "dp-lora", "dpagg-ti"))
    t.add_argument("--model", required=True, help="diffusers directory or bundle:NAME")
    t.add_argument("--data", required=True, type=Path, help="folder of private images (+ metadata.jsonl captions)")
    t.add_argument("--epsilon", required=True, type=float)
    t.add_argument("--delta", required=True, type=float, help="must be < 1/N̄")
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--public-size", type=int, default=None, help="declared public size N̄ >= N (default N)")
    t.add_argument("--clip-norm", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0, help="training randomness (t, diffusion noise); never DP noise")
    t.add_argument("--insecure-dp-seed", type=int, default=None,
                   help="seed the DP coins and noise (experiments only: the release is NOT private)")
    t.add_argument("--placeholder", default="*", help="textual-inversion placeholder word (one token)")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    g = t.add_argument_group("DP-SGD (dp-ldm, dp-lora)")
    g.add_argument("--steps", type=int, default=100, help="logical DP-SGD steps")
    g.add_argument("--batch-size", type=int, default=16, help="expected logical batch (q = batch / N̄)")
    g.add_argument("--max-physical-batch", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--from-depth", type=int, default=0, help="train only UNet blocks at this depth or deeper")
    g.add_argument("--multiplicity", type=int, default=1, help="dp-lora noise multiplicity m")
    g.add_argument("--rank", type=int, default=4, help="dp-lora rank")
    g.add_argument("--alpha", type=float, default=4.0, help="dp-lora alpha")
    led = t.add_argument_group("privacy domain ledger (SPEC §3: every release on the domain charges ONE ledger)")
    led.add_argument("--ledger", default=None,
                     help="the domain's ledger: the server's data_dir/ledger.sqlite3, or its [ledger] url "
                          "(postgresql://...); charged before output")
    led.add_argument("--domain", default=None, help="privacy domain (corpus id) of --data; needed with --ledger")
    a = t.add_argument_group("DPAgg-TI")
    a.add_argument("--sample-rate", type=float, default=1.0, help="Poisson rate q of the aggregate")
    a.add_argument("--ti-steps", type=int, default=50)
    a.add_argument("--ti-lr", type=float, default=5e-2)
    a.add_argument("--ti-batch", type=int, default=8)
    a.add_argument("--template", default="{caption} in the style of *")
    a.add_argument("--init-word", default="style")
    a.add_argument("--mode", choices=("normalize", "clip"), default="normalize")
    t.set_defaults(func=run_train)
    s = sub.add_parser("sample", help="generate images with a trained baseline")
    s.add_argument("--model", required=True, type=Path, help="directory written by 'baseline train'")
    s.add_argument("--prompt", required=True, action="append", help="repeatable")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=None, help="sampler seed (diffusion noise only)")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    s.set_defaults(func=run_sample)


def _log(msg: str) -> None:
    print(f"[baseline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _dp_rng(args: argparse.Namespace) -> tuple[Any, bool]:
    import numpy as np

    from dprdm.privacy import new_dp_generator

    if args.insecure_dp_seed is None:
        return new_dp_generator(), True
    _log("WARNING: --insecure-dp-seed: DP noise is reproducible, the result is NOT a private release")
    return np.random.default_rng(args.insecure_dp_seed), False


def run_train(args: argparse.Namespace) -> int:
    """Train one baseline and write its directory. Returns 0.

    Raises:
        CliError: on a bad path, setting or budget (the message names it).
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(args)
    except (ValueError, FileNotFoundError) as exc:
        raise _cli_error(str(exc)) from None


def _train(args: argparse.Namespace) -> int:
    from dprdm.baselines.artifacts import fingerprint, write_baseline
    from dprdm.baselines.backbone import load_backbone
    from dprdm.baselines.data import load_image_dir

    backbone = load_backbone(args.model, args.placeholder)
    base = fingerprint(backbone.unet)
    data = load_image_dir(args.data, backbone.image_size)
    rng, production = _dp_rng(args)
    spec = args.model if str(args.model).startswith("bundle:") else str(Path(args.model).resolve())
    settings: dict[str, Any] = {"placeholder": args.placeholder, "seed": args.seed}
    _log(f"{args.method}: {len(data)} records, target epsilon {args.epsilon} at delta {args.delta}")
    stores: list[Any] = []  # the ledger's "mark released" callback, set by the charge

    def charge(report: Any) -> None:  # runs before any private record is read
        if args.ledger is not None:
            stores.append(_charge_ledger(args, report))

    if args.method == "dpagg-ti":
        from dprdm.baselines.dpagg_ti import TISettings, train_dpagg_ti

        ti = TISettings(epsilon=args.epsilon, delta=args.delta, sample_rate=args.sample_rate,
                        clip_norm=args.clip_norm, steps=args.ti_steps, lr=args.ti_lr, batch=args.ti_batch,
                        template=args.template, init_word=args.init_word, mode=args.mode,
                        public_size=args.public_size)
        res = train_dpagg_ti(backbone, data, ti, seed=args.seed, rng=rng, production=production, log=_log,
                             charge=charge)
        report, tensors = res.report, {"embedding": res.embedding, "init": res.init}
        settings["ti"] = ti.to_dict()
    else:
        from dprdm.baselines.dpsgd import DPSGDConfig

        cfg = DPSGDConfig(epsilon=args.epsilon, delta=args.delta, batch_size=args.batch_size, steps=args.steps,
                          clip_norm=args.clip_norm, lr=args.lr, max_physical_batch=args.max_physical_batch,
                          multiplicity=args.multiplicity, public_size=args.public_size)
        if args.method == "dp-ldm":
            from dprdm.baselines.dp_ldm import train_dp_ldm

            if args.multiplicity != 1:
                raise ValueError(f"--multiplicity applies to dp-lora only; found {args.multiplicity}")
            result, names = train_dp_ldm(backbone, data, cfg, from_depth=args.from_depth, seed=args.seed, rng=rng,
                                         production=production, log=_log, charge=charge)
        else:
            from dprdm.baselines.dp_lora import LoraSettings, train_dp_lora

            lora = LoraSettings(rank=args.rank, alpha=args.alpha, from_depth=args.from_depth)
            result, names = train_dp_lora(backbone, data, cfg, lora, seed=args.seed, rng=rng,
                                          production=production, log=_log, charge=charge)
            settings["lora"] = lora.to_dict()
        params = dict(backbone.unet.named_parameters())
        report, tensors = result.report, {n: params[n] for n in names}
        settings["dpsgd"] = {"batch_size": cfg.batch_size, "steps": cfg.steps, "clip_norm": cfg.clip_norm,
                             "lr": cfg.lr, "max_physical_batch": cfg.max_physical_batch,
                             "multiplicity": cfg.multiplicity, "from_depth": args.from_depth}
    out = write_baseline(args.out, method=args.method, backbone_spec=spec, base_fingerprint=base, tensors=tensors,
                         report=report, settings=settings)
    for store in stores:
        store(out)
    summary = {"out": str(out), "method": args.method, "epsilon": report.epsilon, "delta": report.delta,
               "noise_multiplier": report.noise_multiplier, "sample_rate": report.sample_rate,
               "steps": report.steps, "production": report.production}
    print(json.dumps(summary))
    return 0


def _charge_ledger(args: argparse.Namespace, report: Any) -> Any:
    """Charge the run's RDP curve to the privacy domain's ledger BEFORE training reads any record.

    The charge depends only on public inputs (method, q, steps, noise multiplier), so a refusal
    leaks nothing and trains nothing; a crash after the charge loses no committed charge (never
    refunded), and nothing derived from the private data (not even a training loss) is logged. Only a Rényi-filter budget may take a baseline's charge: a single-profile budget's
    admission rule assumes every spend is the same retrieval profile.

    Returns:
        A callable marking the spend released once the artifact is written (``store(out)``).

    Raises:
        ValueError: no --domain, a single-profile budget, or a refusal (budget exhausted).
    """
    import hashlib
    import uuid

    import numpy as np

    from dprdm.ledger import open_ledger
    from dprdm.ledger.api import LedgerError
    from dprdm.privacy import DEFAULT_ORDERS
    from dprdm.privacy.accountant import curve_from_json

    if not args.domain:
        raise ValueError("--ledger needs --domain (the privacy domain of --data)")
    if not report.production:
        raise ValueError("--insecure-dp-seed runs are not private releases; they cannot be charged to a ledger")
    orders = [float(a) for a in report.accountant["orders"]]
    if orders != [float(a) for a in DEFAULT_ORDERS]:
        raise ValueError("the privacy report's order grid is not the ledger's (DEFAULT_ORDERS)")
    curve = curve_from_json(report.accountant["rdp"])
    try:
        ledger = open_ledger(args.ledger)
    except LedgerError as exc:
        raise ValueError(f"cannot open the ledger: {exc}") from None
    try:
        state = ledger.budget_state(args.domain)
        if state.budget.filter_order is None:
            raise ValueError(
                f"the budget of domain {args.domain!r} serves a single retrieval profile; a baseline can be "
                f"charged only to a Rényi-filter budget (rule = \"filter\")"
            )
        request_id = f"baseline-{uuid.uuid4().hex}"
        res = ledger.reserve(
            domain=args.domain, tenant=f"baseline:{args.method}", request_id=request_id,
            binding_hash=hashlib.sha256(json.dumps(report.accountant, sort_keys=True).encode()).hexdigest(),
            profile={"name": args.method, "q": report.sample_rate, "noise_multiplier": report.noise_multiplier,
                     "steps": report.steps},
            charge_rdp=curve,
        )
    except LedgerError as exc:
        ledger.close()
        raise ValueError(f"ledger refused the charge: {exc}") from None
    _log(f"charged domain {args.domain!r}: spend {res.spend_id}, epsilon spent {res.state.epsilon_spent:.4f}")

    def store(out: Path) -> None:
        try:
            ledger.store_release(res.spend_id, np.zeros(0))  # the ledger stored the receipt at reserve
        finally:
            ledger.close()

    return store


def run_sample(args: argparse.Namespace) -> int:
    """Generate ``--n`` images per prompt into ``--out``. Returns 0.

    Raises:
        CliError: on a bad directory, prompt or setting.
    """
    import torch

    from dprdm.baselines.artifacts import load_baseline

    if not 1 <= args.n <= 64:
        raise _cli_error(f"--n must be in [1, 64]; found {args.n}")
    try:
        backbone, meta, report, embedding = load_baseline(args.model)
        prompts = [p for p in args.prompt for _ in range(args.n)]
        inject = None
        if embedding is not None:
            template = meta["settings"]["ti"]["template"].replace("{caption}", "{prompt}")
            ph = backbone.conditioner.placeholder
            prompts = [p if ph in p.split() else template.format(prompt=p).strip() for p in prompts]
            inject = embedding[None].repeat(len(prompts), 1)
        seed = args.seed if args.seed is not None else int(torch.seed() % (2**63))
        images = backbone.sample(prompts, steps=args.steps, generator=torch.Generator().manual_seed(seed),
                                 guidance_scale=args.guidance_scale, inject=inject)
    except (ValueError, FileNotFoundError) as exc:
        raise _cli_error(str(exc)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        path = args.out / f"{i:04d}.png"
        img.save(path)
        paths.append({"file": str(path), "prompt": prompt})
    print(json.dumps({"images": paths, "epsilon": report.epsilon, "delta": report.delta, "seed": seed}))
    return 0
