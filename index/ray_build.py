"""Index building on Ray Data: the same index as :func:`~dprdm.index.build.build_index`, on a cluster.

Pipeline (``dprdm index build --engine ray``)::

    read units          reader split into units (files, parquet row ranges, tar shards), one block each
      -> map_batches    CPU tasks: read bytes (local paths or fsspec URLs), SHA-256, duplicate skip
                        within the unit, decode, preprocess (the CPU half of models.preprocess)
      -> map_batches    encoder actors (ActorPoolStrategy; one GPU each when the cluster has GPUs,
                        whose default dtype there is bf16/fp16; CPU actors otherwise)
      -> driver         rows grouped by unit; a unit complete -> committed as a checkpoint part
                        (``.build/part-NNNNNN``, the shard format of :mod:`~dprdm.index.shards`)
      -> finalize       :func:`~dprdm.index.build.finalize_shards`, the local engine's own finalize

Equivalence with the local engine (same record ids, byte-identical stored vectors; checked by a
test and by ``dprdm index verify --compare``):

* the finalize is the same function, fed the parts in input order (unit order, then item order
  within a unit), whatever order Ray finished them in; it keeps the first occurrence of each
  content hash and sorts records by id, so completion order never matters;
* a part holds exactly what a local shard would: embedded rows, per-item errors (unreadable,
  missing owner, undecodable, non-finite embedding) and duplicates skipped before decoding
  (here within a unit; duplicates across units are dropped by the finalize instead, with the
  same total in ``exact_duplicates_dropped``);
* embeddings are bytewise equal: both engines call the encoder with exactly ``--batch-size``
  inputs (:func:`~dprdm.index.shards.embed_fixed`), and ``encode(preprocess(x))`` equals
  ``encode_images(x)`` (:func:`~dprdm.models.preprocess.split_encoder`).  This needs the same
  device and dtype on both sides: GPU actors in half precision give (legitimately) other bits
  than a CPU build.

One documented difference: an image whose embedding is non-finite and that occurs twice is two
errors here, one error and one duplicate in the local engine (the record set is the same).

Resume: committed parts are reused (``--resume``); only missing units are read again.  The
checkpoint fingerprint adds the engine, the unit size (``--shard-size``) and ``--batch-size``.

Memory: a CPU task holds one unit's bytes; an actor one batch; the driver the rows of the units
in flight, then O(N) small metadata in the finalize (as the local engine).  Workers on other
hosts must see the inputs (fsspec URLs, or a shared filesystem) and have dprdm installed; the
checkpoints and the index are written by the driver.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dprdm.index.build import BuildConfig, BuildResult, finalize_shards, load_train
from dprdm.index.corpus import CorpusReader
from dprdm.index.errors import IndexBuildError
from dprdm.index.readers import iter_unit, plan_units
from dprdm.index.shards import Shard, committed_parts, decode_image, embed_fixed, prepare_output
from dprdm.models.base import Encoder, EncoderIdentity

__all__ = ["RayOptions", "build_index_ray", "registry_encoder"]

_CHECKPOINT_VERSION = 1
_ROWS_PER_BLOCK = 64  # items per output block of a read task (bounds a task's memory to a unit's files)
_READ_TASK_MEMORY = 512 << 20  # logical memory reserved per read task (Ray scheduling only)
_ENCODE, _ERROR, _DUPLICATE, _END = 0, 1, 2, 3  # row kinds; _END closes a unit and carries its size


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Attributes:
        address: ``"auto"`` or a Ray address to join an existing cluster; None starts a local Ray
            (or uses the one this process already initialised).
        workers: CPUs of a local Ray started here (None: all of this machine's).
        encoder_actors: size of the encoder actor pool (default: the cluster's GPUs, else half
            its CPUs, at least 1).
    """

    address: str | None = None
    workers: int | None = None
    encoder_actors: int | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "encoder_actors"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise IndexBuildError(f"--{name.replace('_', '-')} must be a positive integer; found {value!r}")
        if self.address is not None and self.workers is not None:
            raise IndexBuildError(f"--workers sizes a local Ray; the cluster at --address {self.address!r} "
                                  "has its own size (use --encoder-actors to size the actor pool)")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise IndexBuildError("--engine ray needs Ray Data: pip install 'dprdm[build]' (ray[data])") from None
    return ray


def _connect(ray: Any, options: RayOptions) -> bool:
    """Initialise Ray; True if this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    try:
        if options.address is not None:
            ray.init(address=options.address, **kwargs)
        else:
            ray.init(num_cpus=options.workers, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at --address {options.address!r}" if options.address else "a local Ray"
        raise IndexBuildError(f"cannot start or join {where}: {exc}") from None
    return True


def _load_registered(spec: str, device: str | None) -> Encoder:
    from dprdm.models.registry import load_encoder

    return load_encoder(spec, device=device)


def registry_encoder(spec: str, device: str | None = None) -> Callable[[], Encoder]:
    """A picklable encoder factory: loads model-registry ``spec`` where it is called (an encoder actor).

    ``device`` None: the actor's own default (its GPU when Ray gave it one, in bf16/fp16; else the CPU).
    """
    return functools.partial(_load_registered, spec, device)


def _probe(factory: Callable[[], Encoder]) -> tuple[EncoderIdentity, Any]:
    """Run in a worker: the encoder's identity and its picklable CPU preprocessing."""
    from dprdm.models.preprocess import preprocess_for

    encoder = factory()
    return encoder.identity, preprocess_for(encoder)


def build_index_ray(
    reader: CorpusReader,
    encoder_factory: Callable[[], Encoder],
    config: BuildConfig,
    options: RayOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build (or resume) an index from ``reader`` on Ray Data; same result as the local engine.

    Args:
        reader: any reader of :mod:`~dprdm.index.readers` (it is pickled to the CPU tasks).
        encoder_factory: picklable, called once per encoder actor (and once to read the
            identity) to load the encoder where it runs.
        config: as for :func:`~dprdm.index.build.build_index` (``shard_size`` is the read unit).
        options: cluster address and widths.

    Raises:
        IndexBuildError: as the local engine; Ray missing; a task failure (the committed parts
            stay: rerun with ``--resume``).
        PrivacyPolicyError: a configuration that would void the privacy argument.
    """
    options = options or RayOptions()
    ray = _import_ray()
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if config.progress else (lambda _m: None))
    started = _connect(ray, options)
    try:
        try:
            identity, preprocess = ray.get(ray.remote(num_cpus=0)(_probe).remote(encoder_factory))
        except Exception as exc:  # a RayTaskError wrapping the loader's own error
            cause = getattr(exc, "cause", None) or exc
            raise IndexBuildError(f"cannot load the encoder in a Ray worker: {type(cause).__name__}: {cause}") from None
        train = load_train(config, identity.dimension)  # policy checks before any work
        owner_mode = reader.has_owners
        fingerprint = {
            "format_version": _CHECKPOINT_VERSION, "reader": reader.describe(), "encoder": identity.to_dict(),
            "owner_mode": owner_mode, "engine": "ray", "unit_size": config.shard_size,
            "batch_size": config.batch_size,
        }
        build_dir = prepare_output(config.output, config.existing, fingerprint)
        units = plan_units(reader, config.shard_size)
        done = committed_parts(build_dir)
        todo = [u for u in range(len(units)) if u not in done]
        reused = sum(int(m["end"]) for m in done.values())
        say(f"ray: {len(units)} read units, {len(done)} reused from checkpoints, {len(todo)} to encode")
        encoded = 0
        if todo:
            encoded = _run(ray, reader, units, todo, encoder_factory, preprocess, identity.dimension, config,
                           build_dir, owner_mode, options)
        parts = committed_parts(build_dir)
        missing = [u for u in range(len(units)) if u not in parts]
        if missing:
            raise IndexBuildError(f"ray build ended with {len(missing)} unit(s) not committed (e.g. {missing[0]}); "
                                  "rerun with --resume")
        metas = _in_input_order([parts[u] for u in range(len(units))])
        say(f"encoding done: {metas[-1]['end'] if metas else 0} items; finalizing")
        manifest = finalize_shards(config, identity, build_dir, metas, train, owner_mode=owner_mode,
                                   build_info={"reader": reader.describe(), "engine": "ray"})
    finally:
        if started:
            ray.shutdown()
    if not config.keep_checkpoints:
        shutil.rmtree(build_dir, ignore_errors=True)
    say(f"index written to {config.output}")
    return BuildResult(path=config.output, manifest=manifest, stats={"items_encoded": encoded, "items_reused": reused})


def _in_input_order(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parts (in unit order) as contiguous shards: ``shard``, ``start``, ``end`` over the whole input."""
    metas, pos = [], 0
    for i, part in enumerate(parts):
        n = int(part["end"]) - int(part["start"])
        metas.append({**part, "shard": i, "start": pos, "end": pos + n})
        pos += n
    return metas


# -- the pipeline ------------------------------------------------------------------------------


def _resources(ray: Any, options: RayOptions) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(CPU task resources, encoder actor resources, actor pool size) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    # Read tasks reserve memory for one unit of files.  Their remote args differ from the
    # actors' on purpose: Ray Data would otherwise fuse reading and decoding INTO the encoder
    # actors, and decoding would no longer scale with the CPUs.
    task = {"num_cpus": 1.0, "memory": _READ_TASK_MEMORY}
    if gpus > 0:
        return task, {"num_cpus": 1, "num_gpus": 1}, options.encoder_actors or gpus
    share = 1.0 if cpus >= 2 else 0.5  # a 1-CPU cluster must fit one reader and one actor
    return {**task, "num_cpus": share}, {"num_cpus": share}, options.encoder_actors or max(1, int(cpus) // 2)


def _run(ray: Any, reader: CorpusReader, units: list[tuple[Any, ...]], todo: list[int],
         factory: Callable[[], Encoder], preprocess: Any, dim: int, config: BuildConfig,
         build_dir: Any, owner_mode: bool, options: RayOptions) -> int:
    """Encode the units ``todo`` and commit each as a part as soon as it is complete; returns items done."""
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_errored_blocks = 0
    task_res, actor_res, pool = _resources(ray, options)
    ds = ray.data.from_items([{"unit": u} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_read_units, batch_size=1, batch_format="numpy",
                        fn_kwargs={"reader": reader, "units": units, "preprocess": preprocess,
                                   "owner_mode": owner_mode}, **task_res)
    ds = ds.map_batches(_EncoderActor, batch_size=config.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"factory": factory, "batch_size": config.batch_size, "dim": dim},
                        compute=ActorPoolStrategy(min_size=1, max_size=pool), **actor_res)
    collector = _Collector(build_dir, dim, owner_mode)
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    failure: str | None = None
    with tqdm(unit="img", desc="encoding (ray)", disable=not config.progress, dynamic_ncols=True) as bar:
        try:
            for batch in batches:
                if batch["fatal"].size and batch["fatal"][0]:  # an encoder failure: stop the dataset
                    failure = f"encoder failed: {batch['fatal'][0]}"
                    break
                bar.update(collector.add(batch))
        except IndexBuildError:
            raise
        except Exception as exc:  # a task/actor failure: the parts committed so far are kept
            cause = getattr(exc, "cause", None) or exc
            failure = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # shuts the executor down: its actors release their CPUs/GPUs
            del batches, ds
            gc.collect()  # a Ray-side failure leaves the executor in reference cycles
    if failure is not None:
        raise IndexBuildError(f"ray build failed ({failure}); {collector.committed} unit(s) were committed: "
                              "rerun with --resume")
    return collector.items


def _read_units(batch: dict[str, np.ndarray], *, reader: CorpusReader, units: list[tuple[Any, ...]],
                preprocess: Any, owner_mode: bool) -> Iterator[dict[str, np.ndarray]]:
    """CPU task: the items of each unit in ``batch`` -> rows (read, SHA-256, duplicate skip, decode, preprocess)."""
    for u in batch["unit"]:
        u = int(u)
        rows: list[tuple[int, int, str, str, str, str, np.ndarray]] = []
        seen: set[tuple[str, str]] = set()
        n = 0
        for n, item in enumerate(iter_unit(reader, units[u]), start=1):
            rows.append(_row(n - 1, item, seen, owner_mode, preprocess))
            if len(rows) >= _ROWS_PER_BLOCK:
                yield _block(u, rows)
                rows = []
        rows.append((-1, _END, "", "", "", str(n), _NO_PIXELS))
        yield _block(u, rows)


_NO_PIXELS = np.zeros((1, 1, 3), np.uint8)


def _row(idx: int, item: Any, seen: set[tuple[str, str]], owner_mode: bool,
         preprocess: Any) -> tuple[int, int, str, str, str, str, np.ndarray]:
    """One item, with the local engine's rules (:func:`dprdm.index.shards._take`) in the same order."""
    if item.data is None:
        return idx, _ERROR, item.key, "", "", item.error or "no data", _NO_PIXELS
    digest = hashlib.sha256(item.data).hexdigest()
    owner = (item.owner or "") if owner_mode else ""
    if owner_mode and not owner:
        return idx, _ERROR, item.key, "", "", "missing owner", _NO_PIXELS
    if (owner, digest) in seen:
        return idx, _DUPLICATE, item.key, owner, digest, "", _NO_PIXELS
    try:
        image = decode_image(item.data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-item error, never a crash
        return idx, _ERROR, item.key, "", "", f"cannot decode image: {type(exc).__name__}: {exc}"[:300], _NO_PIXELS
    seen.add((owner, digest))
    return idx, _ENCODE, item.key, owner, digest, "", preprocess([image])[0]


def _block(unit: int, rows: list[tuple[int, int, str, str, str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    pixels = np.empty(len(rows), dtype=object)
    pixels[:] = [r[6] for r in rows]
    return {
        "unit": np.full(len(rows), unit, np.int64),
        "idx": np.array([r[0] for r in rows], np.int64),
        "kind": np.array([r[1] for r in rows], np.int8),
        "key": np.array([r[2] for r in rows], dtype=object),
        "owner": np.array([r[3] for r in rows], dtype=object),
        "digest": np.array([r[4] for r in rows], dtype=object),
        "error": np.array([r[5] for r in rows], dtype=object),
        "pixels": pixels,
    }


class _EncoderActor:
    """Encoder actor: loads the encoder once, embeds the ``_ENCODE`` rows in fixed-size calls."""

    def __init__(self, factory: Callable[[], Encoder], batch_size: int, dim: int) -> None:
        from dprdm.models.preprocess import split_encoder

        encoder = factory()
        if encoder.dimension != dim:
            raise IndexBuildError(f"encoder actor loaded dimension {encoder.dimension}, expected {dim}")
        _, self.encode = split_encoder(encoder)
        self.batch_size, self.dim = batch_size, dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kind = batch["kind"].copy()
        error = batch["error"].copy()
        emb = np.zeros((kind.size, self.dim), np.float32)
        fatal = ""
        todo = np.flatnonzero(kind == _ENCODE)
        try:
            for s in range(0, todo.size, self.batch_size):
                rows = todo[s : s + self.batch_size]
                unit, ok = embed_fixed(self.encode, [np.asarray(batch["pixels"][i]) for i in rows],
                                       self.batch_size, self.dim)
                emb[rows] = unit
                kind[rows[~ok]] = _ERROR
                error[rows[~ok]] = "encoder produced a non-finite or zero embedding"
        except Exception as exc:  # noqa: BLE001 - returned as data: the driver stops the dataset cleanly
            fatal = f"{type(exc).__name__}: {exc}"[:400] or "encoder failure"
        out = {k: v for k, v in batch.items() if k not in ("pixels", "kind", "error")}
        return {**out, "kind": kind, "error": error, "embedding": emb,
                "fatal": np.array([fatal] * kind.size, dtype=object)}


class _Collector:
    """Driver side: rows grouped by unit; a complete unit is committed as a part at once."""

    def __init__(self, build_dir: Any, dim: int, owner_mode: bool) -> None:
        self.build_dir, self.dim, self.owner_mode = build_dir, dim, owner_mode
        self.pending: dict[int, list[tuple[int, int, str, str, str, str, np.ndarray]]] = {}
        self.sizes: dict[int, int] = {}
        self.committed = 0
        self.items = 0

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Take one output batch; returns how many items it held (for the progress bar)."""
        items = 0
        touched = set()
        for i in range(batch["unit"].size):
            u, kind = int(batch["unit"][i]), int(batch["kind"][i])
            touched.add(u)
            if kind == _END:
                self.sizes[u] = int(batch["error"][i])
                continue
            items += 1
            self.pending.setdefault(u, []).append((int(batch["idx"][i]), kind, str(batch["key"][i]),
                                                   str(batch["owner"][i]), str(batch["digest"][i]),
                                                   str(batch["error"][i]), batch["embedding"][i]))
        for u in touched:
            if u in self.sizes and len(self.pending.get(u, [])) == self.sizes[u]:
                self._commit(u)
        self.items += items
        return items

    def _commit(self, unit: int) -> None:
        rows = sorted(self.pending.pop(unit, []), key=lambda r: r[0])
        size = self.sizes.pop(unit)
        if [r[0] for r in rows] != list(range(size)):
            raise IndexBuildError(f"ray build: unit {unit} came back incomplete or with repeated items; report this")
        shard = Shard(unit, 0)
        for _idx, kind, key, owner, digest, error, emb in rows:
            if kind == _ERROR:
                shard.errors.append({"key": key, "error": error})
            elif kind == _DUPLICATE:
                shard.duplicates += 1
            else:
                shard.keys.append(key)
                shard.digests.append(digest)
                shard.owners.append(owner)
                shard.vectors.append(np.asarray(emb, np.float32)[None, :])
        shard.commit(self.build_dir, size, self.dim, self.owner_mode, prefix="part")
        self.committed += 1

