"""The bounded generation pool: a fixed number of workers and a bounded queue in front of them.

Admission (:meth:`GenerationPool.admit`) happens BEFORE any budget charge, so an overloaded
server answers ``UNAVAILABLE`` without spending privacy. Generation is post-processing of the
release: it never touches private data, and a client seed drives only the sampler.

Workers run concurrently on shared generators. The project's generators are thread-safe (each call
has its own scheduler state, ``thread_safe = True``); a generator that declares
``thread_safe = False`` has its calls serialised by a per-generator lock.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dprdm.models.base import Generator

from .api_types import ImageOut, Progress
from .errors import Overloaded

__all__ = ["GenerationPool", "Slot", "GenerationJob"]


class _Stop(Exception):
    """Raised from the progress callback to stop a generation whose caller went away."""


@dataclass
class Slot:
    """A place in the pool (queued or running); release it exactly once."""

    pool: GenerationPool
    position: int
    released: bool = False

    def release(self) -> None:
        """Give the place back."""
        if not self.released:
            self.released = True
            self.pool._leave()


@dataclass(frozen=True)
class GenerationJob:
    """One generation: the conditioning (the release) and the sampler parameters."""

    generator: Generator
    conditioning: npt.NDArray[np.float32]
    prompt: str
    num_images: int
    steps: int
    seed: int


class GenerationPool:
    """``workers`` generation threads and at most ``queue`` waiting requests."""

    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dprdm-generate")
        self._running: asyncio.Semaphore | None = None
        self._inside = 0
        self._lock = threading.Lock()
        self.on_generated: Callable[[float], None] | None = None
        """Called with the seconds a worker spent making one job's images (metrics)."""

    @property
    def inside(self) -> int:
        """Requests queued or running (public: depends on traffic only)."""
        return self._inside

    def admit(self) -> Slot:
        """Take a place, or raise :class:`Overloaded` (before any charge)."""
        with self._lock:
            if self._inside >= self.capacity:
                raise Overloaded()
            self._inside += 1
            return Slot(self, position=max(0, self._inside - self.workers - 1))

    def _leave(self) -> None:
        with self._lock:
            self._inside -= 1

    @staticmethod
    def new_seed() -> int:
        """A sampler seed when the client gave none (not DP randomness)."""
        return secrets.randbits(63)

    async def run(self, job: GenerationJob) -> AsyncIterator[Progress | ImageOut]:
        """Wait for a worker, run the job there, and yield progress then the PNG images.

        Closing the iterator early (the caller went away) stops the generation at its next step.
        """
        if self._running is None:
            self._running = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress | ImageOut | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Progress | ImageOut | BaseException | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> None:
            try:
                start = time.perf_counter()
                images = _generate(job, stop, put)
                if self.on_generated is not None:  # metrics: public inputs only (steps, images, model)
                    self.on_generated(time.perf_counter() - start)
                for ev in images:
                    put(ev)
                put(None)
            except _Stop:
                put(None)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the caller's task
                put(exc)

        async with self._running:
            future = loop.run_in_executor(self._executor, work)
            try:
                while (item := await events.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                stop.set()
                await asyncio.shield(future)

    def shutdown(self) -> None:
        """Stop accepting work; running generations finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)


_SERIAL: dict[int, threading.Lock] = {}
_SERIAL_GUARD = threading.Lock()


def _serial_lock(generator: Generator) -> threading.Lock | None:
    """The lock serialising a generator that declares ``thread_safe = False`` (else ``None``)."""
    if getattr(generator, "thread_safe", True) is not False:
        return None
    with _SERIAL_GUARD:
        return _SERIAL.setdefault(id(generator), threading.Lock())


def _generate(job: GenerationJob, stop: threading.Event, put: object) -> list[ImageOut]:
    def progress(step: int, total: int) -> None:
        if stop.is_set():
            raise _Stop()
        put(Progress(step=int(step), total_steps=int(total)))  # type: ignore[operator]

    lock = _serial_lock(job.generator)
    if lock is None:
        images = job.generator.generate(
            job.conditioning, job.prompt, job.num_images, job.steps, job.seed, progress
        )
    else:
        with lock:
            images = job.generator.generate(
                job.conditioning, job.prompt, job.num_images, job.steps, job.seed, progress
            )
    out = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(ImageOut(index=i, png=buf.getvalue(), width=img.width, height=img.height))
    return out
