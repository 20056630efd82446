"""Adapters from the real ``dprdm.index`` and ``dprdm.models`` objects to the server's protocols.

Imported only by :func:`dprdm.server.app.default_loaders`, so tests with fakes never import
torch or faiss.

``serve`` loads each bundle's generator in the background (:class:`BackgroundGenerator`): the
server says SERVING as soon as the indexes and encoders are loaded, Retrieve is answered at once,
and Generate is refused (``GENERATOR_LOADING``, nothing charged) until the generator is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from dprdm.models.base import EncoderIdentity, Generator, ProgressCallback

from .catalog import Bundle
from .errors import GeneratorFailed, GeneratorLoading

__all__ = ["IndexAdapter", "BackgroundGenerator", "load_index", "load_bundle"]

log = logging.getLogger("dprdm.server")


class IndexAdapter:
    """A :class:`dprdm.index.format.PrivateIndex` seen as a :class:`~dprdm.server.catalog.RetrievalIndex`.

    Only the selected vectors cross this boundary (never ids, scores or their number beyond what
    the release step needs).
    """

    def __init__(self, index: Any) -> None:
        self._index = index
        self._device: Any = None  # a dprdm.index.device.DeviceSearch once use_search_device placed the rows
        self.domain: str = str(index.corpus_id)
        self.version: str = str(index.index_version)
        self.dimension: int = int(index.dimension)
        self.public_size: int = int(index.public_size)
        self.exact_size: int = int(index.count)  # operator-only (admin GetCounts)
        self.private: bool = bool(index.private)
        self.group_size: int = int(getattr(index, "group_size", 1))  # 2: capacity-limited IVF lists
        enc = index.encoder
        self.encoder: EncoderIdentity = (
            enc if isinstance(enc, EncoderIdentity) else EncoderIdentity.from_dict(enc)
        )

    def search_subsampled(
        self,
        query: npt.NDArray[np.float32],
        *,
        k: int,
        q: float,
        rng: np.random.Generator,
        nprobe: int | None = None,
    ) -> npt.NDArray[np.float64]:
        """The top-k survivors' vectors as exactly k rows (clamped to norm <= 1), zero rows where
        fewer than k slots survived: the release's work never depends on how many are real."""
        search = self._device.search_subsampled if self._device is not None else self._index.search_subsampled
        return np.asarray(search(query, k=k, q=q, rng=rng, nprobe=nprobe).padded)

    def use_search_device(self, search_device: str) -> str:
        """Run the private search where ``search_device`` says (``[indexes.*] search_device``).

        Returns:
            A one-line description for the start-up log (public facts only).

        Raises:
            ValueError: unknown value, ``mps``, or a CUDA device that is missing or too small.
            ModuleNotFoundError: a CUDA device without torch.
        """
        from dprdm.index.device import place_index

        self._device, where = place_index(self._index, search_device)
        return str(where)


def load_index(path: str, *, checksum_cache: str | None = None) -> IndexAdapter:
    """Load and verify an index directory with :func:`dprdm.index.format.load`.

    Args:
        path: the index directory.
        checksum_cache: a directory (the server's data dir) for verified checksums: a data file whose
            stat is unchanged is not re-hashed (:mod:`dprdm.index.checksum_cache`). None: re-hash all.

    Raises:
        ValueError: the index is invalid (``IndexFormatError``).
    """
    from dprdm.index.format import load

    return IndexAdapter(load(path, checksum_cache=checksum_cache))


class BackgroundGenerator:
    """A generator that loads on a background thread (started by :meth:`start`).

    ``conditioning_dimension`` is the declared one (known without loading, so the catalog's startup
    check runs unchanged); the loaded generator must have the same. :meth:`loaded` returns the
    loaded generator or refuses: :class:`~dprdm.server.errors.GeneratorLoading` while it loads,
    :class:`~dprdm.server.errors.GeneratorFailed` if the load failed (logged once, one line naming
    the bundle and the error; never sent to a client).

    Args:
        bundle: the bundle's name (in messages and the log).
        conditioning_dimension: the declared conditioning dimension.
        load: loads the generator (and runs the bundle's pairing checks; raising refuses it).
    """

    def __init__(self, bundle: str, conditioning_dimension: int, load: Callable[[], Generator]) -> None:
        self.bundle = bundle
        self._dimension = int(conditioning_dimension)
        self._load = load
        self._done = threading.Event()
        self._generator: Generator | None = None
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def conditioning_dimension(self) -> int:
        """The declared conditioning dimension (the loaded generator is checked against it)."""
        return self._dimension

    @property
    def error(self) -> str | None:
        """Why the load failed (one line, for the operator), or None."""
        return self._error

    @property
    def thread_safe(self) -> bool:
        """The loaded generator's ``thread_safe`` (True until it is loaded)."""
        return getattr(self._generator, "thread_safe", True) is not False

    def start(self) -> BackgroundGenerator:
        """Start loading on a daemon thread (once); returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"dprdm-generator-load-{self.bundle}", daemon=True
            )
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the load finished (loaded or failed); False on timeout."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        start = time.monotonic()
        try:
            generator = self._load()
            dim = generator.conditioning_dimension
            if dim != self._dimension:
                raise ValueError(f"loaded generator has conditioning dimension {dim}, declared {self._dimension}")
        except Exception as exc:  # noqa: BLE001 - any failure refuses Generate; Retrieve keeps working
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            self._error = why
            log.error("bundle %r: the generator failed to load, Generate is refused (Retrieve works): %s",
                      self.bundle, why)  # fmt: skip
        else:
            self._generator = generator
            log.info("bundle %r: generator loaded in the background in %.2f s", self.bundle, time.monotonic() - start)
        finally:
            self._done.set()

    def loaded(self) -> Generator:
        """The loaded generator.

        Raises:
            GeneratorLoading: still loading (UNAVAILABLE with RetryInfo).
            GeneratorFailed: the load failed (FAILED_PRECONDITION).
        """
        if not self._done.is_set():
            raise GeneratorLoading(self.bundle)
        if self._generator is None:
            raise GeneratorFailed(self.bundle)
        return self._generator

    def generate(
        self,
        conditioning: npt.NDArray[np.float32],
        prompt: str,
        n: int,
        steps: int,
        seed: int | None,
        progress: ProgressCallback | None = None,
    ) -> list[Any]:
        """The loaded generator's ``generate`` (refused as :meth:`loaded` while not loaded)."""
        images: list[Any] = self.loaded().generate(conditioning, prompt, n, steps, seed, progress)
        return images


def load_bundle(name: str, *, background: bool = False) -> Bundle:
    """Load a named encoder/generator bundle, once per resolved bundle for the whole process.

    Uses :func:`dprdm.models.registry.shared_bundle`: every index naming the same bundle (by name or
    path) gets the same encoder and generator objects, so a pipeline is in memory once however many
    corpora use it (issue 16 item 5).

    Args:
        name: a bundle name or file.
        background: load only the encoder now and the generator on a background thread (a
            :class:`BackgroundGenerator`, which runs the bundle's pairing checks before it is used);
            ``serve`` does, ``serve --check`` does not. A generator whose conditioning dimension its
            JSON does not declare (:func:`~dprdm.models.registry.declared_conditioning_dimension`)
            loads now.

    Raises:
        FileNotFoundError: unknown bundle or missing model files.
        ValueError: invalid bundle file, or a refused pairing (``BundleMismatchError``).
    """
    from dprdm.models import registry

    if background:
        key = registry.shared_key(name)
        with _LOCK:
            done = _BACKGROUND.get((name, key))
            if done is not None and _failed(done.generator) is None:
                return done
            pending = _PENDING.get(key)
            if pending is not None and _failed(pending[1]) is not None:
                pending = None  # a failed background load is tried again
            if registry.loaded_shared(key) is None:
                pending = pending or _start_background(registry, name)
                if pending is not None:
                    _PENDING[key] = pending
                    bundle = Bundle(name=name, encoder=pending[0], generator=pending[1])
                    _BACKGROUND[name, key] = bundle
                    return bundle
    b = registry.shared_bundle(name)
    with _LOCK:
        key2 = (name, id(b))
        if key2 not in _WRAPPED:
            _WRAPPED[key2] = Bundle(name=name, encoder=b.encoder, generator=b.generator)
        return _WRAPPED[key2]


def _failed(generator: Any) -> str | None:
    return generator.error if isinstance(generator, BackgroundGenerator) else None


def _start_background(registry: Any, name: str) -> tuple[Any, BackgroundGenerator] | None:
    """Load the encoder (and check it against the bundle's declaration) and start the generator's
    background load; None if the generator's dimension is not declared (load it all now)."""
    spec = registry.read_bundle(name)
    dim = registry.declared_conditioning_dimension(spec)
    if dim is None:
        return None
    encoder = registry.load_encoder(spec.encoder, spec.path.parent)
    if spec.encoder_identity is not None:  # cheap: a refused pair still stops the server
        registry.check_identity(spec.encoder_identity, encoder.identity, what=f"bundle {spec.name!r} declaration")
    path = spec.path

    def load() -> Generator:
        return registry.shared_bundle(path, encoder=encoder).generator  # the pairing checks run here

    return encoder, BackgroundGenerator(spec.name, dim, load)  # started by the app once SERVING


_WRAPPED: dict[tuple[str, int], Bundle] = {}
_PENDING: dict[tuple[str, str, str, str], tuple[Any, BackgroundGenerator]] = {}
_BACKGROUND: dict[tuple[str, tuple[str, str, str, str]], Bundle] = {}
_LOCK = threading.Lock()
