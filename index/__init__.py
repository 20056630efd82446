"""Private indexes: corpus readers, the index builder, the on-disk format, the subsampled k-NN.

Public API::

    from dprdm import index
    idx = index.load("/data/my-index")                 # verified, memory-mapped
    res = idx.search_subsampled(u, k=16, q=0.01, rng=rng)  # exact top-k of a Poisson(q) subsample
    v = res.aggregate()                                 # (1/k) * sum; the release step adds noise

``res`` is private (ids, scores, survivor count): only the noisy release may leave the server.
Building: :func:`build_index` (or ``dprdm index build``).  Importing this package does not
import torch or faiss.
"""

from dprdm.index.build import BuildConfig, BuildResult, build_from_vectors, build_index
from dprdm.index.errors import IndexBuildError, IndexFormatError, PrivacyPolicyError
from dprdm.index.format import FORMAT_VERSION, PrivateIndex, load, verify
from dprdm.index.layouts import FlatLayout, IvfLayout
from dprdm.index.search import SubsampledNeighbors, poisson_positions, subsampled_topk, subsampled_topk_batch

__all__ = [
    "FORMAT_VERSION",
    "BuildConfig",
    "BuildResult",
    "FlatLayout",
    "IndexBuildError",
    "IndexFormatError",
    "IvfLayout",
    "PrivacyPolicyError",
    "PrivateIndex",
    "SubsampledNeighbors",
    "build_from_vectors",
    "build_index",
    "load",
    "poisson_positions",
    "subsampled_topk",
    "subsampled_topk_batch",
    "verify",
]
