"""The package layout and the installable pieces (issue 11).

* A built wheel (not only the editable install) holds every sub-package and the embedded bundle.
* ``pip install dprdm`` with NO extras, into a fresh virtual environment: the privacy commands and
  the client work against a real server (run by this test process, from the main environment);
  torch, faiss, diffusers and opendp are absent; ``dprdm serve`` says in one line which extra to
  install (exit status 2).

About 15 s in all (10 s to install the fresh environment), so not marked slow. The fresh
environment is installed offline (``--no-index``): its base dependencies are repacked
into wheels from the distributions installed in THIS environment (same versions as the tested
ones; no registry needed), found by walking the wheel's ``Requires-Dist`` closure.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Left out of the copy the wheel is built from (a stale ./build/lib would leak deleted modules).
_NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "dprdm-demo", "out", "*.whl"
)
HEAVY = ("torch", "faiss-cpu", "faiss-gpu-cu12", "diffusers", "opendp", "transformers", "open-clip-torch", "peft")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built (no isolation: offline) from a clean copy of the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)],
        check=True,
        capture_output=True,
    )
    return next(tmp.glob("dprdm-*.whl"))


def test_wheel_contains_and_imports_subpackages(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "dprdm/__init__.py" in names and "dprdm/privacy/rdp.py" in names and "dprdm/extras.py" in names
    assert not any(n.startswith("proto/") for n in names)  # proto/ is never a Python package
    # the embedded default bundle ships in the wheel: its registry entry and its weights
    assert "dprdm/models/bundles/dprdm-mini.json" in names
    assert {"dprdm/models/weights/mini_encoder.safetensors", "dprdm/models/weights/mini_decoder.safetensors"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import dprdm.privacy as p;"
        f"assert p.__file__.startswith({str(site)!r}), p.__file__; print(p.DEFAULT_ORDERS[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "1.05"


def _wheel_requires(wheel: Path, extras: tuple[str, ...] = ()) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extras))]


def test_base_requirements_are_the_client_and_the_privacy_core(wheel: Path) -> None:
    base = {canonicalize_name(r.name) for r in _wheel_requires(wheel)}
    assert base == {
        "numpy", "scipy", "randomgen", "grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
        "dp-accounting",
    }
    # the GPU extra never pulls faiss-cpu (both install the `faiss` module); `all` has no GPU wheel
    gpu = {canonicalize_name(r.name) for r in _wheel_requires(wheel, ("gpu",))}
    assert "faiss-gpu-cu12" in gpu and "faiss-cpu" not in gpu
    everything = {canonicalize_name(r.name) for r in _wheel_requires(wheel, ("all",))}
    assert "dprdm" in everything and "faiss-gpu-cu12" not in everything


def _closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that satisfy ``requirements`` and their own (extra-less) ones."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        dist = importlib.metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} is installed"
        seen[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(seen.values())


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def _repack(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution: its files inside site-packages (scripts left out)."""
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    info = next(str(f).split("/")[0] for f in files if str(f).endswith(".dist-info/METADATA"))
    wheel_meta = dist.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:"))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    path = out / f"{name}-{dist.version}-{tag}.whl"
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    record = io.StringIO()
    rows = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            if str(f) in skip:
                continue
            data = Path(str(f.locate())).read_bytes()
            zf.writestr(str(f), data)
            rows.writerow(_record_line(str(f), data))
        rows.writerow([f"{info}/RECORD", "", ""])
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="module")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with ``pip install dprdm`` (no extras), installed offline."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("base-venv")
    house = tmp / "wheelhouse"
    house.mkdir()
    for dist in _closure(_wheel_requires(wheel)):
        _repack(dist, house)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(house), str(wheel)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(house)
    print(f"base install into a fresh venv: {time.monotonic() - started:.1f} s")
    yield venv
    shutil.rmtree(tmp, ignore_errors=True)  # ~200 MB: not kept among pytest's last three runs


def _run(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DPRDM_", "PYTHON"))}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=venv.parent,  # not the repository: nothing is imported from the source tree
        timeout=300,
    )


def test_base_install_has_no_heavy_packages(base_venv: Path) -> None:
    listed = json.loads(_run(base_venv, "python", "-m", "pip", "list", "--format", "json").stdout)
    names = {canonicalize_name(p["name"]) for p in listed}
    assert "dprdm" in names
    assert not names & {canonicalize_name(h) for h in HEAVY}, sorted(names)
    for module in ("torch", "faiss", "diffusers", "opendp", "PIL"):
        proc = _run(base_venv, "python", "-c", f"import {module}")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module
    code = "import dprdm.privacy, dprdm.clients, dprdm.extras as x; print(x.is_available('server'), x.is_available('models'))"
    proc = _run(base_venv, "python", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_base_install_privacy_commands(base_venv: Path) -> None:
    from dprdm.privacy import Profile, epsilon_from_rdp, profile_rdp
    from dprdm.privacy.orders import DEFAULT_ORDERS

    proc = _run(base_venv, "dprdm", "privacy", "epsilon", "--sigma", "0.2", "--q", "0.01", "--k", "18",
                "--queries", "1000", "--delta", "1e-7", "--noise", "float", "--accountant", "rdp", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["epsilon"]
    curve = 1000 * profile_rdp(Profile(k=18, q=0.01, sigma=0.2, lam=1.0), DEFAULT_ORDERS)
    expected = epsilon_from_rdp(curve, DEFAULT_ORDERS, 1e-7).epsilon  # the same maths, in this venv
    assert got >= expected and got == pytest.approx(0.996879, abs=2e-6)
    proc = _run(base_venv, "dprdm", "privacy", "epsilon", "--sigma", "0.2", "--q", "0.01", "--k", "18",
                "--queries", "1000", "--delta", "1e-7", "--json")  # default: the discrete curve the server charges
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    # discrete noise, PLD (dp-accounting is a base dependency): tighter than RDP even with the lattice
    assert doc["noise"] == "discrete" and doc["accountant"] == "pld" and 0.92 < doc["epsilon"] < got
    proc = _run(base_venv, "dprdm", "privacy", "max-queries", "--epsilon", "1", "--delta", "1e-7",
                "--sigma", "0.2", "--q", "0.01", "--k", "18")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    proc = _run(base_venv, "dprdm", "privacy", "audit", "--k", "1", "--q", "1", "--sigma", "3", "--trials", "200", "--json")
    assert proc.returncode == 0, proc.stderr  # the production search of dprdm.index, numpy only
    proc = _run(base_venv, "dprdm", "index", "verify", str(base_venv.parent / "no-index"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr  # no extra needed
    proc = _run(base_venv, "dprdm", "--help")
    assert proc.returncode == 0
    for command in ("privacy", "index", "serve", "retrieve", "generate", "budget", "admin", "demo", "bench"):
        assert f"    {command} " in proc.stdout, command


def test_base_install_client_against_a_real_server(base_venv: Path) -> None:
    from dprdm.ledger import MemoryLedger
    from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config

    with ServerThread(make_config(), ledger=MemoryLedger()) as srv:
        env = {"DPRDM_ADDRESS": srv.address, "DPRDM_TOKEN": TENANT_TOKEN}
        proc = _run(base_venv, "dprdm", "budget", "--index", "faces", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        [budget] = json.loads(proc.stdout)
        assert budget["domain"] == "corpus-a" and budget["epsilon"] == pytest.approx(50.0)
        out = base_venv.parent / "images"
        proc = _run(base_venv, "dprdm", "generate", "a dog", "--index", "faces", "--out", str(out), "-n", "1",
                    "--steps", "2", env=env)
        assert proc.returncode == 0, proc.stderr
        assert [p.read_bytes()[:8] for p in out.iterdir()] == [b"\x89PNG\r\n\x1a\n"]
        code = (
            "import sys; from dprdm.clients import Client;"
            "c = Client(); r = c.retrieve('faces', 'a cat');"
            "print(','.join(i.name for i in c.list_indexes()), len(r.embedding));"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'faiss', 'PIL', 'opendp'}))"
        )
        proc = _run(base_venv, "python", "-c", code, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["faces 16", "[]"]


def test_base_install_names_the_missing_extra(base_venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n')
    for argv, extras in (
        (["serve", "--config", str(config)], "'server' and 'models' extras: pip install 'dprdm[server,models]'"),
        (["index", "build", "-i", "x", "-o", "y", "--corpus-id", "c", "--public-size", "9", "--encoder", "dprdm-mini"],
         "'build' and 'models' extras: pip install 'dprdm[build,models]'"),
        (["demo", "--out", str(tmp_path / "demo")],
         "'server', 'build' and 'models' extras: pip install 'dprdm[server,build,models]'"),
        (["baseline", "sample", "--model", "m", "--prompt", "p", "--out", "o"], "'baselines' extra: pip install 'dprdm[baselines]'"),
    ):
        proc = _run(base_venv, "dprdm", *argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr)
        assert lines[0].startswith(f"dprdm {argv[0]}: needs the {extras} (missing module"), lines[0]


# ------------------------------------------------ the missing-extra line (main environment, simulated)


def test_missing_extra_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import dprdm.extras as extras
    from dprdm.cli.main import main

    real = extras._module_found
    monkeypatch.setattr(extras, "_module_found", lambda name: name not in {"grpc_health", "torch"} and real(name))
    assert not extras.is_available("server") and extras.is_available("build")
    assert main(["serve", "--config", "missing.toml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "dprdm serve: needs the 'server' and 'models' extras: pip install 'dprdm[server,models]' "
        "(missing modules grpc_health, torch)\n"
    )
    with pytest.raises(SystemExit) as exited:  # a command's --help needs no extra
        main(["serve", "--help"])
    assert exited.value.code == 0 and "--config" in capsys.readouterr().out
    # `dprdm privacy` and `index info` need no extra
    assert main(["privacy", "epsilon", "--sigma", "1", "--q", "0.1", "--k", "4", "--queries", "1", "--delta", "1e-5"]) == 0
    assert "epsilon =" in capsys.readouterr().out


def test_module_missing_at_run_time_names_its_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A ModuleNotFoundError of an extra's package while the command runs: the same one line."""
    import dprdm.cli.index as cli_index
    from dprdm.cli.main import main

    def boom(args: object) -> int:
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(cli_index, "_cmd_info", boom)
    assert main(["index", "info", "somewhere"]) == 2
    assert capsys.readouterr().err == (
        "dprdm index: needs the 'build' extra: pip install 'dprdm[build]' (missing module pyarrow)\n"
    )

    def other(args: object) -> int:
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(cli_index, "_cmd_info", other)
    with pytest.raises(ModuleNotFoundError, match="not_an_extra"):  # not ours to explain: the traceback
        main(["index", "info", "somewhere"])


def test_faiss_conflict_and_gpu_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import dprdm.extras as extras

    monkeypatch.setattr(extras, "_installed", lambda d: d in {"faiss-cpu", "faiss-gpu-cu12"})
    line = extras.faiss_conflict()
    assert line is not None and "\n" not in line and "faiss-cpu and faiss-gpu-cu12" in line
    assert extras.install_line(["build", "models"]) == "pip install 'dprdm[gpu,models]'"
    monkeypatch.setattr(extras, "_installed", lambda d: d == "faiss-cpu")
    assert extras.faiss_conflict() is None
    assert extras.install_line(["build"]) == "pip install 'dprdm[build]'"
