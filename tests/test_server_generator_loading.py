"""Issue 13 item 11: ``serve`` loads each bundle's generator in the background, after SERVING.

Retrieve (encoder only) is answered at once; Generate is refused before any charge
(UNAVAILABLE, ``GENERATOR_LOADING``, RetryInfo) until the generator is loaded; a failed load is one
log line and FAILED_PRECONDITION (``GENERATOR_FAILED``) naming the bundle, while Retrieve keeps
working; ``serve --check`` loads every bundle synchronously.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from dprdm.clients.client import Client, DprdmError
from dprdm.ledger import MemoryLedger
from dprdm.models.fake import FakeEncoder
from dprdm.server import app
from dprdm.server.adapters import BackgroundGenerator
from dprdm.server.catalog import Bundle, Loaders
from dprdm.server.errors import GeneratorFailed, GeneratorLoading, StartupError
from dprdm.server.testing import TENANT_TOKEN, ServerThread, TinyGenerator, fake_loaders, make_config

WEIGHTS = Path(app.__file__).resolve().parent.parent / "models" / "weights"


def _loaders(load) -> tuple[Loaders, list[BackgroundGenerator]]:
    """Fake indexes, and bundles whose generator loads in the background with ``load()``."""
    made: list[BackgroundGenerator] = []

    def bundle(name: str) -> Bundle:
        gen = BackgroundGenerator(name, 16, load).start()
        made.append(gen)
        return Bundle(name=name, encoder=FakeEncoder(16), generator=gen)

    return Loaders(index=fake_loaders().index, bundle=bundle), made


def _spent(c: Client) -> float:
    return c.budget("faces").epsilon_spent


def test_retrieve_is_served_while_the_generator_loads_and_generate_is_refused_uncharged():
    gate = threading.Event()

    def slow_load() -> TinyGenerator:
        assert gate.wait(60)
        return TinyGenerator(16)

    loaders, made = _loaders(slow_load)
    with ServerThread(make_config(), ledger=MemoryLedger(), loaders=loaders) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            res = c.retrieve("faces", "hello")  # served at once
            assert res.embedding.shape == (16,) and res.receipt.spend_id
            before = _spent(c)
            assert before > 0
            with pytest.raises(DprdmError) as err:
                c.generate("faces", "a prompt not retrieved yet", steps=1)
            e = err.value
            assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason == "GENERATOR_LOADING"
            assert e.metadata["bundle"] == "hash-16-gen" and "nothing was charged" in e.message
            retry = [d for d in e.details if isinstance(d, error_details_pb2.RetryInfo)]
            assert retry and retry[0].retry_delay.seconds + retry[0].retry_delay.nanos > 0
            assert _spent(c) == before  # NOTHING charged
            gate.set()
            assert made[0].wait(30) and made[0].error is None
            out = c.generate("faces", "a prompt not retrieved yet", steps=2, num_images=2)
            assert len(out.images) == 2 and out.receipt.spend_id
            assert _spent(c) > before


def test_a_failed_load_is_one_log_line_and_generate_is_refused_while_retrieve_works(caplog):
    def failing_load() -> TinyGenerator:
        raise FileNotFoundError("RDM generator file missing: /models/x.safetensors\n(second line)")

    loaders, made = _loaders(failing_load)
    with caplog.at_level(logging.ERROR, logger="dprdm.server"):
        with ServerThread(make_config(), ledger=MemoryLedger(), loaders=loaders) as srv:
            assert made[0].wait(30)
            with Client(srv.address, TENANT_TOKEN) as c:
                before = _spent(c)
                with pytest.raises(DprdmError) as err:
                    c.generate("faces", "a new prompt", steps=1)
                e = err.value
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "GENERATOR_FAILED"
                assert "'hash-16-gen'" in e.message and "failed to load" in e.message
                assert "Traceback" not in e.message and "/models/x" not in e.message  # the cause is logged only
                assert _spent(c) == before
                assert c.retrieve("faces", "hello").embedding.shape == (16,)
    lines = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "'hash-16-gen'" in lines[0] and "FileNotFoundError" in lines[0] and "x.safetensors" in lines[0]


def test_the_proxy_refuses_until_loaded_and_checks_the_declared_dimension():
    gate = threading.Event()
    gen = BackgroundGenerator("b", 16, lambda: (gate.wait(60), TinyGenerator(16))[1]).start()
    assert gen.conditioning_dimension == 16  # known before loading
    with pytest.raises(GeneratorLoading):
        gen.loaded()
    gate.set()
    assert gen.wait(30) and isinstance(gen.loaded(), TinyGenerator)
    assert len(gen.generate([0.0] * 16, "", 1, 1, 0)) == 1
    bad = BackgroundGenerator("b", 16, lambda: TinyGenerator(8)).start()
    assert bad.wait(30) and "conditioning dimension 8" in (bad.error or "")
    with pytest.raises(GeneratorFailed):
        bad.loaded()


def test_the_startup_dimension_check_uses_the_declared_dimension():
    loaders = Loaders(
        index=fake_loaders().index,
        bundle=lambda name: Bundle(name, FakeEncoder(16), BackgroundGenerator(name, 8, lambda: TinyGenerator(8))),
    )
    with pytest.raises(StartupError, match="generator conditioning dimension 8 != index dimension 16"):
        ServerThread(make_config(), ledger=MemoryLedger(), loaders=loaders)


def _bundle_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "name": name,
        "encoder": f"dprdm-mini:{WEIGHTS}",
        "generator": {"type": "rdm-packed", "path": str(WEIGHTS / "mini_decoder.json")},
    }))
    return path


@pytest.fixture
def gated_generator(monkeypatch):
    """``registry.load_generator`` replaced by a gated fake of dimension 32 (no diffusers)."""
    from dprdm.models import registry

    gate, calls = threading.Event(), []

    def load_generator(spec, base_dir=None, device=None, dtype=None):
        calls.append(spec)
        assert gate.wait(60)
        return TinyGenerator(32)

    monkeypatch.setattr(registry, "load_generator", load_generator)
    return gate, calls


def test_the_real_loader_returns_the_encoder_now_and_loads_the_generator_in_the_background(tmp_path, gated_generator):
    gate, calls = gated_generator
    bundle = app.default_loaders(background=True).bundle(str(_bundle_file(tmp_path, "bg-pair")))
    assert isinstance(bundle.generator, BackgroundGenerator)
    assert bundle.generator.conditioning_dimension == 32 == bundle.encoder.dimension  # from the JSON
    with pytest.raises(GeneratorLoading):
        bundle.generator.loaded()
    assert not bundle.generator.wait(0.05)  # not started: the app starts generators once SERVING
    bundle.generator.start()
    gate.set()
    assert bundle.generator.wait(30) and bundle.generator.error is None
    assert isinstance(bundle.generator.loaded(), TinyGenerator) and len(calls) == 1


def test_the_pairing_checks_run_in_the_background_load(tmp_path, gated_generator, monkeypatch):
    from dprdm.models import registry
    from dprdm.models.base import EncoderIdentity

    gate, _ = gated_generator
    gate.set()
    other = EncoderIdentity(name="someone-else", weights_sha256="0" * 64, dimension=32)

    def mismatched(spec, base_dir=None, device=None, dtype=None):
        gen = TinyGenerator(32)
        gen.expected_encoder = other  # type: ignore[attr-defined]
        return gen

    monkeypatch.setattr(registry, "load_generator", mismatched)
    bundle = app.default_loaders(background=True).bundle(str(_bundle_file(tmp_path, "bad-pair")))
    assert bundle.generator.start().wait(30)
    assert "BundleMismatchError" in (bundle.generator.error or "") and "someone-else" in bundle.generator.error
    with pytest.raises(GeneratorFailed):
        bundle.generator.loaded()


def test_the_synchronous_loader_resolves_the_generator_before_returning(tmp_path, gated_generator):
    gate, calls = gated_generator
    gate.set()
    bundle = app.default_loaders().bundle(str(_bundle_file(tmp_path, "sync-pair")))
    assert isinstance(bundle.generator, TinyGenerator) and len(calls) == 1


def test_serve_check_loads_synchronously_and_serve_in_the_background(monkeypatch):
    seen: list[bool] = []

    def recording(checksum_cache=None, *, background=False):
        seen.append(background)
        return fake_loaders()

    monkeypatch.setattr(app, "default_loaders", recording)
    app.check_server(make_config())

    async def serve_once() -> None:
        running = await app.start_server(make_config(), ledger=MemoryLedger())
        await running.stop(None)

    asyncio.run(serve_once())
    assert seen == [False, True]
