"""The exact Poisson-subsampled k-NN: distribution, strict order, padding, determinism."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
from oracles import naive_subsampled_topk
from scipy import stats

from dprdm.index import search as S
from dprdm.index.ivf import place_records
from dprdm.index.layouts import FlatLayout, IvfLayout
from dprdm.index.search import (
    exact_scores,
    poisson_positions,
    quantize_query,
    quantize_store,
    subsampled_topk,
    subsampled_topk_batch,
)
from dprdm.index.storage import FILLER_ID, pad_flat
from dprdm.index.testing import random_unit_vectors

P_MIN = 1e-4  # seeded tests: a false alarm would be deterministic, so keep the level strict


def _store(n: int, d: int, seed: int = 0, dtype: str = "float32"):
    x = quantize_store(random_unit_vectors(n, d, seed), dtype)
    return x, np.arange(n, dtype=np.int64) * 7 + 3  # ids ascending with storage order


def _flat(x, ids, nbar):
    """Padded flat storage (records, then public filler to N̄) and its layout."""
    px, pids = pad_flat(x, ids, nbar)
    return px, pids, FlatLayout(public_size=nbar)


def _ivf(x, ids, lists, caps, cents, nprobe):
    """Padded IVF storage under the overflow rule (records given in ascending id order)."""
    src, _sizes = place_records(lists, caps)
    px = np.concatenate([x, np.zeros((1, x.shape[1]), x.dtype)])[src]  # src -1 -> a zero filler row
    pids = np.where(src >= 0, ids[np.maximum(src, 0)], FILLER_ID)
    return px, pids, IvfLayout(centroids=cents, capacities=np.asarray(caps), nprobe=nprobe)


class _CountingRng:
    """Duck-typed generator that counts uniforms drawn (work must not depend on private data)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.drawn = 0

    def random(self, n: int) -> np.ndarray:
        self.drawn += n
        return self.rng.random(n)


# -- the geometric-gap sampler ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 2])
def test_positions_match_iid_bernoulli_pattern_law(monkeypatch, chunk):
    if chunk is not None:  # force many rounds of the walk
        monkeypatch.setattr(S, "_chunk_size", lambda expected: chunk)
    n, q, trials = 5, 0.35, 20000
    rng = np.random.default_rng(1)
    counts = Counter(tuple(poisson_positions(n, q, rng)) for _ in range(trials))
    patterns = [tuple(i for i in range(n) if mask >> i & 1) for mask in range(2**n)]
    expected = np.array([q ** len(p) * (1 - q) ** (n - len(p)) for p in patterns]) * trials
    observed = np.array([counts.get(p, 0) for p in patterns])
    assert sum(observed) == trials  # nothing outside range(n), always sorted & unique
    assert stats.chisquare(observed, expected).pvalue > P_MIN


def test_positions_edge_cases():
    rng = np.random.default_rng(0)
    assert poisson_positions(0, 0.5, rng).size == 0
    assert np.array_equal(poisson_positions(7, 1.0, rng), np.arange(7))
    big = poisson_positions(10**6, 0.01, rng)
    assert np.all(np.diff(big) > 0) and big[0] >= 0 and big[-1] < 10**6
    assert abs(big.size - 10**4) < 6 * 100
    # the walk reaches the end: the last tenth of the slots is sampled like the first
    assert abs(np.count_nonzero(big >= 900_000) - np.count_nonzero(big < 100_000)) < 6 * 45
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="q must be in"):
            poisson_positions(10, bad, rng)


def test_work_depends_only_on_public_sizes():
    a, ida, layout = _flat(*_store(50, 8, seed=1), 400)
    b, idb, tiny = _flat(*_store(3, 8, seed=2), 400)
    for seed in range(5):
        r1, r2 = _CountingRng(seed), _CountingRng(seed)
        subsampled_topk(a, ida, layout, a[0], k=4, q=0.05, rng=r1)
        subsampled_topk(b, idb, tiny, a[0], k=4, q=0.05, rng=r2)
        assert r1.drawn == r2.drawn


# -- selection law vs the naive method -------------------------------------------------------


def _ranked(x, ids, query):
    qhat = quantize_query(query, x.shape[1])
    sc = exact_scores(x, np.arange(x.shape[0]), qhat)
    return [int(ids[i]) for i in np.lexsort((ids, -sc))]


def assert_selection_law_matches_naive(search, x, ids, layout, query, *, k, q, trials, seeds) -> Counter:
    """Two-sample chi-square of the selected id tuples: ``search`` vs the naive sampler (N̄ coins).

    ``search(query, k=, q=, rng=)`` is any backend over ``(x, ids, layout)`` (the host search here,
    the device search in ``test_index_search_device.py``); ``seeds`` seed its generator and the
    naive one.  Tuples seen fewer than 20 times in both runs together are left out of the table.

    Returns:
        The backend's counts of each selected tuple.
    """
    ours, naive = Counter(), Counter()
    r1, r2 = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    for _ in range(trials):
        ours[tuple(search(query, k=k, q=q, rng=r1).ids)] += 1
        naive[tuple(naive_subsampled_topk(x, ids, layout, query, k=k, q=q, rng=r2).ids)] += 1
    keys = [t for t in set(ours) | set(naive) if ours[t] + naive[t] >= 20]
    table = np.array([[ours[t] for t in keys], [naive[t] for t in keys]])
    assert stats.chi2_contingency(table).pvalue > P_MIN
    return ours


def flat_law_case():
    """The flat case of the law tests: 10 records padded to N̄ = 14, d 6, k 3, q 0.3."""
    x0, ids0 = _store(10, 6, seed=3)
    return x0, ids0, *_flat(x0, ids0, 14), random_unit_vectors(1, 6, seed=9)[0]


def ivf_law_case():
    """The IVF case of the law tests: 16 records in 4 lists (capacities sizes + 2), nprobe 2."""
    d = 6
    x0, _ = _store(16, d, seed=4)
    cents = np.eye(d)[:4]
    lists = np.argmax(x0.astype(np.float64) @ cents.T, axis=1)
    ids0 = np.arange(16, dtype=np.int64) * 5
    sizes = np.bincount(lists, minlength=4)
    x, ids, layout = _ivf(x0, ids0, lists, sizes + 2, cents, nprobe=2)
    return ids0, lists, x, ids, layout, cents[0] * 0.6 + cents[1] * 0.8


def test_top1_frequencies_match_exact_law_and_naive():
    k, q, trials = 3, 0.3, 12000
    x0, ids0, x, ids, layout, query = flat_law_case()
    n = x0.shape[0]
    ranked = _ranked(x0, ids0, query)
    search = partial(subsampled_topk, x, ids, layout)
    # the whole selected tuple: two-sample chi-square against the naive method (N̄ coins)
    sets = assert_selection_law_matches_naive(search, x, ids, layout, query, k=k, q=q, trials=trials,
                                              seeds=(11, 12))
    fast = Counter()
    for t, c in sets.items():
        fast[t[0] if t else -1] += c
    # exact law of the top-1: rank r wins with prob q (1-q)^(r-1); none survives with (1-q)^n
    cats = [*ranked, -1]
    exact = np.array([q * (1 - q) ** r for r in range(n)] + [(1 - q) ** n]) * trials
    assert stats.chisquare([fast[c] for c in cats], exact).pvalue > P_MIN
    assert all(c in set(cats) for c in fast)  # never a dummy or -1 id


def test_ivf_selection_matches_naive():
    k, q, trials = 2, 0.4, 6000
    ids0, lists, x, ids, layout, query = ivf_law_case()
    search = partial(subsampled_topk, x, ids, layout)
    c1 = assert_selection_law_matches_naive(search, x, ids, layout, query, k=k, q=q, trials=trials, seeds=(5, 6))
    probed = set(layout.probe(query).tolist())
    allowed = {int(i) for i, li in zip(ids0, lists, strict=True) if li in probed}
    assert all(set(t) <= allowed for t in c1)


# -- strict order, padding, clamping ---------------------------------------------------------


def test_q1_is_exact_topk_with_id_tiebreak():
    base = quantize_store(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0.6, 0.8, 0, 0]]), "float32")
    ids = np.array([40, 10, 20, 30], dtype=np.int64)  # rows 0 and 2 tie exactly; id 20 < 40 first
    res = subsampled_topk(*_flat(base, ids, 9), np.array([1.0, 0, 0, 0]), k=3, q=1.0,
                          rng=np.random.default_rng(0))
    assert res.ids.tolist() == [20, 40, 30]
    assert res.scores[0] == res.scores[1] == 1.0


def test_zero_padding_when_few_survive_and_no_fallback():
    x, ids, lay = _flat(*_store(5, 8), 50)
    res = subsampled_topk(x, ids, lay, x[0], k=16, q=1.0, rng=np.random.default_rng(0))
    assert res.vectors.shape == (5, 8) and res.k == 16  # all 5 real, 45 dummies never chosen
    assert np.allclose(res.aggregate(), res.vectors.sum(0) / 16)
    assert res.padded.shape == (16, 8) and not res.padded[5:].any()  # fixed shape, zero rows
    empty = subsampled_topk(x, ids, lay, x[0], k=4, q=1e-9, rng=np.random.default_rng(1))
    assert empty.vectors.shape == (0, 8) and np.array_equal(empty.aggregate(), np.zeros(8))
    assert -1 not in res.ids


def test_vectors_clamped_in_float64_and_match_ids():
    x = quantize_store(random_unit_vectors(30, 16, 2), "float16")
    ids = np.arange(30, dtype=np.int64)
    res = subsampled_topk(x, ids, FlatLayout(30), x[1].astype(np.float64), k=8, q=0.7,
                          rng=np.random.default_rng(3))
    assert res.vectors.dtype == np.float64
    assert np.all(np.linalg.norm(res.vectors, axis=1) <= 1.0 + 1e-15)
    raw = x[res.ids].astype(np.float64)
    assert np.allclose(res.vectors, raw / np.maximum(1, np.linalg.norm(raw, axis=1))[:, None], atol=0)
    assert np.all(np.diff(res.scores) <= 0)


def test_scores_exact_and_independent_of_batch():
    x, _ = _store(700, 96, seed=5)
    qhat = quantize_query(random_unit_vectors(1, 96, 6)[0], 96)
    full = exact_scores(x, np.arange(700), qhat)
    rng = np.random.default_rng(0)
    for size in (1, 3, 17, 400):
        rows = rng.choice(700, size, replace=False)
        assert np.array_equal(exact_scores(x, rows, qhat), full[rows])  # bitwise
    for r in (0, 123, 699):
        exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x[r], qhat, strict=True))
        assert Fraction(full[r]) == exact


def test_batch_draws_fresh_coins_per_query():
    x, ids = _store(200, 8)
    x, ids, layout = _flat(x, ids, 256)
    qs = np.repeat(x[:1].astype(np.float64), 6, axis=0)
    res = subsampled_topk_batch(x, ids, layout, qs, k=5, q=0.2, rng=np.random.default_rng(0))
    assert len({tuple(r.ids) for r in res}) > 1  # same query, different subsamples
    rngs = [np.random.default_rng(s) for s in range(6)]
    res2 = subsampled_topk_batch(x, ids, layout, qs, k=5, q=0.2, rng=rngs)
    solo = subsampled_topk(x, ids, layout, qs[3], k=5, q=0.2, rng=np.random.default_rng(3))
    assert np.array_equal(res2[3].ids, solo.ids)
    with pytest.raises(ValueError, match="generators for"):
        subsampled_topk_batch(x, ids, layout, qs, k=5, q=0.2, rng=rngs[:2])


def test_validation_and_redacted_repr():
    x, ids = _store(10, 8)
    lay = FlatLayout(10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be"):
        subsampled_topk(x, ids, lay, x[0], k=0, q=0.5, rng=rng)
    with pytest.raises(ValueError, match="shape"):
        subsampled_topk(x, ids, lay, x[0][:4], k=1, q=0.5, rng=rng)
    with pytest.raises(ValueError, match="unit vector"):
        subsampled_topk(x, ids, lay, x[0] * 3, k=1, q=0.5, rng=rng)
    with pytest.raises(ValueError, match="non-finite"):
        subsampled_topk(x, ids, lay, np.full(8, np.nan), k=1, q=0.5, rng=rng)
    res = subsampled_topk(x, ids, lay, x[0], k=3, q=1.0, rng=rng)
    assert "redacted" in repr(res) and str(int(res.ids[0])) not in repr(res).replace("k=3", "")


def test_ivf_padding_and_dummies():
    d = 4
    cents = np.eye(d)
    x = quantize_store(np.array([[1, 0.1, 0, 0], [1, 0, 0.2, 0], [0, 1, 0, 0]]), "float32")
    ids = np.array([1, 2, 3], dtype=np.int64)
    x, ids, layout = _ivf(x, ids, np.array([0, 0, 1]), [5, 4, 3, 3], cents, nprobe=1)
    c = layout.candidates(quantize_query(np.array([1.0, 0, 0, 0]), d))
    assert c.length == 5
    rows = c.rows_for(np.arange(5))
    assert rows.tolist() == [0, 1, 2, 3, 4] and (ids[rows] >= 0).tolist() == [True, True, False, False, False]
    c2 = layout.candidates(quantize_query(np.array([1.0, 0, 0, 0]), d), nprobe=4)
    assert c2.length == 15
    res = subsampled_topk(x, ids, layout, np.array([1.0, 0, 0, 0]), k=3, q=1.0, rng=np.random.default_rng(0),
                          nprobe=2)
    assert res.ids.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="nprobe"):
        layout.candidates(np.zeros(d), nprobe=0)


# -- timing is a release (SPEC §3): reads and work depend on public sizes and coins only -------


class _Probe:
    """Records what the search reads and the shapes it processes (never wall-clock times)."""

    def __init__(self, monkeypatch) -> None:
        self.trace: list[tuple] = []
        scores, topk = S.exact_scores, S._strict_topk

        def rec_scores(vectors, rows, qhat):
            self.trace.append(("rows", rows.copy(), vectors.shape))
            return scores(vectors, rows, qhat)

        def rec_topk(keys, ids, k):
            out = topk(keys, ids, k)
            self.trace.append(("topk", keys.shape, ids.shape, out.shape))
            return out

        monkeypatch.setattr(S, "exact_scores", rec_scores)
        monkeypatch.setattr(S, "_strict_topk", rec_topk)

    def take(self) -> list[tuple]:
        out, self.trace = self.trace, []
        return out


def _same(t1, t2):
    assert len(t1) == len(t2)
    for a, b in zip(t1, t2, strict=True):
        assert a[0] == b[0]
        for u, v in zip(a[1:], b[1:], strict=True):
            assert np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v


def test_flat_reads_and_shapes_identical_for_small_and_full_corpus(monkeypatch):
    nbar, d, k, q = 2000, 8, 6, 0.05
    small = _flat(*_store(nbar // 200, d, seed=1), nbar)
    full = _flat(*_store(nbar, d, seed=2), nbar)
    probe = _Probe(monkeypatch)
    reads = []
    for seed in range(20):
        u = random_unit_vectors(1, d, seed=100 + seed)[0]
        r1 = subsampled_topk(*small, u, k=k, q=q, rng=np.random.default_rng(seed))
        t1 = probe.take()
        r2 = subsampled_topk(*full, u, k=k, q=q, rng=np.random.default_rng(seed))
        t2 = probe.take()
        _same(t1, t2)  # same rows read, same array shapes at every step
        assert r1.padded.shape == r2.padded.shape == (k, d)
        rows = t1[0][1]
        positions = poisson_positions(nbar, q, np.random.default_rng(seed))
        assert np.array_equal(rows, positions)  # slot p is read at row p: dummies are not folded
        reads.append(rows)
    rows = np.concatenate(reads)
    dummy = rows[small[1][rows] < 0]
    assert dummy.size > 0.9 * rows.size and dummy.max() > 0.95 * nbar
    # the small corpus's reads (almost all dummies) are uniform over the whole stored array
    assert stats.kstest(rows / nbar, "uniform").pvalue > P_MIN


def test_ivf_reads_and_shapes_identical_for_different_private_list_sizes(monkeypatch):
    d, k, q = 6, 3, 0.3
    cents = np.eye(d)[:4]
    caps = np.array([30, 20, 25, 10])
    a0, _ = _store(60, d, seed=7)
    ids_a = np.arange(60, dtype=np.int64) * 3
    lists_a = np.argmax(a0.astype(np.float64) @ cents.T, axis=1)
    few = np.array([0, 5, 9])
    a = _ivf(a0, ids_a, lists_a, caps, cents, nprobe=2)
    b = _ivf(a0[few], ids_a[few], lists_a[few], caps, cents, nprobe=2)
    probe = _Probe(monkeypatch)
    for seed in range(10):
        u = random_unit_vectors(1, d, seed=seed)[0]
        subsampled_topk(*a, u, k=k, q=q, rng=np.random.default_rng(seed))
        t1 = probe.take()
        subsampled_topk(*b, u, k=k, q=q, rng=np.random.default_rng(seed))
        _same(t1, probe.take())


def test_strict_topk_matches_lexsort_with_ties_and_dummies():
    rng = np.random.default_rng(0)
    for _ in range(500):
        m, k = int(rng.integers(1, 30)), int(rng.integers(1, 8))
        scores = rng.integers(-3, 3, size=m) / 4.0  # many exact ties
        ids = rng.permutation(1000)[:m].astype(np.int64)
        real = rng.random(m) < 0.6
        ids = np.where(real, ids, FILLER_ID)
        keys = S._selection_keys(scores, real)
        got = S._strict_topk(keys, ids, k)
        want = np.lexsort((ids, -keys))[: min(k, m)]
        assert np.array_equal(keys[got], keys[want]) and np.array_equal(ids[got], ids[want])  # dummies: id -1 ties
        assert np.array_equal(got[real[got]], want[real[want]])
        r = real[got]
        assert np.all(r[: r.sum()])  # real winners first, dummies after
