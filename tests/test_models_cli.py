"""Issue 16 items 2 and 4 at the command line: ``--device`` reaches the encoder (auto: cuda, then mps,
then cpu) and ``dprdm models check BUNDLE`` prints one line per check, exit 2 on a refusal."""

from __future__ import annotations

import json

import pytest
import torch

from dprdm.cli.args import CliError
from dprdm.cli.index import resolve_encoder
from dprdm.cli.main import main
from dprdm.models import _torch, testing

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    testing.write_tiny_open_clip(root / "clip", dim=32)
    return root


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("DPRDM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _torch.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _torch.default_device() == torch.device("mps")
    assert _torch.default_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _torch.default_device() == torch.device("cpu")
    assert _torch.default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("DPRDM_DEVICE", "cpu")
    assert _torch.default_device() == torch.device("cpu")


def test_device_flag_reaches_the_encoder(tiny_clip, tmp_path):
    spec = f"open_clip:local-dir:{tiny_clip / 'clip'}"
    enc = resolve_encoder(spec, "cpu")
    assert enc.device == torch.device("cpu") and next(enc.model.parameters()).device.type == "cpu"
    assert resolve_encoder("dprdm-mini", "cpu").device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CliError, match=r"--device 'cuda': device 'cuda' is not available"):
            resolve_encoder(spec, "cuda")
    with pytest.raises(CliError, match=r"--device 'tpu9': unknown device 'tpu9'"):
        resolve_encoder(spec, "tpu9")


def test_index_build_with_device_cpu(tiny_clip, tmp_path, capsys):
    from dprdm.index.testing import write_image_folder

    write_image_folder(tmp_path / "imgs", 6)
    rc = main(["index", "build", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "idx"),
               "--corpus-id", "c", "--public-size", "16", "--encoder", f"open_clip:local-dir:{tiny_clip / 'clip'}",
               "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "built" in capsys.readouterr().out


def test_models_check_refuses_a_disagreeing_pair(tiny_clip, capsys):
    testing.tiny_unclip_pipeline(tiny_clip, dim=32).save_pretrained(tiny_clip / "unclip")
    f = tiny_clip / "tiny-unclip.json"
    f.write_text(json.dumps({"name": "tiny-unclip", "encoder": "open_clip:local-dir:clip",
                             "generator": {"type": "stable-unclip", "path": "unclip", "noise_level": 5}}))
    assert main(["models", "check", str(f), "--device", "cpu"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bundle     tiny-unclip")
    assert "embedding_scale" in out[2] and "(mean-norm on public probe images)" in out[2] and "noise_level 5" in out[2]
    assert out[3].startswith("ok         dimension:")
    assert out[4].startswith("REFUSED    pairing: bundle 'tiny-unclip': encoder open_clip:local-dir:clip and ")
    assert len(out) == 5


def test_models_check_passes_the_default_bundle_and_names_unknown_ones(capsys):
    assert main(["models", "check", "dprdm-mini", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ok         identity:" in out and "REFUSED" not in out
    assert main(["models", "check", "nope"]) == 2
    assert "unknown bundle 'nope'" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "dprdm-mini" in capsys.readouterr().out
