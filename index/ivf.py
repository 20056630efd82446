"""IVF for private indexes: a PUBLIC coarse quantizer and PUBLIC per-list capacities (SPEC §5).

Rules enforced here:

* The coarse quantizer is trained on public vectors only (a ``.npy`` file or a *public* index
  directory).  A quantizer trained on the private vectors makes the index structure (which
  records share a list, hence which records are candidates for a query) depend on records that
  were not sampled, which voids the amplification-by-subsampling argument; it is refused.
* Each private record goes to its nearest public centroid (largest exact inner product, lowest
  list id on ties), with no balancing; a list's capacity only decides which of its own
  records are kept (below).
* Capacities (the padded list sizes every query pays for) are public: a fixed rule of public
  inputs only,

      cap_l = max(min_capacity, ceil(slack * N̄ * p_l)),   p_l = (t_l + 1) / (T + nlist),

  where ``t_l`` is the number of PUBLIC training vectors nearest centroid ``l`` (``T`` in all)
  and ``slack``/``min_capacity`` are declared by the operator (from public proxy data, like N̄).
* Overflow never fails the build (:func:`place_records`).  The rule: list ``l`` keeps the
  ``cap_l`` records of smallest record id among those assigned to it; the others are DROPPED
  (not stored, never candidates).  The build report (operator-only) says how many lists
  overflowed and how many records were dropped; nothing public depends on it.

  **What one record changes** (neighbouring corpora: add or remove one record ``x``).  Centroids,
  capacities and every record's list are unchanged (public inputs; the assignment of a record is
  a function of that record alone), so only ``x``'s list ``l`` can change.  Let ``S_l`` be the
  records assigned to ``l`` without ``x`` and ``K = keep(S_l)`` the ``cap_l`` smallest ids of
  ``S_l`` (all of ``S_l`` if ``|S_l| <= cap_l``).  With ``x``: ``K' = keep(S_l + {x})``.
  (a) ``|S_l| < cap_l``: ``K' = K + {x}``, one record added.  (b) ``|S_l| >= cap_l`` and
  ``id(x)`` above every id in ``K``: ``K' = K``, nothing changes.  (c) otherwise ``x`` enters and
  the largest id ``y`` of ``K`` is pushed out: ``K' = K + {x} - {y}``.  Keeping the smallest ids
  of a set is a 1-Lipschitz rule in this sense, so in every case the two stored record sets are
  at add/remove distance at most 2 (one addition and one removal, both in list ``l``), and
  never more.  Ids are a per-record key (:mod:`dprdm.index.records`), so the order is itself a
  function of each record alone.

  **What it must be charged.**  Neighbouring corpora map to stored sets ``A``, ``B`` with a path
  ``A -> A - {y} -> A - {y} + {x} = B`` of two add/remove steps, each of which the served
  mechanism's RDP curve ``R(a)`` (Poisson-subsampled Gaussian, sensitivity 2/k, SPEC §4) bounds
  in both directions.  By the weak triangle inequality of Rényi divergence (Mironov 2017,
  "Rényi Differential Privacy", Prop. 11 with p = q = 2), for every order ``a > 1``

      D_a(M(A) || M(B)) <= (a - 1/2)/(a - 1) * R(2a) + R(2a - 1) =: G(a),

  and, Rényi divergence being non-decreasing in the order, ``min over a' >= a of G(a')`` too.
  So an IVF index built with this rule is charged the group-of-2 curve ``G`` instead of ``R``;
  the manifest records ``"group_size": 2`` (and ``1`` when every capacity is at least N̄, a
  public condition under which overflow is impossible).  The alternative (capacities of N̄ per
  list, overflow impossible by construction) would make every query pay ``nprobe * N̄`` slots,
  more than the flat index it is meant to beat, so it is not the default.
* Centroids are rounded to multiples of 2**-28 so the assignment scores <x, c> (x on the 2**-24
  grid) are exact in float64 and the assignment is a deterministic function of the record.
* GPU (issue 16 item 8): when faiss reports a GPU (the ``gpu`` extra's ``faiss-gpu-cu12``), the
  PUBLIC k-means (:func:`train_centroids`) and the quantizer search of :func:`assign_lists` run on
  it.  The assignment stays exact: the GPU's float32 scores only pre-select, under an error bound
  that holds for any cuBLAS math mode (TF32 included), and undecided rows are settled by exact
  float64 scores on the host, so a build assigns every record to the same list with or without a
  GPU.  The per-query probe of a served IVF index (:meth:`dprdm.index.layouts.IvfLayout.probe`:
  ``nlist * d`` products) stays on the host, so the host and the device search
  (:mod:`dprdm.index.device`) probe the same lists.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index.errors import IndexBuildError, IndexFormatError, PrivacyPolicyError
from dprdm.index.search import QUERY_GRID_BITS

__all__ = [
    "KMEANS_SEED",
    "gpu_available",
    "load_public_vectors",
    "train_centroids",
    "assign_lists",
    "public_capacities",
    "group_size",
    "place_records",
]

KMEANS_SEED = 1234
"""Public, fixed k-means seed (the training data are public; this is not a DP coin)."""

_PRIVATE_QUANTIZER_WHY = (
    "its structure would depend on private records that were not sampled, which voids the "
    "privacy amplification of Poisson subsampling (SPEC §5)"
)


def load_public_vectors(source: str | os.PathLike[str]) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Load public training vectors from a ``.npy`` (n, d) file or a PUBLIC index directory.

    Returns:
        (unit float32 rows, provenance dict for the manifest).

    Raises:
        PrivacyPolicyError: ``source`` is a private index.
        IndexBuildError: unreadable or malformed file.
    """
    from dprdm.index.format import load, sha256_file

    path = Path(source)
    if path.is_dir():
        try:
            idx = load(path, verify_checksums=True)
        except IndexFormatError as exc:
            raise IndexBuildError(f"--train-vectors {str(path)!r}: {exc}") from None
        if idx.private:
            raise PrivacyPolicyError(
                f"--train-vectors {str(path)!r} is a PRIVATE index (corpus {idx.corpus_id!r}); a quantizer "
                f"trained on private vectors is refused because {_PRIVATE_QUANTIZER_WHY}"
            )
        vecs = np.asarray(idx.vectors, dtype=np.float32)
        prov = {"kind": "index", "source": str(path.resolve()), "corpus_id": idx.corpus_id,
                "index_version": idx.index_version}
    else:
        if not path.is_file():
            raise IndexBuildError(f"--train-vectors {str(path)!r} does not exist")
        try:
            vecs = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise IndexBuildError(f"--train-vectors {str(path)!r}: not a .npy array ({exc})") from None
        prov = {"kind": "npy", "source": str(path.resolve()), "sha256": sha256_file(path)}
    if vecs.ndim != 2 or not np.issubdtype(vecs.dtype, np.floating) or vecs.shape[0] == 0:
        raise IndexBuildError(f"--train-vectors {str(path)!r}: expected a non-empty 2-D float array; found {vecs.shape}")
    vecs = np.asarray(vecs, dtype=np.float32)
    if not np.all(np.isfinite(vecs)):
        raise IndexBuildError(f"--train-vectors {str(path)!r}: contains non-finite values")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / np.where(norms > 0, norms, 1.0)
    prov["n_train"] = int(vecs.shape[0])
    return vecs, prov


def gpu_available() -> bool:
    """Whether faiss reports a GPU (``faiss.get_num_gpus() > 0``; never with ``faiss-cpu``)."""
    import faiss

    return bool(faiss.get_num_gpus() > 0)


def train_centroids(
    train: npt.NDArray[np.float32], nlist: int, *, niter: int = 25, seed: int = KMEANS_SEED, gpu: bool | None = None
) -> npt.NDArray[np.float64]:
    """Spherical k-means (faiss) on PUBLIC vectors; unit centroids rounded to the 2**-28 grid.

    ``gpu=None`` uses a GPU when faiss reports one (allowed: the data are public).
    """
    import faiss

    n, d = train.shape
    if nlist < 1 or nlist > n:
        raise IndexBuildError(f"--nlist must be in [1, {n}] (number of public training vectors); found {nlist}")
    use_gpu = gpu_available() if gpu is None else gpu
    km = faiss.Kmeans(d, nlist, niter=niter, seed=seed, spherical=True, gpu=bool(use_gpu), verbose=False,
                      min_points_per_centroid=1)
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    cents = np.asarray(km.centroids, dtype=np.float64)
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-30)
    return np.ldexp(np.round(np.ldexp(cents, QUERY_GRID_BITS)), -QUERY_GRID_BITS)


def assign_lists(
    vectors: npt.NDArray[np.floating], centroids: npt.NDArray[np.float64], *, gpu: bool | None = None
) -> npt.NDArray[np.int64]:
    """Nearest centroid (max exact inner product, lowest id on ties) of each row.

    A float32 faiss search (on a GPU when ``gpu``; ``None``: when faiss reports one) finds the best
    two lists.  Its error is at most ``E`` per score, so when the runner-up is more than ``2E``
    below the winner the winner is certified: its exact score exceeds the runner-up's exact score
    (``s_w >= s~_w - E > s~_2 + E >= s_j`` for every other list ``j``).  Other rows are decided by
    exact float64 scores (exact because rows are on the 2**-24 grid and centroids on the 2**-28
    grid), in blocks.  The result is therefore the exact assignment on either device.

    ``E`` for unit vectors (rows of norm <= 1.0001, float16 storage included), with u = 2**-24
    (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. (3.5): a sum of ``d``
    products in any order errs by at most ``gamma_d * sum |x_i c_i|``, ``sum |x_i c_i| <= 1.0001``
    by Cauchy-Schwarz):

    * CPU float32: ``2 (d + 2) u`` (the sum, plus the float32 rounding of the centroids);
    * GPU: ``1.01 (2**-10 + 2 (d + 2) u)``: also covers cuBLAS rounding both inputs to TF32
      (10 explicit mantissa bits: a relative ``(1 + 2**-11)**2 - 1 < 2**-10 + 2**-21`` per
      product), which faiss does not ask for today (``CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION``
      in ``StandardGpuResources.cpp``) but a library default could; float16 storage is turned
      off explicitly (``useFloat16 = False``).  More rows fall back to exact scores (a margin of
      ~2e-3 instead of ~1e-4), never a different list.
    """
    x = np.asarray(vectors, dtype=np.float32)
    n, d = x.shape
    nlist = centroids.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    if nlist == 1:
        return np.zeros(n, np.int64)
    use_gpu = gpu_available() if gpu is None else bool(gpu)
    dist, lab = _quantizer(centroids, use_gpu).search(np.ascontiguousarray(x), 2)
    err = 1.01 * (2.0**-10 + 2.0 * (d + 2) * 2.0**-24) if use_gpu else 2.0 * (d + 2) * 2.0**-24
    lists = lab[:, 0].astype(np.int64)
    unsure = np.flatnonzero(dist[:, 1] >= dist[:, 0] - 2 * err)
    block = max(1, (1 << 22) // nlist)  # exact scores in ~32 MiB pieces
    for s in range(0, unsure.size, block):
        rows = unsure[s : s + block]
        sims = np.asarray(vectors[rows], dtype=np.float64) @ centroids.T
        lists[rows] = np.argmax(sims, axis=1)  # argmax returns the first (lowest id) maximum
    return lists


_QUANTIZER: list[tuple[bytes, bool, Any]] = []  # the last (centroids digest, gpu, faiss index): one build's
_QUANTIZER_LOCK = threading.Lock()


def _quantizer(centroids: npt.NDArray[np.float64], gpu: bool) -> Any:
    """A flat inner-product faiss index over the float32 centroids (on all GPUs when ``gpu``), kept
    for the next call with the same centroids (a build assigns its records block by block)."""
    import faiss

    key = hashlib.blake2b(np.ascontiguousarray(centroids).tobytes(), digest_size=16).digest()
    with _QUANTIZER_LOCK:
        if _QUANTIZER and _QUANTIZER[0][:2] == (key, gpu):
            return _QUANTIZER[0][2]
        flat = faiss.IndexFlatIP(centroids.shape[1])
        flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
        index: Any = flat
        if gpu:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = False
            index = faiss.index_cpu_to_all_gpus(flat, co=options)
        _QUANTIZER[:] = [(key, gpu, index)]
        return index


def public_capacities(
    public_size: int, train_counts: npt.NDArray[np.int64], *, slack: float, min_capacity: int
) -> npt.NDArray[np.int64]:
    """The public capacity rule (module docstring); a function of public inputs only."""
    if not (math.isfinite(slack) and slack >= 1.0):
        raise IndexBuildError(f"--capacity-slack must be a finite number >= 1; found {slack}")
    if min_capacity < 1:
        raise IndexBuildError(f"--min-capacity must be >= 1; found {min_capacity}")
    counts = np.asarray(train_counts, dtype=np.float64)
    p = (counts + 1.0) / (counts.sum() + counts.size)
    caps = np.ceil(slack * public_size * p).astype(np.int64)
    return np.maximum(caps, min_capacity)


def group_size(public_size: int, capacities: npt.NDArray[np.int64]) -> int:
    """Add/remove distance between the stored sets of neighbouring corpora (module docstring).

    1 when every list can hold all N̄ records (no overflow possible), else 2.  A function of
    public inputs only: the charge never depends on whether a private list overflowed.
    """
    return 1 if bool(np.all(np.asarray(capacities) >= public_size)) else 2


def place_records(
    lists: npt.NDArray[np.int64], capacities: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Storage placement of the IVF records under the overflow rule (module docstring).

    Args:
        lists: ``(N,)`` list of each record, records in ascending id order.
        capacities: ``(nlist,)`` public capacities.

    Returns:
        ``src``: ``(sum(capacities),)`` record index of each storage row (-1: filler): list
        ``l`` occupies rows ``starts[l]:starts[l] + cap_l``, its kept records (the ``cap_l``
        smallest ids) first, in id order.  ``sizes``: ``(nlist,)`` records assigned to each list
        before the rule (operator-only; ``sizes - capacities`` > 0 are the overflows).
    """
    caps = np.asarray(capacities, dtype=np.int64)
    nlist = caps.size
    sizes = np.bincount(lists, minlength=nlist).astype(np.int64)
    perm = np.argsort(lists, kind="stable")  # by list, ids ascending within each list
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rank = np.arange(perm.size, dtype=np.int64) - first[lists[perm]]
    kept = rank < caps[lists[perm]]
    starts = np.concatenate([[0], np.cumsum(caps)[:-1]]).astype(np.int64)
    src = np.full(int(caps.sum()), -1, dtype=np.int64)
    src[starts[lists[perm][kept]] + rank[kept]] = perm[kept]
    return src, sizes
