"""Utility benchmark (SPEC §10): quality of generated images vs epsilon, on the embedded default bundle.

For held-out prompts (phrasings never used in training, content only: "a picture of a red circle"),
each prompt's query u retrieves from the PRIVATE demo corpus (striped shapes on dotted
backgrounds, a style combination absent from the public training data) with the real mechanism
(``dprdm.index.subsampled_topk`` + ``dprdm.privacy.release``), and the default decoder draws one
image per release. Conditions:

- ``public-only``: lambda = 0 (c = u; no retrieval, charged 0);
- ``non-private``: sigma = 0, q = 1 (epsilon = inf; allowed only on this non-private demo data);
- ``dp-eps{1,3,10}``: Poisson-subsampled profile (k, q, lambda fixed a priori) with sigma calibrated
  by ``dprdm.privacy.calibrate_sigma`` for T = 1,000 queries at the given delta.

Metrics: (a) a judge (``dprdm.models.quality``) trained on labelled public- and private-style
images scores prompt match (shape, colour) and the private style (striped AND dotted);
(b) Fréchet distance in the image tower's feature space to the private corpus.

Run: ``python benchmarks/utility.py --out utility.json --report-md models/weights/QUALITY.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PRIVATE_SEED = 2
REFERENCE_SEED = 3
PROXY_SEED = 4
PROXY_STYLE = ("striped", "brick")  # public: a stand-in private domain for tuning (k, q, lambda)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="dprdm-mini", help="bundle name or JSON path (default dprdm-mini)")
    p.add_argument("--private-size", type=int, default=4000)
    p.add_argument("--per-prompt", type=int, default=4, help="releases (= images) per held-out prompt")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--q", type=float, default=0.05)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--queries", type=int, default=1000, help="T, the number of queries the budget covers")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and (non-production) DP coins")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--judge-steps", type=int, default=600)
    p.add_argument(
        "--judge-cache", type=Path, default=None, help="load/save the judge here (evaluation only)"
    )
    p.add_argument(
        "--proxy",
        action="store_true",
        help="tune on a PUBLIC proxy domain instead: corpus = public (striped, brick) images (seed 4)",
    )
    p.add_argument("--out", type=Path, default=Path("utility.json"))
    p.add_argument("--report-md", type=Path, default=None)
    p.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (rows: conditions)")
    return p.parse_args(argv)


def conditions(a: argparse.Namespace) -> list[tuple[str, object, float]]:
    """The benchmark's conditions ``(name, Profile, epsilon)`` for ``a.k``, ``a.q``, ``a.lam``,
    ``a.delta``, ``a.queries`` and ``a.epsilons`` (shared with ``benchmarks/fidelity.py``)."""
    from dprdm.privacy import calibration
    from dprdm.privacy.mechanism import Profile

    out: list[tuple[str, object, float]] = [
        ("public-only", Profile(k=a.k, q=a.q, sigma=0.0, lam=0.0), 0.0),
        ("non-private", Profile(k=a.k, q=1.0, sigma=0.0, lam=a.lam), float("inf")),
    ]
    for eps in a.epsilons:
        sigma = calibration.calibrate_sigma(epsilon=eps, delta=a.delta, queries=a.queries, k=a.k, q=a.q)
        out.append((f"dp-eps{eps:g}", Profile(k=a.k, q=a.q, sigma=sigma, lam=a.lam), eps))
    return out


def _judge(a: argparse.Namespace) -> tuple[object, object]:
    import torch

    from dprdm.models.quality import Judge, JudgeScores, train_judge

    if a.judge_cache and a.judge_cache.is_file():
        blob = torch.load(a.judge_cache, weights_only=True)
        judge = Judge()
        judge.load_state_dict(blob["state"])
        return judge.eval(), JudgeScores(**blob["scores"])
    judge, scores = train_judge(steps=a.judge_steps)
    if a.judge_cache:
        torch.save({"state": judge.state_dict(), "scores": scores.__dict__}, a.judge_cache)
    return judge, scores


def releases(
    profile: object, queries: np.ndarray, vectors: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One release per query: ``subsampled_topk`` over ``vectors`` (flat, N̄ = N, stored on the
    float32 grid) then the float-noise ``release`` (shared with ``benchmarks/fidelity.py``).

    Returns:
        ``(len(queries), d)`` float32 releases.
    """
    from dprdm.index import FlatLayout, subsampled_topk
    from dprdm.index.search import quantize_store
    from dprdm.privacy.mechanism import release

    stored = quantize_store(vectors, "float32")
    layout = FlatLayout(public_size=len(stored))
    ids = np.arange(len(stored), dtype=np.int64)
    rows = []
    for u in queries:
        if profile.lam == 0:
            rows.append(release(profile, query=u, selected=np.zeros((0, len(u))), rng=rng))
            continue
        nb = subsampled_topk(stored, ids, layout, u, k=profile.k, q=profile.q, rng=rng)
        rows.append(release(profile, query=u, selected=nb.vectors, rng=rng))
    return np.asarray(rows, np.float32)


def _generate(gen: object, conds: np.ndarray, steps: int, seed: int) -> np.ndarray:
    images = []
    for i in range(0, len(conds), 64):
        images += gen.generate_many(conds[i : i + 64], steps=steps, seed=seed + i)
    return np.stack([np.asarray(im.convert("RGB").resize((24, 24))) for im in images])


def score_images(
    domain: tuple[str, str],
    judge: object,
    encoder: object,
    images: np.ndarray,
    targets: np.ndarray,
    private_feats: np.ndarray,
) -> dict[str, float]:
    """The utility metric shared with ``benchmarks/baselines.py``.

    Args:
        domain: the private domain's (fill, background) names, e.g. ``md.PRIVATE_STYLE``.
        judge: has ``predict(images) -> (n, 4)`` labels (shape, colour, fill, background).
        encoder: has ``encode_pixels(images)`` (the image tower's features).
        images: generated images, (n, 24, 24, 3) uint8.
        targets: the prompts' (shape, colour) labels, (n, 2).
        private_feats: image-tower features of the private corpus (the Fréchet reference).
    """
    from dprdm.models import mini_data as md
    from dprdm.models.quality import frechet_distance

    style = (md.FILLS.index(domain[0]), md.BACKGROUNDS.index(domain[1]))
    pred = judge.predict(images)
    shape_ok = pred[:, 0] == targets[:, 0]
    colour_ok = pred[:, 1] == targets[:, 1]
    style_ok = (pred[:, 2] == style[0]) & (pred[:, 3] == style[1])
    return {
        "shape_acc": float(shape_ok.mean()),
        "colour_acc": float(colour_ok.mean()),
        "content_acc": float((shape_ok & colour_ok).mean()),
        "fill_rate": float((pred[:, 2] == style[0]).mean()),
        "background_rate": float((pred[:, 3] == style[1]).mean()),
        "private_style_rate": float(style_ok.mean()),
        "content_and_style": float((shape_ok & colour_ok & style_ok).mean()),
        "fd_to_private": frechet_distance(encoder.encode_pixels(images), private_feats),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; writes JSON (and optionally Markdown and a contact sheet). Returns 0."""
    import torch

    from dprdm.models import mini_data as md
    from dprdm.models.quality import frechet_distance
    from dprdm.models.registry import load_bundle
    from dprdm.privacy.rng import make_dp_generator

    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_bundle(a.bundle)
    enc, gen = bundle.encoder, bundle.generator
    domain = PROXY_STYLE if a.proxy else md.PRIVATE_STYLE
    private = md.make_split(a.private_size, (domain,), seed=PROXY_SEED if a.proxy else PRIVATE_SEED)
    vectors = enc.encode_pixels(private.images)
    judge, jscores = _judge(a)
    print(f"judge held-out accuracy: {jscores}", file=sys.stderr)
    prompts = md.heldout_prompts()
    texts = [p for p, _, _ in prompts for _ in range(a.per_prompt)]
    targets = np.array([(s, c) for _, s, c in prompts for _ in range(a.per_prompt)])
    queries = enc.encode_texts(texts).astype(np.float64)
    reference = {
        "real_private_heldout": md.make_split(len(texts), (domain,), seed=REFERENCE_SEED).images,
        "real_public": md.make_split(len(texts), md.PUBLIC_STYLES, seed=REFERENCE_SEED).images,
    }
    results = {
        "reference_fd": {k: frechet_distance(enc.encode_pixels(v), vectors) for k, v in reference.items()}
    }
    rng = make_dp_generator(production=False, seed=a.seed)
    rows, sheet = [], []
    for name, profile, eps in conditions(a):
        conds = releases(profile, queries, vectors, rng)
        images = _generate(gen, conds, a.steps, a.seed)
        row = {
            "condition": name,
            "epsilon": eps,
            "k": profile.k,
            "q": profile.q,
            "sigma": profile.sigma,
            "lam": profile.lam,
            "noise_norm": profile.sigma * np.sqrt(enc.dimension),
        }
        row.update(score_images(domain, judge, enc, images, targets, vectors))
        rows.append(row)
        sheet.append(images[:: a.per_prompt][:16])
        print(json.dumps(row), file=sys.stderr, flush=True)
    results.update(
        {
            "bundle": bundle.name,
            "domain": "public proxy (striped, brick)" if a.proxy else "private (striped, dotted)",
            "encoder": enc.identity.to_dict(),
            "private_size": a.private_size,
            "prompts": len(prompts),
            "images_per_condition": len(texts),
            "delta": a.delta,
            "queries_T": a.queries,
            "steps": a.steps,
            "seed": a.seed,
            "judge_heldout_accuracy": jscores.__dict__,
            "conditions": rows,
            "seconds": time.time() - t0,
            "command": "python benchmarks/utility.py " + " ".join(sys.argv[1:]),
        }
    )
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(rows)
    if a.report_md:
        a.report_md.write_text(_markdown(results))
    if a.sheet:
        _save_sheet(sheet, a.sheet)
    return 0


_COLS = (
    "condition",
    "sigma",
    "content_acc",
    "shape_acc",
    "colour_acc",
    "fill_rate",
    "background_rate",
    "private_style_rate",
    "content_and_style",
    "fd_to_private",
)


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict[str, object]]) -> None:
    print(" | ".join(f"{c:>18}" for c in _COLS))
    for r in rows:
        print(" | ".join(f"{_fmt(r[c]):>18}" for c in _COLS))


def _markdown(res: dict[str, object]) -> str:
    lines = [
        "# dprdm-mini quality report (generated by benchmarks/utility.py)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Private corpus: {res['private_size']} images (striped on dotted); "
        f"{res['prompts']} held-out prompts, "
        f"{res['images_per_condition']} releases/images per condition; delta = {res['delta']}, "
        f"T = {res['queries_T']}; {res['steps']} DDIM steps; seed {res['seed']}.",
        "",
        f"Judge held-out accuracy on real images: {res['judge_heldout_accuracy']}",
        "",
        f"Reference FD to the private corpus: {res['reference_fd']}",
        "",
        "| " + " | ".join(_COLS) + " |",
        "|" + "---|" * len(_COLS),
    ]
    for r in res["conditions"]:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in _COLS) + " |")
    lines += [
        "",
        "content_acc: judge says shape AND colour match the prompt (chance 0.0625). fill_rate / "
        "background_rate: judged to carry the domain's fill / background; private_style_rate: both; "
        "content_and_style: all four. fd_to_private: Frechet distance in the image tower's 32-d space.",
        "",
    ]
    return "\n".join(lines)


def _save_sheet(sheet: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    rows = [np.concatenate(list(block), axis=1) for block in sheet]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


if __name__ == "__main__":
    raise SystemExit(main())
