"""Issue 16 item 8: the device search (``dprdm.index.device``) on torch's CPU device equals the host
search bit for bit on fixed coins and has the naive sampler's law; ``search_device`` selection,
its one-line errors, and the GPU branch of the IVF quantizer search (exercised on CPU faiss)."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from test_index_search import (
    _flat,
    _ivf,
    _store,
    assert_selection_law_matches_naive,
    flat_law_case,
    ivf_law_case,
)

from dprdm.index import BuildConfig, build_from_vectors, ivf
from dprdm.index import device as D
from dprdm.index.device import DeviceSearch, place_index, resolve_search_device
from dprdm.index.search import quantize_store, subsampled_topk
from dprdm.index.testing import random_unit_vectors
from dprdm.ledger import MemoryLedger
from dprdm.models.fake import FakeEncoder
from dprdm.server.adapters import load_index
from dprdm.server.catalog import Loaders, build_catalog
from dprdm.server.config import ConfigError
from dprdm.server.errors import StartupError
from dprdm.server.testing import fake_loaders, make_config

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _with_ties(n: int, d: int, dtype: str, seed: int):
    """Records with exact duplicates (distinct ids, ids not in storage order) and exact score ties."""
    x, _ = _store(n, d, seed=seed, dtype=dtype)
    x[1::7] = x[0]  # every 7th row duplicates row 0: equal scores for every query
    ids = np.random.default_rng(seed).permutation(10 * n)[:n].astype(np.int64)
    return x, ids


def _flat_case(dtype: str):
    x, ids = _with_ties(300, 24, dtype, seed=1)
    return (*_flat(x, ids, 420), x)


def _ivf_case(dtype: str):
    x, _ = _store(300, 24, seed=2, dtype=dtype)
    x[1::9] = x[0]
    cents = quantize_store(random_unit_vectors(6, 24, 3), "float32").astype(np.float64)
    lists = np.argmax(x.astype(np.float64) @ cents.T, axis=1)
    caps = np.maximum(np.bincount(lists, minlength=6) + 5, 8)
    ids = np.arange(300, dtype=np.int64) * 3  # ascending: the order _ivf expects
    return (*_ivf(x, ids, lists, caps, cents, nprobe=3), x)


def _same_bits(a, b) -> None:
    assert np.array_equal(a.ids, b.ids)
    for name in ("scores", "vectors", "padded"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), name
    assert a.aggregate().tobytes() == b.aggregate().tobytes()


def _queries(x: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """Random unit queries, and stored rows themselves (exact ties at the top)."""
    rand = random_unit_vectors(count, x.shape[1], seed)
    return [x[0].astype(np.float64) if i % 3 == 0 else rand[i] for i in range(count)]


# -- the same bits as the host search on fixed coins -----------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("case", [_flat_case, _ivf_case], ids=["flat", "ivf"])
def test_device_search_equals_host_search_bit_for_bit(case, dtype):
    vectors, ids, layout, x = case(dtype)
    dev = DeviceSearch(vectors, ids, layout, CPU, block_elements=24 * 37)  # many scoring blocks
    ties = 0
    for i, u in enumerate(_queries(x, 45, seed=7)):
        for k, q in ((1, 1.0), (5, 0.3), (12, 0.05), (200, 0.9)):  # k = 200 > survivors: zero padding
            host = subsampled_topk(vectors, ids, layout, u, k=k, q=q, rng=np.random.default_rng(i))
            _same_bits(dev.search_subsampled(u, k=k, q=q, rng=np.random.default_rng(i)), host)
            ties += int(np.any(np.diff(host.scores) == 0))
    assert ties > 20  # the comparison ran through exact ties broken by id


def test_a_float32_device_score_would_be_caught(monkeypatch):
    """The equality test has teeth: scoring in float32 (not exact) changes the bits."""
    vectors, ids, layout, x = _flat_case("float16")
    dev = DeviceSearch(vectors, ids, layout, CPU)

    def float32_scores(rows_t, qhat_t):
        return (dev._vectors[rows_t].to(torch.float32) @ qhat_t.to(torch.float32)).to(torch.float64)

    monkeypatch.setattr(dev, "_scores", float32_scores)
    u = _queries(x, 2, seed=1)[1]
    host = subsampled_topk(vectors, ids, layout, u, k=10, q=1.0, rng=np.random.default_rng(0))
    with pytest.raises(AssertionError):
        _same_bits(dev.search_subsampled(u, k=10, q=1.0, rng=np.random.default_rng(0)), host)


def test_device_search_with_no_or_few_survivors():
    vectors, ids, layout, x = _flat_case("float32")
    dev = DeviceSearch(vectors, ids, layout, CPU)
    for q in (1e-9, 0.004):
        for seed in range(5):
            host = subsampled_topk(vectors, ids, layout, x[3], k=4, q=q, rng=np.random.default_rng(seed))
            _same_bits(dev.search_subsampled(x[3], k=4, q=q, rng=np.random.default_rng(seed)), host)
    with pytest.raises(ValueError, match="k must be"):
        dev.search_subsampled(x[0], k=0, q=0.5, rng=np.random.default_rng(0))
    assert "redacted" in repr(dev.search_subsampled(x[0], k=2, q=1.0, rng=np.random.default_rng(0)))


# -- the law of the device search: the host search's chi-square test against the naive sampler --


def test_device_flat_selection_law_matches_naive():
    _x0, _ids0, x, ids, layout, query = flat_law_case()
    search = DeviceSearch(x, ids, layout, CPU).search_subsampled
    assert_selection_law_matches_naive(search, x, ids, layout, query, k=3, q=0.3, trials=12000, seeds=(21, 22))


def test_device_ivf_selection_law_matches_naive():
    _ids0, _lists, x, ids, layout, query = ivf_law_case()
    search = DeviceSearch(x, ids, layout, CPU).search_subsampled
    assert_selection_law_matches_naive(search, x, ids, layout, query, k=2, q=0.4, trials=6000, seeds=(23, 24))


# -- choosing the device: values, errors, torch absent -----------------------------------------


def test_search_device_values_and_one_line_errors():
    assert resolve_search_device("cpu") is None
    assert resolve_search_device("auto") is None  # no CUDA here: the host backend, no error
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", ""):
        with pytest.raises(ValueError, match="search_device must be one of") as exc:
            resolve_search_device(bad)
        assert repr(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="no float64"):
        resolve_search_device("mps")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="no CUDA device") as exc:
            resolve_search_device(name)
        assert "\n" not in str(exc.value)


def test_torch_absent_is_an_error_only_when_a_device_is_requested(monkeypatch):
    real_find_spec = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None if name == "torch" else real_find_spec(name))
    monkeypatch.setitem(sys.modules, "torch", None)
    assert resolve_search_device("cpu") is None and resolve_search_device("auto") is None
    with pytest.raises(ModuleNotFoundError, match=r"needs torch: pip install 'dprdm\[models\]'"):
        resolve_search_device("cuda")
    x, ids = _store(10, 4)
    with pytest.raises(ModuleNotFoundError, match="needs torch"):
        DeviceSearch(x, ids, _flat(x, ids, 10)[2], "cpu")


def _config(path: str, search_device: str | None):
    index = {"path": path, "bundle": "hash-16", "profiles": {"default": {"k": 5, "q": 1.0, "sigma": 0.5, "lambda": 0.5}}}
    if search_device is not None:
        index["search_device"] = search_device
    return make_config(indexes={"faces": index}, budgets={"corpus-dev": {"epsilon": 5.0}})


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "faces"
    vectors = np.random.default_rng(0).normal(size=(150, 16)).astype(np.float32)
    build_from_vectors(vectors, FakeEncoder(16).identity,
                       BuildConfig(output=out, corpus_id="corpus-dev", public_size=400, progress=False))
    return str(out)


def test_config_search_device_key():
    assert _config("fake:domain=corpus-dev,dim=16", None).indexes[0].search_device == "auto"
    assert _config("fake:domain=corpus-dev,dim=16", "cuda:1").indexes[0].search_device == "cuda:1"
    with pytest.raises(ConfigError, match=r"indexes\.faces\.search_device: must be cpu, auto, cuda or cuda:N; found 'gpu'"):
        _config("fake:domain=corpus-dev,dim=16", "gpu")


def test_catalog_refuses_cuda_without_cuda_in_one_line(index_dir):
    loaders = Loaders(index=load_index, bundle=fake_loaders().bundle)
    with pytest.raises(StartupError, match=r"^indexes\.faces\.search_device: search_device 'cuda': no CUDA") as exc:
        build_catalog(_config(index_dir, "cuda"), MemoryLedger(), loaders)
    assert "\n" not in str(exc.value)
    with pytest.raises(StartupError, match="this index type has no device search"):
        build_catalog(_config("fake:domain=corpus-dev,dim=16", "cuda"), MemoryLedger(), fake_loaders())


def test_catalog_places_the_search_and_logs_where(index_dir, monkeypatch, caplog):
    loaders = Loaders(index=load_index, bundle=fake_loaders().bundle)
    with caplog.at_level(logging.INFO, logger="dprdm.server"):
        host = build_catalog(_config(index_dir, "auto"), MemoryLedger(), loaders)
    assert "indexes.faces: private search on cpu (numpy) (auto: no CUDA device)" in caplog.text
    # a device resolved to torch's CPU device: the server's search runs through DeviceSearch
    monkeypatch.setattr(D, "resolve_search_device", lambda name: CPU)
    on_device = build_catalog(_config(index_dir, "cuda"), MemoryLedger(), loaders)
    a, b = host.indexes["faces"].index, on_device.indexes["faces"].index
    assert a._device is None and isinstance(b._device, DeviceSearch)
    u = FakeEncoder(16).encode_texts(["a query"])[0]
    for seed in range(10):
        ra = a.search_subsampled(u, k=6, q=0.3, rng=np.random.default_rng(seed))
        rb = b.search_subsampled(u, k=6, q=0.3, rng=np.random.default_rng(seed))
        assert ra.shape == rb.shape == (6, 16) and ra.tobytes() == rb.tobytes()


def test_place_index_host_backend_for_cpu_and_auto():
    x, ids = _store(20, 8)
    index = types.SimpleNamespace(vectors=x, ids=ids, layout=_flat(x, ids, 20)[2])
    assert place_index(index, "cpu") == (None, "cpu (numpy)")
    assert place_index(index, "auto") == (None, "cpu (numpy) (auto: no CUDA device)")


# -- IVF: the GPU branch of the quantizer search, run on CPU faiss -----------------------------


def test_gpu_quantizer_branch_assigns_exactly_like_the_cpu_branch(monkeypatch):
    faiss = pytest.importorskip("faiss")
    cloned = []

    class Options:
        useFloat16 = True

    def to_all_gpus(index, co=None):
        cloned.append(co.useFloat16)
        return index  # the CPU index stands in for the GPU copy: same float32 scores here

    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    monkeypatch.setattr(ivf, "_QUANTIZER", [])
    d = 16
    cents = quantize_store(random_unit_vectors(40, d, 5), "float32").astype(np.float64)
    x = quantize_store(random_unit_vectors(3000, d, 6), "float16")
    x[:40] = cents.astype(np.float16)  # rows on a centroid: near-ties with a neighbouring list
    x[40] = quantize_store((cents[:1] + cents[1:2]), "float16")[0]  # equidistant from lists 0 and 1
    exact = np.argmax(np.asarray(x, np.float64) @ cents.T, axis=1)
    on_gpu = ivf.assign_lists(x, cents, gpu=True)
    assert np.array_equal(ivf.assign_lists(x[:100], cents, gpu=True), on_gpu[:100])
    assert cloned == [False]  # float16 storage off on the GPU copy, cloned once for both calls
    on_cpu = ivf.assign_lists(x, cents, gpu=False)
    assert np.array_equal(on_gpu, exact) and np.array_equal(on_cpu, exact)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert ivf.gpu_available()
