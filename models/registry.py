"""Named model bundles: an encoder paired with the generator trained against it (SPEC §8).

A bundle is a small JSON file (``models/bundles/<name>.json`` in the package, or any folder listed in
``DPRDM_BUNDLE_PATH``, or a path given directly)::

    {
      "name": "my-unclip",
      "description": "...",
      "encoder": "open_clip:ViT-H-14@/models/vit-h-14.safetensors",
      "encoder_identity": {"name": ..., "weights_sha256": ..., "dimension": ...},   (optional)
      "generator": {"type": "stable-unclip", "path": "/models/sd21-unclip-h", "guidance_scale": 10,
                    "embedding_scale": "mean-norm", "noise_level": 0},
      "min_pairing_cosine": 0.98                                                      (optional)
    }

Relative paths are resolved against the bundle file's folder; ``${NAME}`` in a path or an encoder spec
is the environment variable ``NAME`` (the example bundles keep their weights under ``${DPRDM_MODELS}``;
:func:`expand_vars`), expanded when a model loads, so listing bundles needs no variable set. Encoder
specs (:func:`load_encoder`):
``dprdm-mini`` (the embedded default), ``dprdm-mini:/dir``, ``open_clip:ARCH@/file``,
``open_clip:local-dir:/dir``, ``open_clip:hf-hub:org/repo`` (local cache only). Generator types:
``rdm`` (folder), ``rdm-packed`` (JSON + safetensors), ``stable-unclip``, ``kandinsky-2.2``,
``sd-ip-adapter`` (needs ``ip_adapter``: a weights file).

Diffusers generators also take ``embedding_scale`` (a number, or ``"mean-norm"``: the mean norm of
the pipeline's own image encoder on public probe images; the default when it has one),
``image_encoder`` (Kandinsky 2.2: the prior's ``image_encoder/`` folder, whose zero-image embedding
is the negative; IP-Adapter: its ``image_encoder/``), ``negative_embedding`` (Kandinsky, a ``.npy``
instead of ``image_encoder``) and ``noise_level`` (unCLIP). See :mod:`dprdm.models.conditioning`.

Optional, validated by :func:`read_bundle`: ``recommended_profiles`` (a list of ``{epsilon, queries, k,
q, sigma, lambda, dimension}``, optionally ``delta``: release profiles measured to keep a useful
release at this dimension for a budget of ``epsilon`` over ``queries`` queries) and ``sources`` (a list
of ``{repo, local_dir, include}``: where each publisher's files come from, see ``models/README.md``).

Loading refuses a pair whose encoder identity differs from the one the bundle or generator declares,
whose dimensions differ, or whose encoder disagrees with the pipeline's own image encoder on the probe
images (mean cosine below ``min_pairing_cosine``, default 0.98). :func:`shared_bundle` loads each
resolved bundle once per process (one pipeline for every index that uses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Encoder, EncoderIdentity, Generator
from .bundle_file import RecommendedProfile, Source, expand_vars, parse_profiles, parse_sources

__all__ = [
    "BUNDLES_DIR",
    "DEFAULT_BUNDLE",
    "BundleMismatchError",
    "BundleSpec",
    "Bundle",
    "RecommendedProfile",
    "Source",
    "expand_vars",
    "list_bundles",
    "read_bundle",
    "load_encoder",
    "load_generator",
    "load_bundle",
    "shared_bundle",
    "shared_key",
    "loaded_shared",
    "declared_conditioning_dimension",
    "check_identity",
    "Check",
]

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_BUNDLE = "dprdm-mini"
GENERATOR_TYPES = ("rdm", "rdm-packed", "stable-unclip", "kandinsky-2.2", "sd-ip-adapter")
DEFAULT_MIN_PAIRING_COSINE = 0.98


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
    min_pairing_cosine: float = DEFAULT_MIN_PAIRING_COSINE
    recommended_profiles: tuple[RecommendedProfile, ...] = ()
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True)
class Check:
    """One pairing check of a loaded bundle: its name, whether it passed, and a one-line detail."""

    name: str
    ok: bool
    detail: str


@dataclass
class Bundle:
    """A loaded encoder + generator pair and the checks it passed (or failed, with ``refuse=False``)."""

    spec: BundleSpec
    encoder: Encoder
    generator: Generator
    extras: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

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
    min_cos = raw.get("min_pairing_cosine", DEFAULT_MIN_PAIRING_COSINE)
    if not isinstance(min_cos, (int, float)) or isinstance(min_cos, bool) or not -1 <= min_cos <= 1:
        raise ValueError(f"bundle {path}: min_pairing_cosine must be a number in [-1, 1]; found {min_cos!r}")
    dim = gen.get("conditioning_dimension")
    return BundleSpec(
        name=str(raw["name"]),
        path=path,
        encoder=str(raw["encoder"]),
        generator=gen,
        description=str(raw.get("description", "")),
        encoder_identity=EncoderIdentity.from_dict(ident) if ident else None,
        min_pairing_cosine=float(min_cos),
        recommended_profiles=parse_profiles(raw.get("recommended_profiles", []), f"bundle {path}", dim),
        sources=parse_sources(raw.get("sources", []), f"bundle {path}"),
    )


def _resolve(base: Path | None, value: str) -> Path:
    p = Path(os.path.expanduser(expand_vars(value)))
    return p if p.is_absolute() or base is None else base / p


def load_encoder(
    spec: str, base_dir: Path | None = None, device: Any = None, dtype: Any = None
) -> Encoder:
    """Load an encoder from a spec string (see the module docstring).

    Args:
        spec: the encoder spec.
        base_dir: folder that relative paths are resolved against.
        device: ``"cpu"``, ``"cuda"``, ``"mps"``, a ``torch.device``, or ``None`` (CUDA, then MPS,
            then CPU; ``DPRDM_DEVICE`` overrides; ``dprdm-mini`` stays on the CPU).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (fp32 on CPU, half on GPUs).

    Raises:
        ValueError: naming an unknown scheme, device, dtype or unset ``${VARIABLE}``.
        FileNotFoundError: naming a missing weights/config file.
    """
    from ._torch import resolve_device

    spec = expand_vars(spec)
    if spec == "dprdm-mini" or spec.startswith("dprdm-mini:"):
        from .mini_encoder import MiniEncoder

        dev = resolve_device(device) if device is not None else None
        directory = _resolve(base_dir, spec.partition(":")[2]) if ":" in spec else WEIGHTS_DIR
        return MiniEncoder.load(directory, device=dev, dtype=dtype)
    if spec.startswith("open_clip:"):
        from .openclip_encoder import OpenClipEncoder, parse_source

        source = parse_source(spec[len("open_clip:") :])
        if source.path is not None and not source.path.is_absolute() and base_dir is not None:
            source = type(source)(source.kind, source.name, base_dir / source.path)
        return OpenClipEncoder.load(source, device=resolve_device(device), dtype=dtype)
    raise ValueError(f"unknown encoder spec {spec!r}; expected 'dprdm-mini[:dir]' or 'open_clip:...'")


def load_generator(
    spec: Mapping[str, Any], base_dir: Path | None = None, device: Any = None, dtype: Any = None
) -> Generator:
    """Load a generator from a bundle's ``generator`` mapping (``device``/``dtype`` as :func:`load_encoder`).

    Raises:
        ValueError: naming an unknown type, a missing field, or a bad conditioning option.
        FileNotFoundError: naming a missing file or folder.
    """
    from ._torch import resolve_device

    kind = spec.get("type")
    if "path" not in spec:
        raise ValueError(f"generator spec needs a 'path'; found {dict(spec)!r}")
    path = _resolve(base_dir, str(spec["path"]))
    dev = resolve_device(device)
    if kind == "rdm":
        from .rdm import RDMGenerator

        return RDMGenerator.load(path, device=dev, dtype=dtype)
    if kind == "rdm-packed":
        from .rdm import RDMGenerator

        return RDMGenerator.load_packed(path, device=dev, dtype=dtype)
    if kind not in GENERATOR_TYPES:
        raise ValueError(f"unknown generator type {kind!r}; expected one of {GENERATOR_TYPES}")
    return _load_pipeline(str(kind), spec, path, base_dir, dev, dtype)


def _load_pipeline(
    kind: str, spec: Mapping[str, Any], path: Path, base_dir: Path | None, device: Any, dtype: Any
) -> Generator:
    """A diffusers generator with its conditioning convention (scale, noise level, negative)."""
    from . import pipelines
    from .conditioning import ClipVisionReference, mean_norm

    opts: dict[str, Any] = {k: spec[k] for k in ("guidance_scale", "size") if k in spec}
    opts.update(device=device, dtype=dtype)
    if "image_encoder" in spec:
        opts["reference"] = ClipVisionReference.load(_resolve(base_dir, str(spec["image_encoder"])), device, dtype)
    scale = spec.get("embedding_scale", "mean-norm")
    if not (scale == "mean-norm" or (isinstance(scale, (int, float)) and not isinstance(scale, bool))):
        raise ValueError(f"generator embedding_scale must be a number or 'mean-norm'; found {scale!r}")
    opts["embedding_scale"] = 1.0 if scale == "mean-norm" else float(scale)
    gen: pipelines._PipelineGenerator
    if kind == "stable-unclip":
        gen = pipelines.UnCLIPGenerator.load(path, noise_level=spec.get("noise_level", 0), **opts)
        if gen.reference is not None:
            gen.reference.source = f"the image_encoder of {path}"
    elif kind == "kandinsky-2.2":
        if "negative_embedding" in spec:
            import numpy as np

            opts["negative"] = np.load(_resolve(base_dir, str(spec["negative_embedding"])))
        elif "image_encoder" not in spec:
            raise ValueError(
                "generator type 'kandinsky-2.2' needs 'image_encoder' (the prior's image_encoder folder: "
                "its zero-image embedding is the negative) or 'negative_embedding' (a .npy file)"
            )
        gen = pipelines.KandinskyGenerator.load(path, **opts)
    else:
        if "ip_adapter" not in spec:
            raise ValueError("generator type 'sd-ip-adapter' needs 'ip_adapter' (a weights file)")
        ip = _resolve(base_dir, str(spec["ip_adapter"]))
        gen = pipelines.IPAdapterGenerator.load(path, ip, scale=float(spec.get("scale", 1.0)), **opts)
    if scale == "mean-norm":
        if gen.reference is None:
            raise ValueError(
                f"generator type {kind!r} has no image encoder to measure 'mean-norm': give "
                "'embedding_scale' (a number) or 'image_encoder' (a CLIPVisionModelWithProjection folder)"
            )
        gen.embedding_scale = mean_norm(gen.reference)
    gen.embedding_scale_source = "declared" if scale != "mean-norm" else "mean-norm on public probe images"
    return gen


def _checks(spec: BundleSpec, encoder: Encoder, generator: Generator) -> list[Check]:
    """Every pairing check of a loaded bundle, in order (identity, dimension, image-encoder agreement)."""
    from .conditioning import pairing

    checks = []
    ident = encoder.identity
    for what, expected in (
        (f"bundle {spec.name!r} declaration", spec.encoder_identity),
        (f"generator of bundle {spec.name!r}", getattr(generator, "expected_encoder", None)),
    ):
        if expected is not None:
            ok = expected == ident
            detail = (
                f"encoder identity matches the {what}" if ok
                else f"encoder mismatch ({what}): expected {expected.to_dict()}, found {ident.to_dict()}"
            )
            checks.append(Check("identity", ok, detail))
    dim_ok = generator.conditioning_dimension == encoder.dimension
    checks.append(Check("dimension", dim_ok, (
        f"bundle {spec.name!r}: encoder dimension {encoder.dimension} "
        f"{'==' if dim_ok else '!='} generator conditioning dimension {generator.conditioning_dimension}"
    )))
    ref = getattr(generator, "reference", None)
    if ref is None:
        checks.append(Check("pairing", True, f"skipped: the {spec.generator.get('type')} generator has no "
                                              "image encoder of its own to compare with"))
    elif dim_ok and ref.dimension == encoder.dimension:
        r = pairing(encoder, ref)
        ok = r.mean_cosine >= spec.min_pairing_cosine
        checks.append(Check("pairing", ok, (
            f"bundle {spec.name!r}: encoder {ident.name} and {ref.source} "
            f"{'agree' if ok else 'disagree'} on {r.images} public images: mean cosine {r.mean_cosine:.3f} "
            f"(min {r.min_cosine:.3f}) {'>=' if ok else '<'} {spec.min_pairing_cosine}"
            + ("" if ok else "; refusing the pair")
        )))
    else:
        checks.append(Check("pairing", False, (
            f"bundle {spec.name!r}: encoder dimension {encoder.dimension} != {ref.source} "
            f"dimension {ref.dimension}"
        )))
    return checks


def declared_conditioning_dimension(spec: BundleSpec) -> int | None:
    """The generator's conditioning dimension as its JSON files declare it, importing no model code.

    ``generator.conditioning_dimension`` in the bundle file wins; else ``rdm`` reads ``dim`` from the
    folder's ``rdm_config.json`` and ``rdm-packed`` from the packed JSON's ``rdm`` section. Other
    types declare nothing (None). A loaded generator is checked against this value.

    Raises:
        ValueError: a declared value or config file is malformed.
    """
    gen = spec.generator
    if "conditioning_dimension" in gen:
        dim = gen["conditioning_dimension"]
        where = f"bundle {spec.path}: generator.conditioning_dimension"
    elif gen.get("type") in ("rdm", "rdm-packed") and "path" in gen:
        path = _resolve(spec.path.parent, str(gen["path"]))
        cfg = path / "rdm_config.json" if gen["type"] == "rdm" else path
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # missing or unreadable: the real load names the problem
        dim = (raw.get("rdm") if gen["type"] == "rdm-packed" else raw) or {}
        dim = dim.get("dim") if isinstance(dim, dict) else None
        if dim is None:
            return None
        where = f"{cfg}: dim"
    else:
        return None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"{where} must be a positive integer; found {dim!r}")
    return dim


def load_bundle(
    name_or_path: str | Path = DEFAULT_BUNDLE,
    device: Any = None,
    dtype: Any = None,
    refuse: bool = True,
    encoder: Encoder | None = None,
) -> Bundle:
    """Load a bundle's encoder and generator and check that they belong together.

    Args:
        name_or_path: a bundle name or a bundle file.
        device, dtype: as :func:`load_encoder` (used for both models).
        refuse: raise on the first failed check (``False``: return the bundle with its ``checks``,
            for ``dprdm models check``).
        encoder: the bundle's encoder, already loaded (the server loads it first and the generator
            in the background); None loads it.

    Raises:
        FileNotFoundError: unknown bundle or missing model files (named).
        BundleMismatchError: the encoder's identity differs from the bundle's or the generator's
            declared identity, its dimension from the generator's conditioning dimension, or its
            direction from the pipeline's own image encoder on the probe images.
    """
    spec = read_bundle(name_or_path)
    base = spec.path.parent
    if encoder is None:
        encoder = load_encoder(spec.encoder, base, device=device, dtype=dtype)
    if refuse and spec.encoder_identity is not None:  # cheap, before the generator loads
        check_identity(spec.encoder_identity, encoder.identity, what=f"bundle {spec.name!r} declaration")
    generator = load_generator(spec.generator, base, device=device, dtype=dtype)
    checks = _checks(spec, encoder, generator)
    failed = [c for c in checks if not c.ok]
    if refuse and failed:
        raise BundleMismatchError(failed[0].detail)
    return Bundle(spec=spec, encoder=encoder, generator=generator, checks=checks)


_SHARED: dict[tuple[str, str, str, str], Bundle] = {}
_SHARED_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple[str, str, str, str], threading.Lock] = {}


def shared_key(name_or_path: str | Path = DEFAULT_BUNDLE, device: Any = None, dtype: Any = None) -> tuple[str, str, str, str]:
    """What :func:`shared_bundle` loads a bundle once per: its resolved file, content, device and dtype."""
    path = read_bundle(name_or_path).path.resolve()
    return (str(path), hashlib.sha256(path.read_bytes()).hexdigest(), str(device), str(dtype))


def loaded_shared(key: tuple[str, str, str, str]) -> Bundle | None:
    """The bundle :func:`shared_bundle` already loaded for ``key`` (:func:`shared_key`), else None."""
    with _SHARED_LOCK:
        return _SHARED.get(key)


def shared_bundle(
    name_or_path: str | Path = DEFAULT_BUNDLE, device: Any = None, dtype: Any = None, encoder: Encoder | None = None
) -> Bundle:
    """:func:`load_bundle`, once per process for each resolved bundle (file path and content), device
    and dtype: every index served with one bundle shares its encoder and pipeline (one copy in memory).

    ``encoder``: the bundle's encoder, already loaded (used only if the bundle is not loaded yet).
    One bundle loading does not hold up another (a lock per bundle).

    Raises:
        As :func:`load_bundle`.
    """
    key = shared_key(name_or_path, device, dtype)
    with _SHARED_LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:  # held while loading: two indexes starting together load the bundle once
        with _SHARED_LOCK:
            if key in _SHARED:
                return _SHARED[key]
        bundle = load_bundle(Path(key[0]), device=device, dtype=dtype, encoder=encoder)
        with _SHARED_LOCK:
            return _SHARED.setdefault(key, bundle)
