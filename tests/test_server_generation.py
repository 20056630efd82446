"""Issue 16 items 1 and 5: concurrent generations on one pipeline equal the same calls run alone (bit
for bit on CPU), a generator declaring ``thread_safe = False`` is serialised, and every index using
one bundle shares one encoder and one pipeline."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from dprdm.models import testing
from dprdm.models.pipelines import KandinskyGenerator, UnCLIPGenerator
from dprdm.server.api_types import ImageOut
from dprdm.server.generation import GenerationJob, GenerationPool

CPU = torch.device("cpu")
STEPS = (2, 5, 3, 4)  # unequal lengths: shared scheduler state would interleave set_timesteps/step

pytestmark = pytest.mark.usefixtures("one_thread")


def _conditionings(dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(dim).astype(np.float32) for _ in STEPS]


def _gen(kind: str, tmp_path):
    if kind == "kandinsky":
        return KandinskyGenerator.from_pipeline(testing.tiny_kandinsky_pipeline(dim=24), size=32, device=CPU)
    return UnCLIPGenerator.from_pipeline(testing.tiny_unclip_pipeline(tmp_path, dim=32), guidance_scale=2.0,
                                         size=32, device=CPU)


@pytest.mark.parametrize("kind", ["kandinsky", "unclip"])
def test_concurrent_calls_equal_the_same_calls_alone(kind, tmp_path):
    gen = _gen(kind, tmp_path)
    cs = _conditionings(gen.conditioning_dimension)
    alone = [np.asarray(gen.generate(c, "a red circle", 1, s, i)[0]) for i, (c, s) in enumerate(zip(cs, STEPS))]
    together: list[np.ndarray | None] = [None] * len(STEPS)
    start = threading.Barrier(len(STEPS))

    def run(i: int) -> None:
        start.wait()
        together[i] = np.asarray(gen.generate(cs[i], "a red circle", 1, STEPS[i], i)[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(STEPS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [np.array_equal(a, b) for a, b in zip(alone, together)] == [True] * len(STEPS)


async def _collect(pool: GenerationPool, job: GenerationJob) -> list[bytes]:
    return [ev.png async for ev in pool.run(job) if isinstance(ev, ImageOut)]


def test_the_generation_pool_runs_one_pipeline_in_several_workers_exactly(tmp_path):
    gen = _gen("kandinsky", tmp_path)
    cs = _conditionings(gen.conditioning_dimension)
    jobs = [GenerationJob(gen, c, "", 1, s, 10 + i) for i, (c, s) in enumerate(zip(cs, STEPS))]

    async def main(workers: int) -> list[list[bytes]]:
        pool = GenerationPool(workers=workers, queue=8)
        try:
            return list(await asyncio.gather(*(_collect(pool, j) for j in jobs)))
        finally:
            pool.shutdown()

    assert asyncio.run(main(len(STEPS))) == asyncio.run(main(1))


class _Unsafe:
    """A generator that declares ``thread_safe = False`` and records how many calls overlap."""

    thread_safe = False
    conditioning_dimension = 4

    def __init__(self) -> None:
        self.inside = self.most = 0
        self.lock = threading.Lock()

    def generate(self, conditioning, prompt, n, steps, seed, progress=None):
        from PIL import Image

        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.05)
        with self.lock:
            self.inside -= 1
        return [Image.new("RGB", (2, 2))]


def test_a_generator_that_is_not_thread_safe_is_serialised():
    gen = _Unsafe()
    jobs = [GenerationJob(gen, np.zeros(4, np.float32), "", 1, 1, i) for i in range(4)]

    async def main() -> None:
        pool = GenerationPool(workers=4, queue=0)
        try:
            await asyncio.gather(*(_collect(pool, j) for j in jobs))
        finally:
            pool.shutdown()

    asyncio.run(main())
    assert gen.most == 1


def test_two_indexes_on_one_bundle_share_one_pipeline(tmp_path, monkeypatch):
    import open_clip

    from dprdm.ledger import MemoryLedger
    from dprdm.models.openclip_encoder import write_local_dir
    from dprdm.models.registry import load_encoder
    from dprdm.server import adapters
    from dprdm.server.catalog import Loaders, build_catalog
    from dprdm.server.testing import DEFAULT_PROFILES, ArrayIndex, make_config

    cfg = testing.tiny_open_clip_config(dim=16)
    torch.manual_seed(0)
    write_local_dir(open_clip.CLIP(**cfg), cfg, tmp_path / "clip")
    ident = load_encoder(f"open_clip:local-dir:{tmp_path / 'clip'}", device="cpu").identity
    testing.tiny_rdm_generator(dim=16, k=2).save_packed(tmp_path / "dec.json")
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "shared-pair.json").write_text(json.dumps({
        "name": "shared-pair", "encoder": f"open_clip:local-dir:{tmp_path / 'clip'}",
        "generator": {"type": "rdm-packed", "path": str(tmp_path / "dec.json")},
    }))
    monkeypatch.setenv("DPRDM_BUNDLE_PATH", str(tmp_path / "bundles"))
    rng = np.random.default_rng(0)

    def index(path: str) -> ArrayIndex:
        v = rng.standard_normal((50, 16))
        return ArrayIndex(v / np.linalg.norm(v, axis=1, keepdims=True), domain=path, encoder=ident)

    config = make_config(
        indexes={name: {"path": name, "bundle": "shared-pair", "profiles": DEFAULT_PROFILES}
                 for name in ("corpus-a", "corpus-b", "corpus-c")},
        budgets={name: {"epsilon": 10.0} for name in ("corpus-a", "corpus-b", "corpus-c")},
    )
    catalog = build_catalog(config, MemoryLedger(), Loaders(index=index, bundle=adapters.load_bundle))
    bundles = [catalog.indexes[n].bundle for n in ("corpus-a", "corpus-b", "corpus-c")]
    assert bundles[0] is bundles[1] is bundles[2]
    assert len({id(b.generator) for b in bundles}) == 1 and len({id(b.encoder) for b in bundles}) == 1
    by_path = adapters.load_bundle(str(tmp_path / "bundles" / "shared-pair.json"))
    assert by_path.generator is bundles[0].generator  # the same resolved bundle, named by path
