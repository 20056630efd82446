"""``dprdm index``: build, info, verify, seal, near-duplicates (registered by :mod:`dprdm.cli.main`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .args import CliError
from .index_shards import register_shard_commands

__all__ = ["register", "resolve_encoder", "encoder_factory"]


def _cli_error(message: str) -> Exception:
    return CliError(message)


def _count(text: str) -> int:
    """An integer, also written as 1e6 or 1_000_000."""
    try:
        value = float(text.replace("_", "")) if any(c in text for c in "eE.") else int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; found {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer; found {text!r}")
    return int(value)


def resolve_encoder(spec: str, device: str | None = None) -> Any:
    """Load ``--encoder SPEC`` on ``--device`` (``None``: CUDA, then MPS, then CPU) through the model registry."""
    from dprdm.models.registry import load_encoder  # a missing 'models' extra: one line (cli.main)

    try:
        return load_encoder(spec, device=device)
    except (ValueError, KeyError, LookupError, OSError) as exc:
        flag = f"--device {device!r}" if device is not None and "device" in str(exc) else f"--encoder {spec!r}"
        raise _cli_error(f"{flag}: {exc}") from None


def encoder_factory(spec: str, device: str | None = None) -> Any:
    """A picklable ``() -> Encoder`` loading ``--encoder SPEC`` in each Ray encoder actor (``--device``
    None: the actor's GPU when Ray gave it one, else the CPU)."""
    from dprdm.index.ray_build import registry_encoder

    return registry_encoder(spec, device)


def register(subparsers: Any) -> None:
    """Add the ``index`` command and its sub-commands to the ``dprdm`` parser."""
    parser = subparsers.add_parser("index", help="build, inspect and verify private indexes",
                                   description="Build, inspect and verify private indexes (SPEC §5).")
    sub = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser("build", help="embed a corpus into a new index directory")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", "-i", nargs="+",
                     help="a folder, a path-list file, parquet file(s) or webdataset .tar shard(s); "
                          "folders and lists may be fsspec URLs (s3://, gs://, file://)")
    src.add_argument("--from-embeddings", nargs="+", metavar="FILE",
                     help="precomputed embeddings: parquet (sha256, embedding[, owner][, key]) or X.npy + X.tsv "
                          "(see dprdm.index.embeddings_input); --encoder names the encoder that made them")
    b.add_argument("--input-type", default="auto", choices=["auto", "folder", "list", "parquet", "webdataset"])
    b.add_argument("--output", "-o", required=True, type=Path, help="index directory to create")
    b.add_argument("--corpus-id", required=True, help="privacy domain of the corpus (one ledger)")
    b.add_argument("--public-size", required=True, type=_count, help="declared public size N̄ >= N")
    b.add_argument("--encoder", required=True, help="model registry spec of the image encoder")
    b.add_argument("--device", default=None, help="encoder device: cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    b.add_argument("--image-column", help="parquet: column with image bytes")
    b.add_argument("--path-column", help="parquet: column with image paths")
    b.add_argument("--key-column", help="parquet: column with a stable record key")
    b.add_argument("--owner-column", help="parquet column / webdataset member naming the owner")
    b.add_argument("--owners", help="folder/list inputs: TSV 'key<TAB>owner' (one record per owner)")
    b.add_argument("--index-type", default="flat", help="flat (exact) or ivf (public quantizer)")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    b.add_argument("--train-vectors", type=Path, help="ivf: PUBLIC training vectors (.npy or a public index)")
    b.add_argument("--nlist", type=_count, help="ivf: number of lists")
    b.add_argument("--nprobe", type=_count, default=1, help="ivf: default nprobe (profiles may override)")
    b.add_argument("--capacity-slack", type=float, default=2.0, help="ivf: public capacity rule slack")
    b.add_argument("--min-capacity", type=_count, default=16, help="ivf: minimum list capacity")
    b.add_argument("--batch-size", type=_count, default=64)
    b.add_argument("--shard-size", type=_count, default=4096, help="items per checkpoint (ray: per read unit)")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one process (default); ray: Ray Data (CPU tasks decode, encoder actors embed; "
                        "same index byte for byte)")
    b.add_argument("--address", help="ray: join this Ray cluster ('auto' = the one this machine belongs to); "
                                     "default: start a local one")
    b.add_argument("--workers", type=_count, help="ray: CPUs of the local Ray started here (default: all)")
    b.add_argument("--encoder-actors", type=_count,
                   help="ray: encoder actor pool size (default: the cluster's GPUs, else half its CPUs)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted build")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing index")
    b.add_argument("--public", action="store_true", help="the corpus is PUBLIC data (not a private index)")
    b.add_argument("--keep-checkpoints", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_cmd_build)

    i = sub.add_parser("info", help="print the manifest summary")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=_cmd_info)

    v = sub.add_parser("verify", help="re-check checksums, shapes and every stored row")
    v.add_argument("path", type=Path)
    v.add_argument("--compare", type=Path, metavar="OTHER",
                   help="also check that OTHER holds the same record ids and byte-identical vectors "
                        "(e.g. a ray build against a local one); exit 1 naming what differs")
    v.set_defaults(func=_cmd_verify)

    se = sub.add_parser("seal", help="seal the manifest of an index built before manifests were sealed",
                        description="Verify the index fully, then record manifest_sha256 over the manifest's "
                                    "fields as they are now (check them with `dprdm index info` first).")
    se.add_argument("path", type=Path)
    se.set_defaults(func=_cmd_seal)

    nd = sub.add_parser("near-duplicates", help="operator-only near-duplicate report (never changes the index)")
    nd.add_argument("path", type=Path)
    nd.add_argument("--threshold", type=float, default=0.95, help="cosine similarity threshold")
    nd.add_argument("--out", type=Path, help="report file (default PATH/reports/near_duplicates.json)")
    nd.set_defaults(func=_cmd_near_duplicates)

    register_shard_commands(sub)  # split, verify-set (dprdm.cli.index_shards)


def _wrap(fn: Any) -> Any:
    from dprdm.index.errors import IndexBuildError, IndexFormatError, PrivacyPolicyError

    try:
        return fn()
    except (IndexBuildError, IndexFormatError, PrivacyPolicyError) as exc:
        raise _cli_error(str(exc)) from None


def _cmd_build(args: argparse.Namespace) -> int:
    from dprdm.index.build import BuildConfig, build_index
    from dprdm.index.readers import open_reader

    if args.no_progress:  # model-loading bars (tqdm, Hugging Face) too, not only the build's own
        from dprdm.server.logs import quiet_progress

        quiet_progress()

    if args.engine != "ray" and (args.address or args.workers or args.encoder_actors):
        raise _cli_error("--address, --workers and --encoder-actors need --engine ray")
    if args.from_embeddings and args.engine == "ray":
        raise _cli_error("--from-embeddings does no encoding: drop --engine ray")

    def run() -> int:
        config = BuildConfig(
            output=args.output, corpus_id=args.corpus_id, public_size=args.public_size,
            index_type=args.index_type, dtype=args.dtype, private=not args.public,
            train_vectors=args.train_vectors, nlist=args.nlist, nprobe=args.nprobe,
            capacity_slack=args.capacity_slack, min_capacity=args.min_capacity, batch_size=args.batch_size,
            shard_size=args.shard_size, existing="resume" if args.resume else "overwrite" if args.overwrite else "refuse",
            progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints,
        )
        if args.from_embeddings:
            from dprdm.index.embeddings_input import build_from_embeddings

            result = build_from_embeddings(args.from_embeddings, resolve_encoder(args.encoder, args.device).identity,
                                           config)
        else:
            reader = open_reader(args.input, input_type=args.input_type, image_column=args.image_column,
                                 path_column=args.path_column, owner_column=args.owner_column,
                                 key_column=args.key_column, owners_file=args.owners)
            if args.engine == "ray":
                from dprdm.index.ray_build import RayOptions, build_index_ray

                options = RayOptions(address=args.address, workers=args.workers, encoder_actors=args.encoder_actors)
                result = build_index_ray(reader, encoder_factory(args.encoder, args.device), config, options)
            else:
                result = build_index(reader, resolve_encoder(args.encoder, args.device), config)
        m = result.manifest
        print(f"built {result.path}: {m['count']} records (operator-only), public size {m['public_size']}, "
              f"{m['dedup'].get('unreadable_or_skipped', 0)} unreadable, "
              f"{m['dedup'].get('exact_duplicates_dropped', 0)} exact duplicates dropped")
        return 0

    return int(_wrap(run))


def _summary(m: dict[str, Any]) -> list[str]:
    enc = m["encoder"]
    lines = [
        f"index          {m.get('index_version', '?')} (format {m['format_version']})",
        f"corpus id      {m['corpus_id']}  ({'PRIVATE' if m['private'] else 'public'})",
        f"encoder        {enc['name']}  sha256 {enc['weights_sha256'][:16]}...  dim {enc['dimension']}",
        f"vectors        {m['dtype']}, {m['dimension']}-d, metric {m.get('metric', 'inner_product')}",
        f"public size N̄  {m['public_size']}",
        f"records N      {m['count']}  (operator-only)",
        f"record unit    {m.get('record_unit', 'image')}",
        f"index type     {m['index_type']}  factory {m['faiss_factory']!r}",
    ]
    if m.get("quantizer"):
        qz = m["quantizer"]
        lines.append(f"quantizer      trained on {qz['trained_on']} vectors: {qz.get('kind')} {qz.get('source', '')}"
                     f" (n={qz.get('n_train')})")
    if m.get("ivf"):
        ivf = m["ivf"]
        lines.append(f"ivf            nlist {ivf['nlist']}, nprobe {ivf['nprobe']}, total capacity "
                     f"{ivf['total_capacity']}, slack {ivf['capacity_rule']['slack']}")
    group = int(m.get("group_size", 1))
    lines.append(f"group size     {group}" + ("  (one record can change two stored records: charged the group-2 curve;"
                                          " list overflow counts in reports/build_report.json, operator-only)"
                                          if group == 2 else ""))
    if m.get("dedup"):
        lines.append("dedup          " + ", ".join(f"{k} {v}" for k, v in m["dedup"].items()) + "  (operator-only)")
    lines.append(f"preprocessing  {m.get('preprocessing', '')}")
    seal = m.get("manifest_sha256")
    lines.append(f"manifest       sealed sha256 {seal[:16]}..." if seal else
                 "manifest       NOT sealed (its fields are not covered by a checksum; see dprdm index seal)")
    for name, entry in sorted(m["files"].items()):
        lines.append(f"file           {name}  {entry['bytes']} bytes  sha256 {entry['sha256'][:16]}...")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    from dprdm.index.format import load

    def run() -> int:
        idx = load(args.path, verify_checksums=False)
        m = idx.manifest
        print(json.dumps(m, indent=2, sort_keys=True) if args.json else "\n".join(_summary(m)))
        return 0

    return int(_wrap(run))


def _cmd_verify(args: argparse.Namespace) -> int:
    from dprdm.index.format import is_sealed, verify

    def run() -> int:
        idx = verify(args.path)
        if args.compare is not None:
            from dprdm.index.compare import compare_indexes

            diffs = compare_indexes(args.path, args.compare)
            if diffs:
                print(f"DIFFERENT {args.path} vs {args.compare}:", *(f"  {d}" for d in diffs), sep="\n")
                return 1
            print(f"SAME {args.path} and {args.compare}: same record ids, byte-identical vectors "
                  f"({', '.join(sorted(idx.manifest['files']))})")
        m = idx.manifest
        if is_sealed(m):
            print(f"OK {idx.path}: sealed manifest, {len(m['files'])} file checksums and every stored row verified")
        else:
            print(f"OK {idx.path}: {len(m['files'])} file checksums and every stored row verified; "
                  "WARNING: the manifest is NOT sealed (built before manifest_sha256 existed), so its own fields "
                  "(private, corpus_id, public_size, ...) are unprotected: check them with `dprdm index info "
                  f"{idx.path}`, then run `dprdm index seal {idx.path}` (or rebuild the index)")
        return 0

    return int(_wrap(run))


def _cmd_seal(args: argparse.Namespace) -> int:
    from dprdm.index.format import seal

    def run() -> int:
        if seal(args.path):
            print(f"sealed {args.path}: manifest_sha256 now covers every manifest field")
        else:
            print(f"{args.path}: the manifest is already sealed and its seal holds; nothing to do")
        return 0

    return int(_wrap(run))


def _cmd_near_duplicates(args: argparse.Namespace) -> int:
    from dprdm.index.duplicates import near_duplicate_report
    from dprdm.index.format import atomic_write_json, load

    def run() -> int:
        idx = load(args.path)
        try:
            report = near_duplicate_report(idx, args.threshold)
        except ValueError as exc:
            raise _cli_error(f"--threshold: {exc}") from None
        out = args.out or (idx.path / "reports" / "near_duplicates.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, report)
        print(f"{report['pairs']} near-duplicate pair(s) in {report['groups']} group(s) (largest {report['largest_group']});"
              f" report written to {out} (operator-only)", file=sys.stdout)
        return 0

    return int(_wrap(run))
