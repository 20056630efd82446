"""The output directory of ``dprdm baseline train`` and how ``sample`` reads it back.

Layout::

    baseline.json         format version, method, backbone spec and fingerprint, settings
    weights.safetensors   dp-ldm: the trained attention parameters (UNet names);
                          dp-lora: the adapter parameters; dpagg-ti: ``embedding`` and ``init``
    privacy_report.json   :class:`~dprdm.baselines.accounting.PrivacyReport`

Only the changed tensors are stored; the frozen backbone is reloaded from its spec and checked
against the fingerprint of its UNet weights taken before training. Files are written to a
temporary name and renamed, ``baseline.json`` last, so a directory with it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .accounting import PrivacyReport
from .backbone import Backbone, load_backbone

__all__ = ["METHODS", "FORMAT_VERSION", "fingerprint", "write_baseline", "load_baseline"]

METHODS = ("dp-ldm", "dp-lora", "dpagg-ti")
FORMAT_VERSION = 1
META, WEIGHTS, REPORT = "baseline.json", "weights.safetensors", "privacy_report.json"


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_baseline(out: str | Path, *, method: str, backbone_spec: str, base_fingerprint: str,
                   tensors: dict[str, torch.Tensor], report: PrivacyReport, settings: dict[str, Any]) -> Path:
    """Write a baseline directory (see the module docstring).

    Raises:
        ValueError: on an unknown method.
    """
    from safetensors.torch import save

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / WEIGHTS, save({k: v.detach().float().contiguous() for k, v in tensors.items()}))
    _atomic_write(d / REPORT, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    meta = {"format": FORMAT_VERSION, "method": method, "backbone": backbone_spec,
            "base_unet_sha256": base_fingerprint, "settings": settings}
    _atomic_write(d / META, (json.dumps(meta, indent=2) + "\n").encode())
    return d


def load_baseline(directory: str | Path) -> tuple[Backbone, dict[str, Any], PrivacyReport, torch.Tensor | None]:
    """Reload the backbone and apply a baseline's weights.

    Returns:
        ``(backbone, meta, report, embedding)``; ``embedding`` is the DPAgg-TI token (else None).

    Raises:
        FileNotFoundError: naming a missing file.
        ValueError: on an unknown format or method, a backbone whose weights differ from the
            fingerprint, or weights that do not fit the backbone.
    """
    from safetensors.torch import load_file

    from .dp_lora import LoraSettings, load_lora

    d = Path(directory)
    for name in (META, WEIGHTS, REPORT):
        if not (d / name).is_file():
            raise FileNotFoundError(f"baseline directory {d} lacks {name}")
    meta = json.loads((d / META).read_text())
    if meta.get("format") != FORMAT_VERSION or meta.get("method") not in METHODS:
        raise ValueError(f"{d / META}: unsupported format {meta.get('format')!r} or method {meta.get('method')!r}")
    report = PrivacyReport.from_dict(json.loads((d / REPORT).read_text()))
    settings = meta.get("settings", {})
    backbone = load_backbone(meta["backbone"], settings.get("placeholder", "*"))
    found = fingerprint(backbone.unet)
    if found != meta["base_unet_sha256"]:
        raise ValueError(f"backbone {meta['backbone']!r} has UNet weights {found[:12]}..., "
                         f"the baseline was trained on {meta['base_unet_sha256'][:12]}...")
    tensors = load_file(str(d / WEIGHTS))
    embedding = None
    if meta["method"] == "dp-ldm":
        params = dict(backbone.unet.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"weights name parameters the backbone lacks, e.g. {unknown[0]!r}")
        with torch.no_grad():
            for k, v in tensors.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"parameter {k!r}: shape {tuple(v.shape)} != model {tuple(params[k].shape)}")
                params[k].copy_(v)
    elif meta["method"] == "dp-lora":
        load_lora(backbone.unet, LoraSettings(**settings["lora"]), tensors)
    else:
        embedding = tensors["embedding"]
        if embedding.shape != (backbone.conditioner.token_dim,):
            raise ValueError(f"embedding shape {tuple(embedding.shape)} != token dim {backbone.conditioner.token_dim}")
    return backbone, meta, report, embedding
