"""Named model bundles: an encoder paired with the generator trained against it (SPEC §8).

A bundle is a small JSON file (``models/bundles/<name>.json`` in the package, or any folder listed in
``DPRDM_BUNDLE_PATH``, or a path given directly)::

    {
      "name": "my-unclip",
      "description": "...",
      "encoder": "open_clip:ViT-H-14@/models/vit-h-14.safetensors",
      "encoder_identity": {"name": ..., "weights_sha256": ..., "dimension": ...},   (optional)
      "generator": {"type": "stable-unclip", "path": "/models/sd21-unclip-h", "guidance_scale": 10}
    }

Relative paths are resolved against the bundle file's folder. Encoder specs (:func:`load_encoder`):
``dprdm-mini`` (the embedded default), ``dprdm-mini:/dir``, ``open_clip:ARCH@/file``,
``open_clip:local-dir:/dir``, ``open_clip:hf-hub:org/repo`` (local cache only). Generator types:
``rdm`` (folder), ``rdm-packed`` (JSON + safetensors), ``stable-unclip``, ``kandinsky-2.2``,
``sd-ip-adapter`` (needs ``ip_adapter``: a weights file).

Loading refuses a pair whose encoder identity differs from the one the bundle or generator declares.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Encoder, EncoderIdentity, Generator

__all__ = [
    "BUNDLES_DIR",
    "DEFAULT_BUNDLE",
    "BundleMismatchError",
    "BundleSpec",
    "Bundle",
    "list_bundles",
    "read_bundle",
    "load_encoder",
    "load_generator",
    "load_bundle",
    "check_identity",
]

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_BUNDLE = "dprdm-mini"
GENERATOR_TYPES = ("rdm", "rdm-packed", "stable-unclip", "kandinsky-2.2", "sd-ip-adapter")


class BundleMismatchError(ValueError):
    """An encoder identity differs from the one a generator, bundle or index was built with."""


@dataclass(frozen=True)
class BundleSpec:
    """A parsed bundle file (nothing loaded yet)."""

    name: str
    path: Path
    encoder: str
    generator: Mapping[str, Any]
    description: str = ""
    encoder_identity: EncoderIdentity | None = None


@dataclass
class Bundle:
    """A loaded encoder + generator pair."""

    spec: BundleSpec
    encoder: Encoder
    generator: Generator
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The bundle's registry name."""
        return self.spec.name

    def check_index(self, index_identity: EncoderIdentity) -> None:
        """Refuse an index built with another encoder.

        Raises:
            BundleMismatchError: naming both identities.
        """
        check_identity(index_identity, self.encoder.identity, what=f"index vs bundle {self.name!r}")


def check_identity(expected: EncoderIdentity, actual: EncoderIdentity, what: str) -> None:
    """Raise :class:`BundleMismatchError` unless the identities are equal."""
    if expected != actual:
        raise BundleMismatchError(
            f"encoder mismatch ({what}): expected {expected.to_dict()}, found {actual.to_dict()}"
        )


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("DPRDM_BUNDLE_PATH", "").split(os.pathsep) if p]
    return extra + [BUNDLES_DIR]


def list_bundles() -> list[BundleSpec]:
    """Every bundle in ``DPRDM_BUNDLE_PATH`` then the package (first name wins).

    JSON files that are not bundles (e.g. packed model configs next to them) are skipped with a warning.
    """
    seen: dict[str, BundleSpec] = {}
    for d in _search_dirs():
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                spec = read_bundle(f)
            except ValueError as exc:
                warnings.warn(f"skipping {f}: {exc}", stacklevel=2)
                continue
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def _find(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return p
    for d in _search_dirs():
        if (d / f"{name_or_path}.json").is_file():
            return d / f"{name_or_path}.json"
    names = sorted(s.name for s in list_bundles())
    raise FileNotFoundError(f"unknown bundle {str(name_or_path)!r}; known bundles: {names}")


def read_bundle(name_or_path: str | Path) -> BundleSpec:
    """Parse a bundle by name or path without loading any model.

    Raises:
        FileNotFoundError: if no such bundle exists (the message lists known bundles).
        ValueError: naming a missing or malformed field.
    """
    path = _find(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"bundle {path} is not valid JSON: {exc}") from None
    for key in ("name", "encoder", "generator"):
        if key not in raw:
            raise ValueError(f"bundle {path} is missing field {key!r}")
    gen = raw["generator"]
    if not isinstance(gen, dict) or gen.get("type") not in GENERATOR_TYPES:
        raise ValueError(f"bundle {path}: generator.type must be one of {GENERATOR_TYPES}; found {gen!r}")
    ident = raw.get("encoder_identity")
    return BundleSpec(
        name=str(raw["name"]),
        path=path,
        encoder=str(raw["encoder"]),
        generator=gen,
        description=str(raw.get("description", "")),
        encoder_identity=EncoderIdentity.from_dict(ident) if ident else None,
    )


def _resolve(base: Path | None, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() or base is None else base / p


def load_encoder(spec: str, base_dir: Path | None = None) -> Encoder:
    """Load an encoder from a spec string (see the module docstring).

    Raises:
        ValueError: naming an unknown scheme.
        FileNotFoundError: naming a missing weights/config file.
    """
    if spec == "dprdm-mini" or spec.startswith("dprdm-mini:"):
        from .mini_encoder import MiniEncoder

        directory = _resolve(base_dir, spec.partition(":")[2]) if ":" in spec else WEIGHTS_DIR
        return MiniEncoder.load(directory)
    if spec.startswith("open_clip:"):
        from .openclip_encoder import OpenClipEncoder, parse_source

        source = parse_source(spec[len("open_clip:") :])
        if source.path is not None and not source.path.is_absolute() and base_dir is not None:
            source = type(source)(source.kind, source.name, base_dir / source.path)
        return OpenClipEncoder.load(source)
    raise ValueError(f"unknown encoder spec {spec!r}; expected 'dprdm-mini[:dir]' or 'open_clip:...'")


def load_generator(spec: Mapping[str, Any], base_dir: Path | None = None) -> Generator:
    """Load a generator from a bundle's ``generator`` mapping.

    Raises:
        ValueError: naming an unknown type or a missing field.
        FileNotFoundError: naming a missing file or folder.
    """
    kind = spec.get("type")
    if "path" not in spec:
        raise ValueError(f"generator spec needs a 'path'; found {dict(spec)!r}")
    path = _resolve(base_dir, str(spec["path"]))
    opts = {k: spec[k] for k in ("guidance_scale", "size") if k in spec}
    if kind == "rdm":
        from .rdm import RDMGenerator

        return RDMGenerator.load(path)
    if kind == "rdm-packed":
        from .rdm import RDMGenerator

        return RDMGenerator.load_packed(path)
    from . import pipelines

    if kind == "stable-unclip":
        return pipelines.UnCLIPGenerator.load(path, **opts)
    if kind == "kandinsky-2.2":
        return pipelines.KandinskyGenerator.load(path, **opts)
    if kind == "sd-ip-adapter":
        if "ip_adapter" not in spec:
            raise ValueError("generator type 'sd-ip-adapter' needs 'ip_adapter' (a weights file)")
        return pipelines.IPAdapterGenerator.load(
            path, _resolve(base_dir, str(spec["ip_adapter"])), scale=float(spec.get("scale", 1.0)), **opts
        )
    raise ValueError(f"unknown generator type {kind!r}; expected one of {GENERATOR_TYPES}")


def load_bundle(name_or_path: str | Path = DEFAULT_BUNDLE) -> Bundle:
    """Load a bundle's encoder and generator and check that they belong together.

    Raises:
        FileNotFoundError: unknown bundle or missing model files (named).
        BundleMismatchError: the encoder's identity differs from the bundle's or the generator's
            declared identity, or its dimension from the generator's conditioning dimension.
    """
    spec = read_bundle(name_or_path)
    base = spec.path.parent
    encoder = load_encoder(spec.encoder, base)
    if spec.encoder_identity is not None:
        check_identity(spec.encoder_identity, encoder.identity, what=f"bundle {spec.name!r} declaration")
    generator = load_generator(spec.generator, base)
    declared = getattr(generator, "expected_encoder", None)
    if declared is not None:
        check_identity(declared, encoder.identity, what=f"generator of bundle {spec.name!r}")
    if generator.conditioning_dimension != encoder.dimension:
        raise BundleMismatchError(
            f"bundle {spec.name!r}: encoder dimension {encoder.dimension} != generator conditioning "
            f"dimension {generator.conditioning_dimension}"
        )
    return Bundle(spec=spec, encoder=encoder, generator=generator)
