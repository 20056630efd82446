"""Issue 16 item 6: the example bundles for real weights (``models/bundles/``) and their tiny mirrors.

Nothing downloads. The examples are checked against what can be known without their weights:
open_clip's own registry (architecture, pretrained tag, Hugging Face repository, file name,
dimension) and the image-encoder configs the pipelines' publishers ship
(:data:`~dprdm.models.testing.PUBLISHED_IMAGE_ENCODERS`). Each tiny mirror
(:func:`~dprdm.models.testing.mirror_bundle`) is derived from its example's JSON and then loads,
pairs (or is refused when mispaired), generates, and generates through a live server over an
index built by ``dprdm index build --encoder``.
"""

from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path

import numpy as np
import pytest

from dprdm.models import registry, testing

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = testing.EXAMPLE_BUNDLES
OPEN_CLIP = {  # example -> (open_clip architecture, pretrained tag of the publisher's weights)
    "sd21-unclip-h": ("ViT-H-14", "laion2b_s32b_b79k"),
    "sd21-unclip-l": ("ViT-L-14-quickgelu", "openai"),
    "kandinsky-2.2-bigg": ("ViT-bigG-14", "laion2b_s39b_b160k"),
    "sd15-ip-adapter-h": ("ViT-H-14", "laion2b_s32b_b79k"),
}
PIPELINE_CLASS = {
    "stable-unclip": "StableUnCLIPImg2ImgPipeline",
    "kandinsky-2.2": "KandinskyV22Pipeline",
    "sd-ip-adapter": "StableDiffusionPipeline",
}


def _example(name: str) -> dict:
    return json.loads((registry.BUNDLES_DIR / f"{name}.json").read_text())


def _referenced_files(doc: dict) -> list[str]:
    """Every file the bundle's loaders read by name (a pipeline folder is read through model_index.json)."""
    gen = doc["generator"]
    files = [doc["encoder"].partition("@")[2], gen["path"] + "/model_index.json"]
    if "image_encoder" in gen:
        files.append(gen["image_encoder"] + "/config.json")
    if "ip_adapter" in gen:
        files.append(gen["ip_adapter"])
    return files


def _covered(path: str, sources: tuple[registry.Source, ...]) -> bool:
    """Whether a source fetches ``path``: it lies under the source's local_dir and matches an include."""
    for s in sources:
        prefix = s.local_dir.rstrip("/") + "/"
        if path.startswith(prefix) and any(fnmatch.fnmatch(path[len(prefix) :], g) for g in s.include):
            return True
    return False


# --- the example bundles ---------------------------------------------------------------------------


def _check_recommended(spec, doc) -> None:
    """Issue 16 item 10: each example carries the profiles benchmarks/fidelity.py recommends for its
    dimension, and each stays within its epsilon under the curve the server charges (discrete noise
    at the bundle's dimension, RDP) at the delta it was calibrated for."""
    from dprdm.privacy.calibration import meets_target

    assert spec.recommended_profiles, "run benchmarks/fidelity.py and copy its recommended_profiles in"
    for rec in spec.recommended_profiles:
        assert rec.dimension == doc["generator"]["conditioning_dimension"]
        assert meets_target(rec.profile, queries=rec.queries, delta=rec.delta, epsilon=rec.epsilon,
                            hardened_dimension=rec.dimension)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_parses_and_names_the_publishers_files(name, monkeypatch):
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    monkeypatch.delenv("DPRDM_MODELS", raising=False)  # parsing needs no variable
    spec = registry.read_bundle(name)
    doc = _example(name)
    assert spec.name == name and spec.min_pairing_cosine == 0.98
    _check_recommended(spec, doc)
    arch, tag = OPEN_CLIP[name]
    assert doc["encoder"].startswith(f"open_clip:{arch}@${{DPRDM_MODELS}}/")
    checkpoint = doc["encoder"].partition("@")[2]
    assert Path(checkpoint).name == HF_SAFE_WEIGHTS_NAME  # the file open_clip itself fetches first
    assert arch in open_clip.list_models() and (arch, tag) in open_clip.list_pretrained()
    hub = open_clip.get_pretrained_cfg(arch, tag)["hf_hub"].rstrip("/")
    assert [s.repo for s in spec.sources if checkpoint.startswith(s.local_dir + "/")] == [hub]
    dim = registry.declared_conditioning_dimension(spec)
    assert dim == open_clip.get_model_config(arch)["embed_dim"]
    published = {k: v for k, v in testing.PUBLISHED_IMAGE_ENCODERS[name].items() if k != "config"}
    assert testing.open_clip_vision_facts(arch) == published  # same tower, same activation
    assert published["projection_dim"] == dim
    uncovered = [f for f in _referenced_files(doc) if not _covered(f, spec.sources)]
    assert uncovered == [], f"files no source fetches: {uncovered}"
    import diffusers

    assert hasattr(diffusers, PIPELINE_CLASS[doc["generator"]["type"]])
    assert doc["generator"].get("embedding_scale") == "mean-norm"


README = Path(registry.__file__).with_name("README.md")


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_readme_fetches_builds_and_serves_each_example_as_its_json_says(name):
    import re
    import tomllib

    from dprdm.server.config import parse_config

    text = README.read_text()
    section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
    doc, spec = _example(name), registry.read_bundle(name)
    assert f"--encoder '{doc['encoder']}'" in section
    for s in spec.sources:
        command = section.split(f"hf download {s.repo} ", 1)[1].split("--local-dir", 1)
        assert command[1].lstrip().startswith(f'"{s.local_dir.replace("${DPRDM_MODELS}", "$DPRDM_MODELS")}"')
        fetched = [g.strip('"') for g in re.findall(r"(?:--include )?(\S+)", command[0].replace("\\\n", " "))]
        assert sorted(fetched) == sorted(s.include), s.repo
    (toml,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    cfg = tomllib.loads(toml)
    cfg["tokens"] = [{"tenant": "alice", "role": "tenant", "token": "tenant-token-alice-0001"}]
    assert parse_config(cfg).indexes[0].bundle in EXAMPLES


def test_the_openai_weights_need_the_quickgelu_architecture():
    """unCLIP-small's image encoder is OpenAI's ViT-L/14 (QuickGELU): plain ``ViT-L-14`` differs from it."""
    published = {k: v for k, v in testing.PUBLISHED_IMAGE_ENCODERS["sd21-unclip-l"].items() if k != "config"}
    plain = testing.open_clip_vision_facts("ViT-L-14")
    assert plain != published and {k for k in plain if plain[k] != published[k]} == {"hidden_act"}
    assert testing.open_clip_vision_facts("ViT-H-14") != published


def test_the_examples_are_listed_and_load_only_with_their_models_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DPRDM_MODELS", raising=False)
    assert set(EXAMPLES) <= {b.name for b in registry.list_bundles()}
    with pytest.raises(ValueError, match=r"uses \$\{DPRDM_MODELS\}, which is not set") as err:
        registry.load_bundle("sd21-unclip-h", device="cpu")
    assert "\n" not in str(err.value) and "models/README.md" in str(err.value)
    monkeypatch.setenv("DPRDM_MODELS", str(tmp_path))
    missing = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K" / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"open_clip checkpoint not found: {missing}"):
        registry.load_bundle("sd21-unclip-h", device="cpu")


def test_variables_expand_in_paths_and_encoder_specs(monkeypatch, tmp_path):
    monkeypatch.setenv("DPRDM_T_ROOT", "/models")
    monkeypatch.setenv("DPRDM_T_SUB", "sd")
    assert registry.expand_vars("${DPRDM_T_ROOT}/${DPRDM_T_SUB}/unet") == "/models/sd/unet"
    assert registry.expand_vars("~/no/variables") == "~/no/variables"
    monkeypatch.setenv("DPRDM_T_EMPTY", "")
    for bad, why in [
        ("${DPRDM_T_UNSET}/x", r"uses \$\{DPRDM_T_UNSET\}, which is not set"),
        ("${DPRDM_T_EMPTY}/x", r"uses \$\{DPRDM_T_EMPTY\}, which is not set"),
        ("$DPRDM_T_ROOT/x", r"must start a variable written \$\{NAME\}"),
        ("${DPRDM_T_ROOT/x", r"must start a variable written"),
    ]:
        monkeypatch.delenv("DPRDM_T_UNSET", raising=False)
        with pytest.raises(ValueError, match=why):
            registry.expand_vars(bad)
    testing.write_tiny_open_clip(tmp_path / "clip", dim=16)
    monkeypatch.setenv("DPRDM_T_ROOT", str(tmp_path))
    enc = registry.load_encoder("open_clip:local-dir:${DPRDM_T_ROOT}/clip", device="cpu")
    assert enc.dimension == 16
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):  # generator paths too
        registry.load_generator({"type": "rdm", "path": "${DPRDM_T_ROOT}/nothing"}, device="cpu")


GOOD = {
    "epsilon": 10.0,
    "queries": 1000,
    "k": 18,
    "q": 0.01,
    "sigma": 0.074,
    "lambda": 0.5,
    "dimension": 1024,
}


def _with(tmp_path: Path, **fields) -> Path:
    doc = {
        "name": "p",
        "encoder": "dprdm-mini",
        "generator": {"type": "stable-unclip", "path": "x", "conditioning_dimension": 1024},
        **fields,
    }
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    return f


def test_recommended_profiles_are_typed_and_validated(tmp_path):
    spec = registry.read_bundle(_with(tmp_path, recommended_profiles=[GOOD, {**GOOD, "delta": 1e-6, "k": 4}]))
    from dprdm.privacy import Profile

    p = spec.recommended_profiles
    assert p[0] == registry.RecommendedProfile(Profile(18, 0.01, 0.074, 0.5), 10.0, 1000, 1024, None)
    assert (p[1].profile.k, p[1].delta, p[1].profile.lam) == (4, 1e-6, 0.5)
    bad = [
        ({"x": 1}, r"recommended_profiles must be a list; found \{'x': 1\}"),
        ([3], r"recommended_profiles\[0\] must be an object"),
        ([{k: v for k, v in GOOD.items() if k != "sigma"}], r"missing \['sigma'\], unknown \[\]"),
        ([{**GOOD, "cosine": 0.3}], r"missing \[\], unknown \['cosine'\]"),
        ([GOOD, {**GOOD, "q": 0}], r"recommended_profiles\[1\]: q must be in \(0, 1\]; found 0"),
        ([{**GOOD, "lambda": 1.5}], r"\]: lambda must be in \[0, 1\]; found 1\.5"),
        ([{**GOOD, "k": 0}], r"\]: k must be an integer >= 1; found 0"),
        ([{**GOOD, "queries": True}], r"\.queries must be an integer >= 1; found True"),
        ([{**GOOD, "sigma": float("nan")}], r"\]: sigma must not be NaN; found nan"),
        ([{**GOOD, "epsilon": "10"}], r"\.epsilon must be a finite number > 0; found '10'"),
        ([{**GOOD, "delta": 1}], r"\.delta must be a number in \(0, 1\); found 1"),
        ([{**GOOD, "dimension": 768}], r"\.dimension 768 != generator.conditioning_dimension 1024"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match) as err:
            registry.read_bundle(_with(tmp_path, recommended_profiles=value))
        assert str(err.value).startswith(f"bundle {tmp_path / 'p.json'}: ") and "\n" not in str(err.value)


def test_sources_are_validated(tmp_path):
    ok = {"repo": "org/name", "local_dir": "${DPRDM_MODELS}/name", "include": ["unet/*"]}
    assert registry.read_bundle(_with(tmp_path, sources=[ok])).sources == (
        registry.Source("org/name", "${DPRDM_MODELS}/name", ("unet/*",)),
    )
    for value, match in [
        ([{**ok, "repo": "name"}], r"sources\[0\]\.repo must be 'org/name'; found 'name'"),
        ([{**ok, "include": []}], r"sources\[0\]\.include must be a non-empty list of glob patterns"),
        ([{**ok, "local_dir": ""}], r"sources\[0\]\.local_dir must be a non-empty string"),
        (
            [{**ok, "revision": "main"}],
            r"sources\[0\] must be an object with exactly repo, local_dir, include",
        ),
        ("org/name", r"sources must be a list"),
    ]:
        with pytest.raises(ValueError, match=match):
            registry.read_bundle(_with(tmp_path, sources=value))


# --- the tiny mirrors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory) -> dict[str, Path]:
    """All four mirrors under ONE models folder (they share the tiny ViT-H/14 files, as real ones do)."""
    root = tmp_path_factory.mktemp("models")
    return {name: testing.mirror_bundle(name, root) for name in EXAMPLES}


def _leaves(doc, at=""):
    if isinstance(doc, dict):
        return {k: v for key, sub in doc.items() for k, v in _leaves(sub, f"{at}/{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, sub in enumerate(doc) for k, v in _leaves(sub, f"{at}[{i}]").items()}
    return {at: doc}


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_mirror_is_its_example_with_paths_swapped(name, mirrors):
    example, mirror = _example(name), json.loads(mirrors[name].read_text())
    root = str(mirrors[name].parent)
    a, b = _leaves(example), _leaves(mirror)
    assert a.keys() == b.keys()
    arch = OPEN_CLIP[name][0]
    for key in a:
        if key == "/name":
            assert b[key] == f"{name}-mirror"
        elif key == "/encoder":
            assert b[key] == a[key].replace(f":{arch}@", f":dprdm-mirror-{arch}@").replace(
                "${DPRDM_MODELS}", root
            )
        elif key == "/generator/size":
            assert b[key] == testing.MIRROR_SIZE
        else:
            assert b[key] == (
                a[key].replace("${DPRDM_MODELS}", root) if isinstance(a[key], str) else a[key]
            ), key
    # the mirror's files sit where the example's sources put the publishers' files
    spec = registry.read_bundle(name)
    sources = tuple(
        registry.Source(s.repo, s.local_dir.replace("${DPRDM_MODELS}", root), s.include) for s in spec.sources
    )
    files = _referenced_files(mirror)
    assert all(Path(f).is_file() for f in files)
    written = [str(p) for s in sources for p in Path(s.local_dir).rglob("*") if p.is_file()]
    assert written and [f for f in written if not _covered(f, sources)] == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_mirror_loads_pairs_and_generates(name, mirrors):
    from dprdm.models import pipelines

    bundle = registry.load_bundle(mirrors[name], device="cpu")
    assert [(c.name, c.ok) for c in bundle.checks] == [("dimension", True), ("pairing", True)]
    assert "agree on 12 public images: mean cosine 1.000" in bundle.checks[-1].detail
    gen = bundle.generator
    kind = _example(name)["generator"]["type"]
    assert type(gen) is pipelines.PIPELINE_GENERATORS[kind]
    assert type(gen.pipe).__name__ == PIPELINE_CLASS[kind]
    assert (
        gen.conditioning_dimension
        == bundle.encoder.dimension
        == registry.declared_conditioning_dimension(registry.read_bundle(name))
    )
    assert gen.embedding_scale_source.startswith("mean-norm") and gen.embedding_scale > 1.5
    assert bundle.encoder.identity.name == f"open_clip:dprdm-mirror-{OPEN_CLIP[name][0]}"
    u = bundle.encoder.encode_texts(["a red circle on a blue square"])[0]
    images = gen.generate(u, "a red circle on a blue square", n=1, steps=2, seed=0)
    assert images[0].size == (testing.MIRROR_SIZE, testing.MIRROR_SIZE) and np.asarray(images[0]).std() > 0


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_mispaired_mirror_is_refused_naming_both_encoders(name, tmp_path):
    f = testing.mirror_bundle(name, tmp_path, mispair=True)
    with pytest.raises(registry.BundleMismatchError) as err:
        registry.load_bundle(f, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and f"encoder open_clip:dprdm-mirror-{OPEN_CLIP[name][0]} and " in msg
    assert "disagree on 12 public images" in msg and "< 0.98; refusing the pair" in msg


def test_mirror_bundle_names_what_it_cannot_mirror(tmp_path):
    with pytest.raises(FileNotFoundError, match="no example bundle 'dprdm-mini'; examples: "):
        testing.mirror_bundle("dprdm-mini", tmp_path)


# --- live: index build --encoder, serve, Generate over gRPC -----------------------------------------


def _generate_when_loaded(client, index: str, deadline_s: float = 120.0):
    """Generate, retrying while the server still loads the generator (refused uncharged)."""
    from dprdm.clients.client import DprdmError

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.generate(index, "a red circle on a blue square", steps=2, seed=3)
        except DprdmError as e:
            if e.reason != "GENERATOR_LOADING" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_mirror_generates_through_a_live_server(name, mirrors, tmp_path):
    import io

    from PIL import Image

    from dprdm.cli.main import main
    from dprdm.clients.client import Client
    from dprdm.index.testing import write_image_folder
    from dprdm.ledger import MemoryLedger
    from dprdm.server.app import default_loaders
    from dprdm.server.testing import TENANT_TOKEN, ServerThread, make_config

    encoder_spec = json.loads(mirrors[name].read_text())["encoder"]
    write_image_folder(tmp_path / "private", 12)
    corpus = f"corpus-{name}"
    build = f"index build --corpus-id {corpus} --public-size 32 --device cpu --no-progress".split()
    paths = [
        "--input",
        str(tmp_path / "private"),
        "--output",
        str(tmp_path / "idx"),
        "--encoder",
        encoder_spec,
    ]
    assert main(build + paths) == 0
    cfg = make_config(
        indexes={
            "private": {
                "path": str(tmp_path / "idx"),
                "bundle": str(mirrors[name]),
                "profiles": {"default": {"k": 4, "q": 0.5, "sigma": 0.5, "lambda": 0.5}},
            }
        },
        budgets={corpus: {"epsilon": 50.0}},
    )
    with ServerThread(cfg, ledger=MemoryLedger(), loaders=default_loaders(background=True)) as srv:
        with Client(srv.address, TENANT_TOKEN) as c:
            (info,) = c.list_indexes()
            assert info.domain == corpus
            out = _generate_when_loaded(c, "private")
            assert len(out.images) == 1 and out.receipt.spend_id
            image = Image.open(io.BytesIO(out.images[0]))
            assert image.size == (testing.MIRROR_SIZE, testing.MIRROR_SIZE)
            assert c.budget("private").epsilon_spent > 0
