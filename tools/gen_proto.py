"""Regenerate the Python gRPC code in ``server/_proto`` from ``proto/`` (deterministic).

Usage (from anywhere)::

    python -m dprdm.server.gen_proto          # or: python server/gen_proto.py
    git diff --exit-code server/_proto        # what CI checks

``grpc_tools.protoc`` writes absolute imports such as ``from dprdm.v1 import types_pb2``; they
are rewritten to ``from dprdm.proto.v1 import types_pb2`` so the generated modules
import inside the installed package. Output is a pure function of the ``.proto`` files and the
pinned ``grpcio-tools`` version.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
OUT_ROOT = PROTO_ROOT
PACKAGE_PREFIX = "dprdm.proto."
_IMPORT_RE = re.compile(r"^(from|import) dprdm\.((?:shard\.)?v1)\b", re.MULTILINE)  # dprdm.v1, dprdm.shard.v1


def proto_files() -> list[Path]:
    """The ``.proto`` sources, sorted (relative to ``proto/``)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def rewrite_imports(text: str) -> str:
    """Rewrite ``from dprdm.v1 import x`` (and ``dprdm.shard.v1``) to the in-package absolute import."""
    return _IMPORT_RE.sub(lambda m: f"{m.group(1)} {PACKAGE_PREFIX}{m.group(2)}", text)


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Run protoc (python, grpc and pyi outputs) into ``out_root`` and post-process the imports.

    Args:
        out_root: output directory (``proto/``, beside the sources; tests use a temporary one).

    Returns:
        The generated files, sorted.

    Raises:
        RuntimeError: if protoc fails.
    """
    from grpc_tools import protoc  # test/dev dependency only

    files = proto_files()
    for stale in out_root.rglob("*_pb2*.py*"):  # only generated files: never the .proto sources
        stale.unlink()
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(f) for f in files],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    generated = sorted(out_root.rglob("*_pb2*.py*"))
    for path in generated:
        path.write_text(rewrite_imports(path.read_text(encoding="utf-8")), encoding="utf-8")
    return generated


def main() -> int:
    """Command-line entry point."""
    for path in generate():
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
