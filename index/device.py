"""The subsampled k-NN with the stored rows on a torch device (issue 16 item 8; SPEC §5 "GPU").

:class:`DeviceSearch` keeps an index's stored rows and ids on a device (a CUDA GPU in production,
torch's CPU device in CI) and runs the middle of :func:`dprdm.index.search.subsampled_topk` there:
gather the sampled rows, score them, and the two partitions of the strict top-k.  The rest is
the host code of :mod:`dprdm.index.search`, called as is:

* :func:`~dprdm.index.search.sampled_rows`: validation, the query on the ``2**-28`` grid, the
  Poisson coins (the caller's generator: the CSPRNG in production, on the host) and the slot ->
  storage row map of the public layout (flat or IVF; the IVF probe over the public centroids
  stays on the host, so both backends probe the same lists);
* :func:`~dprdm.index.search.strict_order`: the final (key desc, id asc) order of the ``k``
  candidates;
* :func:`~dprdm.index.search.neighbors`: clamping (float64, on the host) and zero padding.

**Same bits as the host search.**  Given generators in the same state, both backends sample the
same storage rows (same host code, same coins).  Then, for every sampled row:

1. *Scores.*  The gathered rows are cast to float64 on the device (exact: float16 and float32
   values are float64 values) and multiplied by the float64 query with ``torch.mv``.  Stored
   coordinates are multiples of ``2**-24`` and the query's of ``2**-28``; every product and every
   partial sum of any subset of products is a multiple of ``2**-52`` of magnitude below 2
   (``||x|| ||u|| < 2``), hence a float64 number.  IEEE-754 addition and multiplication (fused or
   not) return the exact result when it is representable, so *any* evaluation order -- cuBLAS
   ``dgemv``'s blocking and its tree reductions, MKL's SIMD lanes, numpy's BLAS -- yields the
   exact real ``<Q(u), x>``: the device score equals the host score bit for bit.  The ``2**-52``
   grid is never below float64's normal range, so flush-to-zero modes cannot act.
2. *Keys.*  ``score - 8 * (not real)`` is one correctly rounded subtraction of the same two
   float64 operands on both sides: equal bits.
3. *Top k.*  The device computes ``t`` = the k-th largest key (``kthvalue``: the same order
   statistic as ``np.partition``, a value, so independent of the tie handling), then the same
   composite integer key (``INT64_MIN`` above ``t``, the id at ``t``, ``INT64_MAX`` below) and
   its ``k`` smallest entries.  As proved in :func:`dprdm.index.search._strict_topk`, that set is
   unique except for which dummies are taken among dummy ties at ``t`` (all with id -1); real
   winners are therefore the same records, their scores the same float64 values, and
   :func:`~dprdm.index.search.strict_order` puts them in the same order (real first: dummy keys
   lie below every real key).  Dummy rows become ``+0.0`` rows in
   :func:`~dprdm.index.search.neighbors` whichever were taken, so ``padded``, ``vectors``,
   ``ids``, ``scores`` and the aggregate are equal bit for bit.
4. *Clamping* runs on the host on the winners' stored values, the same numpy code as the host
   backend.

A device without float64 (Apple's MPS) cannot run step 1 and is refused.  float32 on the device
would not do: a float16 x ``2**-28``-grid product needs ~40 significant bits.

**Timing** (SPEC §3): the device work has the host backend's shape discipline: every tensor's
shape is a function of ``len(rows)`` (public sizes and coins), ``min(k, len(rows))`` or ``k``,
and no step branches on the number of real survivors.  As on the host, the values compared by
the selection kernels and the state left by other work are what remains data dependent.

**Privacy of the device copy:** the rows on the device are the private corpus; nothing derived
from them leaves this module except the :class:`~dprdm.index.search.SubsampledNeighbors` the
host backend returns too.  Placement messages name only public facts (device, storage size).

torch is imported lazily: importing this module (or ``dprdm.index``) never imports it, and the
host backend never needs it.  Selecting a device without torch is one line naming the extra.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.index.layouts import Layout
from dprdm.index.search import (
    _DUMMY_SHIFT,
    _I64_MAX,
    _I64_MIN,
    SubsampledNeighbors,
    neighbors,
    sampled_rows,
    strict_order,
)

__all__ = ["SEARCH_DEVICES", "DeviceSearch", "parse_search_device", "resolve_search_device", "place_index"]

SEARCH_DEVICES = "cpu | auto | cuda | cuda:N"
"""Accepted ``search_device`` values: ``cpu`` (the host numpy backend), ``auto`` (CUDA when torch
sees a CUDA device and the index fits in half its free memory, else ``cpu``), ``cuda[:N]`` (that
GPU, or an error)."""

_DEVICE_RE = re.compile(r"^(cpu|auto|cuda|cuda:\d+|mps)$")
_AUTO_SHARE = 0.5  # auto leaves half the free GPU memory to the generator (it loads after the indexes)
_CUDA_BLOCK_ELEMENTS = 1 << 24  # rows per scoring block on a GPU: 128 MiB of float64
_CPU_BLOCK_ELEMENTS = 1 << 17  # on torch's CPU device: cache-sized, as the host backend
_COPY_ROWS_BYTES = 1 << 26  # host -> device copy in 64 MiB pieces (the vectors may be a memmap)
_SLOT_WORK_BYTES = 48  # per sampled slot: row, id, real flag, score, key, composite (q = 1 bound)


def parse_search_device(name: str) -> str:
    """Check a ``search_device`` value (:data:`SEARCH_DEVICES`).

    Raises:
        ValueError: an unknown value (named), or ``mps`` (no float64, which the exact scores need).
    """
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise ValueError(f"search_device must be one of {SEARCH_DEVICES}; found {name!r}")
    if name == "mps":
        raise ValueError("search_device 'mps': MPS has no float64, which the exact scores need "
                         "(dprdm.index.device); use cpu")
    return name


def resolve_search_device(name: str) -> Any:
    """The torch device a ``search_device`` value selects, or None for the host numpy backend.

    ``auto`` gives CUDA when torch is installed and sees a CUDA device, else None (no error).

    Raises:
        ValueError: an unknown value, ``mps``, or ``cuda[:N]`` that this machine does not have.
        ModuleNotFoundError: ``cuda[:N]`` without torch (one line naming the extra).
    """
    name = parse_search_device(name)
    if name == "cpu":
        return None
    if importlib.util.find_spec("torch") is None:
        if name == "auto":
            return None
        raise ModuleNotFoundError(f"search_device {name!r} needs torch: pip install 'dprdm[models]'")
    import torch

    if not torch.cuda.is_available():
        if name == "auto":
            return None
        raise ValueError(f"search_device {name!r}: no CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda" if name == "auto" else name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"search_device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class DeviceSearch:
    """An index's padded storage resident on a torch device, searched as :func:`subsampled_topk`.

    Args:
        vectors: ``(S, d)`` stored rows on the storage grid (float16/float32; a memmap is copied
            to the device in pieces).
        ids: ``(S,)`` record ids, -1 for filler rows.
        layout: the index's public layout.
        device: a torch device (or its name) with float64 support.
        block_elements: gathered elements per scoring block (default: 2**24 on CUDA, 2**17 else).

    Raises:
        ModuleNotFoundError: torch is not installed.
        ValueError: the device has no float64, or the shapes disagree.
    """

    def __init__(
        self,
        vectors: npt.NDArray[np.floating],
        ids: npt.NDArray[np.int64],
        layout: Layout,
        device: Any,
        *,
        block_elements: int | None = None,
    ) -> None:
        torch = _torch()
        dev = torch.device(device)
        _check_float64(torch, dev)
        if vectors.ndim != 2 or ids.shape != (vectors.shape[0],):
            raise ValueError(f"vectors {vectors.shape} and ids {ids.shape} disagree")
        self.layout = layout
        self.device = dev
        self.shape: tuple[int, int] = (int(vectors.shape[0]), int(vectors.shape[1]))
        self.dtype = np.dtype(vectors.dtype)
        default = _CUDA_BLOCK_ELEMENTS if dev.type == "cuda" else _CPU_BLOCK_ELEMENTS
        self._block = int(block_elements or default)
        self._torch = torch
        self._vectors = _to_device(torch, vectors, dev)
        self._ids = torch.from_numpy(np.array(ids, dtype=np.int64)).to(dev)

    @property
    def nbytes(self) -> int:
        """Device memory held by the rows and ids."""
        return int(self._vectors.element_size() * self._vectors.nelement() + 8 * self._ids.nelement())

    def search_subsampled(
        self, query: npt.ArrayLike, *, k: int, q: float, rng: np.random.Generator, nprobe: int | None = None
    ) -> SubsampledNeighbors:
        """Top ``k`` of a fresh Poisson(q) subsample: :func:`dprdm.index.search.subsampled_topk`'s
        contract and, for the same coins, its result bit for bit (module docstring).

        Raises:
            ValueError: bad ``k``, ``q``, ``nprobe`` or query.
        """
        k, qhat, rows = sampled_rows(self.layout, query, self.shape[1], k=k, q=q, rng=rng, nprobe=nprobe)
        return self._select(rows, qhat, k)

    def _select(self, rows: npt.NDArray[np.int64], qhat: npt.NDArray[np.float64], k: int) -> SubsampledNeighbors:
        """The device half of :func:`dprdm.index.search._select`: gather, score, candidates; then
        the ``k`` candidates (rows, ids, scores) come to the host for the shared last steps."""
        torch, dev = self._torch, self.device
        rows_t = torch.from_numpy(rows).to(dev)
        row_ids = self._ids.index_select(0, rows_t)
        real = row_ids >= 0
        scores = self._scores(rows_t, torch.from_numpy(qhat).to(dev))
        keys = scores - _DUMMY_SHIFT * (~real).to(torch.float64)  # search._selection_keys
        cand = self._candidates(keys, row_ids, k)
        raw = self._vectors.index_select(0, rows_t.index_select(0, cand)).cpu().numpy()
        ids_c = row_ids.index_select(0, cand).cpu().numpy()
        keys_c = keys.index_select(0, cand).cpu().numpy()
        scores_c = scores.index_select(0, cand).cpu().numpy()
        order = strict_order(keys_c, ids_c)
        return neighbors(raw[order], ids_c[order], scores_c[order], ids_c[order] >= 0, k)

    def _scores(self, rows_t: Any, qhat_t: Any) -> Any:
        """Exact float64 scores of the gathered rows, in blocks of ``block_elements``."""
        torch = self._torch
        m, d = int(rows_t.shape[0]), self.shape[1]
        out = torch.empty(m, dtype=torch.float64, device=self.device)
        block = min(max(16, self._block // max(d, 1)), max(m, 1))
        for s in range(0, m, block):
            e = min(s + block, m)
            wide = self._vectors.index_select(0, rows_t[s:e]).to(torch.float64)
            torch.mv(wide, qhat_t, out=out[s:e])
        return out

    def _candidates(self, keys: Any, ids: Any, k: int) -> Any:
        """The (unordered) strict-order top ``k`` of ``keys``: :func:`dprdm.index.search._strict_topk`'s
        two partitions with torch's ``kthvalue`` and ``topk``."""
        torch = self._torch
        m = int(keys.shape[0])
        if m <= k:
            return torch.arange(m, device=self.device)
        t = torch.kthvalue(keys, m - k + 1).values  # = np.partition(keys, m - k)[m - k]
        low, high = torch.full_like(ids, _I64_MIN), torch.full_like(ids, _I64_MAX)
        comp = torch.where(keys > t, low, torch.where(keys == t, ids, high))
        return torch.topk(comp, k, largest=False, sorted=False).indices


def place_index(index: Any, search_device: str) -> tuple[DeviceSearch | None, str]:
    """Put a loaded index's rows on the device ``search_device`` selects (server start-up).

    Args:
        index: a :class:`dprdm.index.format.PrivateIndex` (``vectors``, ``ids``, ``layout``).
        search_device: a :data:`SEARCH_DEVICES` value.

    Returns:
        ``(search, where)``: the device backend, or None for the host numpy backend, and a
        one-line description for the start-up log (public facts only: device, storage bytes).

    Raises:
        ValueError: see :func:`resolve_search_device`; or ``cuda[:N]`` whose free memory is too small.
        ModuleNotFoundError: ``cuda[:N]`` without torch.
    """
    dev = resolve_search_device(search_device)
    if dev is None:
        why = "" if search_device == "cpu" else " (auto: no CUDA device)"
        return None, f"cpu (numpy){why}"
    import torch

    vectors, ids = index.vectors, index.ids
    name = str(dev)
    if dev.type == "cuda":
        block = _CUDA_BLOCK_ELEMENTS * (8 + vectors.dtype.itemsize)
        need = int(vectors.nbytes + 8 * ids.size + _SLOT_WORK_BYTES * ids.size + block)
        free, _total = torch.cuda.mem_get_info(dev)
        share = _AUTO_SHARE if search_device == "auto" else 1.0
        gib = f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free on {dev}"
        if need > share * free:
            if search_device == "auto":
                return None, f"cpu (numpy) (auto: the index does not fit in half the free GPU memory: {gib})"
            raise ValueError(f"search_device {search_device!r}: the index does not fit: {gib}")
        name = f"{dev} ({torch.cuda.get_device_name(dev)})"
    search = DeviceSearch(vectors, ids, index.layout, dev)
    return search, f"{name}: {search.nbytes / 2**30:.2f} GiB of rows and ids on the device"


def _torch() -> Any:
    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError("the device search needs torch: pip install 'dprdm[models]'")
    import torch

    return torch


def _check_float64(torch: Any, dev: Any) -> None:
    try:
        torch.zeros(1, dtype=torch.float64, device=dev)
    except (TypeError, RuntimeError):
        raise ValueError(f"device {str(dev)!r} has no float64, which the exact scores need; use cpu") from None


def _to_device(torch: Any, vectors: npt.NDArray[np.floating], dev: Any) -> Any:
    """Copy ``vectors`` to ``dev`` in pieces (a memmap is never materialised whole on the host)."""
    dtypes = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
              np.dtype(np.float64): torch.float64}
    dt = dtypes.get(np.dtype(vectors.dtype))
    if dt is None:
        raise ValueError(f"stored rows must be float16, float32 or float64; found {vectors.dtype}")
    n, d = vectors.shape
    out = torch.empty((n, d), dtype=dt, device=dev)
    step = max(1, _COPY_ROWS_BYTES // max(1, d * vectors.dtype.itemsize))
    for s in range(0, n, step):
        e = min(s + step, n)
        out[s:e].copy_(torch.from_numpy(np.array(vectors[s:e], copy=True)))
    return out
