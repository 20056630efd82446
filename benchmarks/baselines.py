"""Baselines vs DP-RDM at equal (epsilon, delta) (SPEC §9, §10): DP-LDM, DP-LoRA and DPAgg-TI.

Same data and metric as ``benchmarks/utility.py``: the embedded ``dprdm-mini`` bundle (trained on
public shapes only) is adapted to the PRIVATE demo corpus (``mini_data.make_split(n,
(PRIVATE_STYLE,), seed=utility.PRIVATE_SEED)``: striped shapes on dotted backgrounds, a style
absent from the public data), then draws images for the held-out content-only prompts, scored by
``utility.score_images`` (the judge of ``models/quality.py``: content accuracy, private-style rate,
content-and-style, Fréchet distance to the private corpus).

* Training captions are the content-only prompts of each private image ("a red circle"): the
  style must come from the private data, as in DP-RDM.
* The bundle's UNet is conditioned on its text tower's embedding of the prompt (DP-RDM's
  public-only path, lambda = 0); ``public-only`` below is that base model without adaptation.
* DP-SGD runs (dp-ldm, dp-lora) calibrate the noise multiplier for (q, steps) to each epsilon;
  DPAgg-TI inverts each private image once (each inversion depends on one record only) and draws
  fresh Poisson coins and noise per epsilon.
* DP randomness is seeded here (``production=False``) for a reproducible benchmark.

Run: ``python benchmarks/baselines.py --threads 2 --out benchmarks/results/baselines.json``.
``--smoke`` runs the pipeline on a tiny random backbone in a minute (numbers meaningless).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="dprdm-mini")
    p.add_argument("--methods", nargs="+", default=["dp-ldm", "dp-lora", "dpagg-ti"])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--private-size", type=int, default=1000)
    p.add_argument("--dpsgd-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=100, help="expected logical batch (q = batch / N)")
    p.add_argument("--physical-batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--multiplicity", type=int, default=2)
    p.add_argument("--ti-images", type=int, default=200, help="records inverted for DPAgg-TI (q = 1 over them)")
    p.add_argument("--ti-steps", type=int, default=30)
    p.add_argument("--per-prompt", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--judge-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny random backbone and data: checks the plumbing only")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "baselines.json")
    return p.parse_args(argv)


def _utility_module() -> object:
    """``benchmarks/utility.py`` (the DP-RDM utility benchmark), imported by path for its metric."""
    path = ROOT / "utility.py"
    spec = importlib.util.spec_from_file_location("dprdm_bench_utility", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"the DP-RDM utility benchmark {path} is required for its metric")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(backbone: object, prompts: list[str], steps: int, seed: int, inject: object = None) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(prompts), 64):
        inj = None if inject is None else inject[None].repeat(len(prompts[i:i + 64]), 1)
        ims = backbone.sample(prompts[i:i + 64], steps=steps, generator=torch.Generator().manual_seed(seed + i),
                              inject=inj)
        out += [np.asarray(im.convert("RGB").resize((24, 24))) for im in ims]
    return np.stack(out)


def _train(method: str, eps: float, base: object, data: object, a: argparse.Namespace, rng: np.random.Generator,
           ti_cache: dict[str, object]) -> tuple[object, object, object]:
    """Returns (adapted backbone, privacy report, injected embedding or None)."""
    from dprdm.baselines import dp_ldm, dp_lora, dpagg_ti
    from dprdm.baselines.accounting import PrivacyReport, calibrate_noise_multiplier
    from dprdm.baselines.dpsgd import DPSGDConfig, noise_source

    bb = dataclasses.replace(base, unet=copy.deepcopy(base.unet))
    if method == "dpagg-ti":
        import torch

        s = dpagg_ti.TISettings(epsilon=eps, delta=a.delta, steps=a.ti_steps, batch=50, clip_norm=a.clip_norm,
                                template="{caption} in the style of *")
        from dprdm.baselines.data import ImageSet

        n = min(a.ti_images, len(data))
        data = ImageSet(data.pixels[:n], data.captions[:n])
        if "emb" not in ti_cache:  # one inversion per record, reused across epsilons (depends on that record only)
            ti_cache["init"] = bb.conditioner.word_embedding(s.init_word)
            ti_cache["emb"] = dpagg_ti.invert_images(bb, data, np.arange(n), s, ti_cache["init"], seed=a.seed)
        z = calibrate_noise_multiplier(q=1.0, steps=1, epsilon=eps, delta=a.delta)
        keep = torch.from_numpy(np.flatnonzero(rng.random(n) < 1.0))
        emb = dpagg_ti.aggregate(ti_cache["emb"][keep], ti_cache["init"], clip_norm=a.clip_norm, noise_multiplier=z,
                                 expected_count=float(n), mode="normalize", rng=rng)
        report = PrivacyReport.build(method=method, epsilon_target=eps, delta=a.delta, q=1.0, noise_multiplier=z,
                                     steps=1, clip_norm=a.clip_norm, public_size=n,
                                     noise_source=noise_source(rng, False), production=False)
        return bb, report, emb
    cfg = DPSGDConfig(epsilon=eps, delta=a.delta, batch_size=a.batch_size, steps=a.dpsgd_steps, clip_norm=a.clip_norm,
                      lr=a.lr, max_physical_batch=a.physical_batch,
                      multiplicity=a.multiplicity if method == "dp-lora" else 1)
    if method == "dp-ldm":
        res, _ = dp_ldm.train_dp_ldm(bb, data, cfg, seed=a.seed, rng=rng, production=False, log=_log)
    else:
        res, _ = dp_lora.train_dp_lora(bb, data, cfg, dp_lora.LoraSettings(rank=a.rank, alpha=float(a.rank)),
                                       seed=a.seed, rng=rng, production=False, log=_log)
    return bb, res.report, None


def _log(msg: str) -> None:
    print(f"[baselines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _setup(a: argparse.Namespace) -> tuple[object, object, object, list[str], np.ndarray, np.ndarray, object]:
    """Backbone, private ImageSet, scorer, prompts, targets, private features, utility module."""
    import torch

    from dprdm.baselines.backbone import load_backbone
    from dprdm.baselines.data import ImageSet
    from dprdm.models import mini_data as md

    util = _utility_module()
    private = md.make_split(a.private_size, (md.PRIVATE_STYLE,), seed=util.PRIVATE_SEED)
    captions = [md.content_prompt(md.SHAPES[s], list(md.COLOURS)[c]) for s, c in private.labels[:, :2]]
    pixels = torch.from_numpy(private.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    prompts = md.heldout_prompts()
    texts = [p for p, _, _ in prompts for _ in range(a.per_prompt)]
    targets = np.array([(s, c) for _, s, c in prompts for _ in range(a.per_prompt)])
    if a.smoke:
        import tempfile

        from dprdm.baselines.tiny import write_tiny_backbone

        backbone = load_backbone(write_tiny_backbone(Path(tempfile.mkdtemp()) / "bb", size=8))
        pixels = torch.nn.functional.interpolate(pixels, size=8, mode="area")
        return backbone, ImageSet(pixels, captions), None, texts, targets, None, util
    from dprdm.models.quality import train_judge
    from dprdm.models.registry import load_bundle

    backbone = load_backbone(f"bundle:{a.bundle}")
    enc = load_bundle(a.bundle).encoder
    judge, jscores = train_judge(steps=a.judge_steps)
    _log(f"judge held-out accuracy: {jscores}")

    private_feats = enc.encode_pixels(private.images)

    def score(images: np.ndarray) -> dict[str, float]:
        return util.score_images(md.PRIVATE_STYLE, judge, enc, images, targets, private_feats)

    return backbone, ImageSet(pixels.contiguous(), captions), score, texts, targets, jscores, util


def main(argv: list[str] | None = None) -> int:
    """Train every baseline at every epsilon, score it, write JSON and print a table. Returns 0."""
    import torch

    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    base, data, score, texts, _targets, jscores, _util = _setup(a)
    rng = np.random.default_rng(a.seed)
    rows = []
    conds: list[tuple[str, float | None]] = [("public-only", 0.0)]
    conds += [(m, e) for m in a.methods for e in a.epsilons]
    ti_cache: dict[str, object] = {}
    for method, eps in conds:
        t1 = time.time()
        if method == "public-only":
            bb, report, emb = base, None, None
        else:
            bb, report, emb = _train(method, eps, base, data, a, rng, ti_cache)
        t_train = time.time() - t1
        prompts = [f"{p} in the style of *" for p in texts] if emb is not None else texts
        images = _images(bb, prompts, a.sample_steps, a.seed, emb)
        row: dict[str, object] = {"method": method, "epsilon": eps, "train_seconds": round(t_train, 1)}
        if report is not None:
            row.update({"epsilon_accounted": report.epsilon, "noise_multiplier": report.noise_multiplier,
                        "q": report.sample_rate, "steps": report.steps})
        row.update(score(images) if score is not None else {"mean_pixel": float(images.mean())})
        rows.append(row)
        _log(json.dumps(row))
    result = {"bundle": a.bundle if not a.smoke else "tiny-random (smoke)", "delta": a.delta,
              "private_size": a.private_size, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(a).items()},
              "judge_heldout_accuracy": None if jscores is None else jscores.__dict__, "rows": rows,
              "seconds": time.time() - t0, "command": "python benchmarks/baselines.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    cols = [c for c in ("method", "epsilon", "content_acc", "private_style_rate", "content_and_style",
                        "fd_to_private", "mean_pixel", "noise_multiplier", "train_seconds") if c in rows[0] or
            c in rows[-1]]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{(f'{r[c]:.3f}' if isinstance(r.get(c), float) else str(r.get(c, '-'))):>18}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
