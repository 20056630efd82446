"""The ``dprdm`` client commands and ``dprdm serve`` (in-process), and the async client."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from dprdm.cli.main import main
from dprdm.clients.client import AsyncClient, BudgetExhaustedError
from dprdm.ledger import MemoryLedger
from dprdm.server.testing import ADMIN_TOKEN, TENANT_TOKEN, ServerThread, make_config


@pytest.fixture()
def env(server, monkeypatch):
    monkeypatch.setenv("DPRDM_ADDRESS", server.address)
    monkeypatch.setenv("DPRDM_TOKEN", TENANT_TOKEN)


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_retrieve(env, capsys, tmp_path):
    assert main(["retrieve", "a cat", "--index", "faces", "--request-id", "cli-1", "--json"]) == 0
    out = _json(capsys)
    assert len(out["embedding"]) == 16 and out["receipt"]["request_id"] == "cli-1"
    assert (
        main(
            [
                "retrieve",
                "a cat",
                "--index",
                "faces",
                "--request-id",
                "cli-1",
                "--out",
                str(tmp_path / "e.npy"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "replayed" in text and "embedding (d=16)" in text
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), out["embedding"])


def test_generate_writes_pngs_and_shows_progress(env, capsys, tmp_path):
    assert (
        main(
            [
                "generate",
                "a dog",
                "--index",
                "faces",
                "--out",
                str(tmp_path / "imgs"),
                "-n",
                "2",
                "--steps",
                "3",
                "--seed",
                "5",
                "--request-id",
                "cli-gen",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "denoising" in captured.err and "3/3" in captured.err and "queued" in captured.err
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["cli-gen-0.png", "cli-gen-1.png"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "seed 5" in captured.out


def test_budget(env, capsys):
    assert main(["budget"]) == 0
    assert "domain corpus-a" in capsys.readouterr().out
    assert main(["budget", "--index", "faces", "--json"]) == 0
    assert _json(capsys)[0]["domain"] == "corpus-a"


def test_admin_commands(server, capsys):
    conn = ["--address", server.address, "--token", ADMIN_TOKEN]
    assert (
        main(
            [
                "admin",
                "create-budget",
                "corpus-cli",
                "--epsilon",
                "2",
                "--delta",
                "1e-6",
                "--profile",
                "4,0.1,1.0,0.5",
                "--quota",
                "alice=1",
                *conn,
            ]
        )
        == 0
    )
    assert "domain corpus-cli" in capsys.readouterr().out
    assert main(["admin", "quotas", "corpus-cli", *conn]) == 0
    assert "alice" in capsys.readouterr().out
    assert main(["admin", "counts", "corpus-a", "--json", *conn]) == 0
    assert _json(capsys)["indexes"][0]["exact_size"] == "200"
    assert main(["admin", "audit-trail", "corpus-a", "--limit", "5", *conn]) == 0
    capsys.readouterr()


def test_user_errors_exit_2(server, capsys, monkeypatch):
    monkeypatch.delenv("DPRDM_TOKEN", raising=False)
    assert main(["budget", "--address", server.address]) == 2
    assert "no token" in capsys.readouterr().err
    assert (
        main(["retrieve", "x", "--index", "nope", "--address", server.address, "--token", TENANT_TOKEN]) == 2
    )
    assert "NOT_FOUND: index" in capsys.readouterr().err
    assert main(["admin", "counts", "corpus-a", "--address", server.address, "--token", TENANT_TOKEN]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["admin", "create-budget", "d", "--epsilon", "1", "--delta", "1e-6", "--profile", "1,2"])


@pytest.mark.parametrize("flag,value", [("--steps", "-3"), ("--seed", "-1"), ("--num-images", "x")])
def test_generate_rejects_bad_numbers_before_calling(env, capsys, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a cat", "--index", "faces", "--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_generate_request_names_out_of_range_fields():
    from dprdm.clients.client import _generate_request

    for kwargs, field in (({"steps": -1}, "steps"), ({"num_images": 2**32}, "num_images"), ({"seed": -5}, "seed")):
        args = {"num_images": 1, "steps": 0, "seed": None, **kwargs}
        with pytest.raises(ValueError, match=field):
            _generate_request("faces", "a cat", "default", None, **args)


def test_serve_check_and_startup_errors(tmp_path, capsys):
    cfg = tmp_path / "server.toml"
    cfg.write_text(f"""
[server]
listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
[[tokens]]
tenant = "alice"
token = "{TENANT_TOKEN}"
[indexes.faces]
path = "{tmp_path / "no-such-index"}"
bundle = "hash-16"
[indexes.faces.profiles.default]
k = 5
q = 1.0
sigma = 0.5
lambda = 0.5
""")
    assert main(["serve", "--config", str(cfg), "--check"]) == 2  # --check opens the index (issue 13)
    assert "indexes.faces" in capsys.readouterr().err
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "indexes.faces" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read configuration" in capsys.readouterr().err


def test_async_client(server):
    async def run():
        async with AsyncClient(server.address, TENANT_TOKEN) as c:
            (info,) = await c.list_indexes()
            res = await c.retrieve("faces", "async", request_id="async-1")
            again = await c.retrieve("faces", "async", request_id="async-1")
            events = [e.WhichOneof("event") async for e in c.generate_events("faces", "async gen", steps=2)]
            gen = await c.generate("faces", "async gen 2", steps=1, num_images=2)
            budget = await c.budget("faces")
            results = await asyncio.gather(*[c.retrieve("faces", f"par {i}") for i in range(8)])
            return info, res, again, events, gen, budget, results

    info, res, again, events, gen, budget, results = asyncio.run(run())
    assert info.name == "faces" and again.receipt.replayed
    np.testing.assert_array_equal(res.embedding, again.embedding)
    assert events == ["queued", "retrieved", "progress", "progress", "image", "done"]
    assert len(gen.images) == 2 and budget.epsilon_spent > 0 and len(results) == 8


def test_async_client_errors(tmp_path):
    with ServerThread(make_config(budgets={"corpus-a": {"epsilon": 2.3}}), ledger=MemoryLedger()) as srv:

        async def run():
            async with AsyncClient(srv.address, TENANT_TOKEN) as c:
                await c.retrieve("faces", "one")
                await c.retrieve("faces", "two")

        with pytest.raises(BudgetExhaustedError) as err:
            asyncio.run(run())
    assert err.value.reason == "PRIVACY_BUDGET_EXHAUSTED"
