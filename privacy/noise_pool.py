"""Pre-generated lattice noise (SPEC §3: the sampler's run time never sits on the request path)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .lattice import DEFAULT_LATTICE_EXPONENT

__all__ = ["LatticeSampler", "NoisePool"]

_log = logging.getLogger("dprdm.privacy")


class LatticeSampler(Protocol):
    """Draws exact discrete Gaussian noise on 2^exponent Z^d."""

    def sample(self, sigma: float, dimension: int, exponent: int) -> npt.NDArray[np.float64]:
        """One noise vector: each coordinate is an exact multiple of 2^exponent."""
        ...


class NoisePool:
    """Pre-generates lattice noise vectors off the request path: one bounded FIFO per key.

    Request path: :meth:`take_nowait` pops the OLDEST ready vector or returns None when the key's
    queue is empty (the server then refuses with ``UNAVAILABLE`` + RetryInfo BEFORE any charge).
    It never samples, so the time a request takes does not depend on the noise it releases (the
    exact samplers' run time does depend on the noise: number of rejections, size of the draw).

    Refill: ``threads`` daemon threads sample whole batches (``sampler.sample_batch`` when the
    sampler has it, e.g. :class:`~dprdm.privacy.fast_discrete.FastExactSampler`) and publish each
    batch at once, so the moment vectors become available depends on the run time of a whole
    batch rather than of the one vector a waiting client gets. Discarding or reordering vectors
    by position (never by value) keeps them iid.

    A refill is claimed only once a WHOLE batch fits (the key's room, ``capacity`` minus ready
    and in-flight vectors, is at least ``batch``), and a take wakes the refill threads only when
    it opens that room: the vectorised sampler then always runs on full batches (d = 64: ~26 us
    per vector at 64, ~330 us at 1; ``benchmarks/README.md``, issue 14) instead of on the 1-3
    vectors taken since the last wake-up. The queue of a key then holds between
    ``capacity - batch`` and ``capacity`` vectors, and the default batch is at most half the
    capacity, so a refill starts while at least half the pool is still ready (the server's
    default: 2048 kept, batches of 64). Privacy is unchanged: WHEN vectors are sampled depends
    only on HOW MANY were taken or given back (public admission events), never on their values.

    Args:
        sampler: the exact lattice sampler (shared by the threads; see its thread-safety note).
        capacity: vectors kept ready per (sigma, dimension, exponent).
        batch: vectors sampled and published together, and the room that triggers a refill
            (default ``min(64, max(1, capacity // 2))``; at most ``capacity``).
        threads: refill threads.

    Raises:
        ValueError: capacity, batch or threads < 1.
    """

    def __init__(
        self, sampler: LatticeSampler, capacity: int = 64, *, batch: int | None = None, threads: int = 1
    ) -> None:
        batch = min(64, max(1, capacity // 2)) if batch is None else batch
        for name, value in (("capacity", capacity), ("batch", batch), ("threads", threads)):
            if value < 1:
                raise ValueError(f"NoisePool {name} must be >= 1; found {value!r}")
        self._sampler, self._capacity, self._batch = sampler, capacity, min(batch, capacity)
        self._queues: dict[tuple[float, int, int], collections.deque[npt.NDArray[np.float64]]] = {}
        self._inflight: dict[tuple[float, int, int], int] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._run, name=f"dprdm-noise-pool-{i}", daemon=True) for i in range(threads)
        ]
        for th in self._threads:
            th.start()

    @property
    def capacity(self) -> int:
        """Vectors kept ready per key."""
        return self._capacity

    def _sample(self, key: tuple[float, int, int], count: int) -> npt.NDArray[np.float64]:
        sigma, dim, exp = key
        batch_fn = getattr(self._sampler, "sample_batch", None)
        if batch_fn is not None:
            out: npt.NDArray[np.float64] = np.asarray(batch_fn(sigma, dim, count, exp), dtype=np.float64)
            return out
        return np.stack([self._sampler.sample(sigma, dim, exp) for _ in range(count)])

    @property
    def batch(self) -> int:
        """Vectors sampled and published together (and the room that triggers a refill)."""
        return self._batch

    def _room(self, key: tuple[float, int, int]) -> int:
        """Under the lock: vectors a key's queue lacks, counting those being sampled for it."""
        return self._capacity - len(self._queues[key]) - self._inflight[key]

    def _claim(self) -> tuple[tuple[float, int, int], int] | None:
        """Under the lock: the key with the most room if a whole batch fits in it, and the batch
        size to sample for it (None: no key has a batch of room)."""
        best: tuple[tuple[float, int, int], int] | None = None
        for key in self._queues:
            room = self._room(key)
            if room >= self._batch and (best is None or room > best[1]):
                best = (key, room)
        if best is None:
            return None
        key = best[0]
        self._inflight[key] += self._batch
        return key, self._batch

    def _pop(self, key: tuple[float, int, int]) -> npt.NDArray[np.float64]:
        """Under the lock: pop the oldest ready vector of a key (its queue is not empty) and wake
        the refill threads only if that opened a whole batch of room (a public count)."""
        vec = self._queues[key].popleft()
        if self._room(key) >= self._batch:
            self._cond.notify_all()
        return vec

    def _run(self) -> None:
        while True:
            with self._cond:
                claim = self._claim()
                while claim is None and not self._stop:
                    self._cond.wait()
                    claim = self._claim()
                if self._stop:
                    return
            assert claim is not None
            key, count = claim
            try:
                vectors = self._sample(key, count)
            except Exception:  # a sampler failure must not kill the pool silently
                _log.exception("noise pool: sampling failed for dimension %d", key[1])
                vectors = np.empty((0, key[1]))
                time.sleep(1.0)
            with self._cond:
                self._inflight[key] -= count
                self._queues[key].extend(vectors)  # the whole batch at once
                self._cond.notify_all()

    def prepare(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT, *, fill: bool = False
    ) -> None:
        """Register a key and start filling its queue (call at start-up for every served profile).

        The first batch is sampled in the caller, so a sampler that refuses the parameters raises
        here rather than in a background thread.

        Args:
            fill: also wait until the queue is full, i.e. less than a batch of room is left
                (start-up: serve with a full pool).

        Raises:
            ValueError: from the sampler (e.g. sigma / 2^exponent outside its supported range).
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            known = key in self._queues
        if not known:
            first = self._sample(key, self._batch)
            with self._cond:
                if key not in self._queues:
                    self._queues[key] = collections.deque(first)
                    self._inflight[key] = 0
                self._cond.notify_all()
        if fill:
            self.wait_ready(sigma, dimension, exponent, count=self._capacity - self._batch + 1)

    def ready(self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT) -> int:
        """Vectors ready for a key (0 if the key is not prepared)."""
        with self._cond:
            q = self._queues.get((float(sigma), int(dimension), int(exponent)))
            return 0 if q is None else len(q)

    def wait_ready(
        self,
        sigma: float,
        dimension: int,
        exponent: int = DEFAULT_LATTICE_EXPONENT,
        *,
        count: int = 1,
        timeout: float | None = None,
    ) -> bool:
        """Block until ``count`` vectors are ready for a prepared key; False on timeout."""
        key = (float(sigma), int(dimension), int(exponent))
        count = min(count, self._capacity)
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queues[key]) >= count or self._stop, timeout)

    def take_nowait(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT
    ) -> npt.NDArray[np.float64] | None:
        """Pop the oldest ready vector, or None if none is ready (never samples). Used once.

        Raises:
            KeyError: the key was never prepared (a configuration error, not a load condition).
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            q = self._queues.get(key)
            if q is None:
                raise KeyError(f"no noise pool for sigma={sigma!r}, dimension={dimension!r}, exponent={exponent!r}")
            return self._pop(key) if q else None

    def put_back(
        self, vec: npt.NDArray[np.float64], sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT
    ) -> None:
        """Return an UNUSED vector (taken, then its query was refused before the charge) to the
        front of its queue; dropped if the queue is full. The caller's decision must not depend
        on the vector's value (it depends on public admission only), so the vectors stay iid.
        """
        key = (float(sigma), int(dimension), int(exponent))
        with self._cond:
            q = self._queues.get(key)
            if q is not None and len(q) < self._capacity:  # may briefly exceed it by a refill batch
                q.appendleft(vec)
                self._cond.notify_all()

    def take(
        self, sigma: float, dimension: int, exponent: int = DEFAULT_LATTICE_EXPONENT, *, timeout: float | None = None
    ) -> npt.NDArray[np.float64]:
        """Pop one vector, waiting for the refill if needed (tests and offline tools; the server
        uses :meth:`take_nowait`). Prepares the key on first use.

        Raises:
            TimeoutError: nothing became ready within ``timeout`` seconds.
        """
        key = (float(sigma), int(dimension), int(exponent))
        self.prepare(*key)
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._queues[key]) or self._stop, timeout) or self._stop:
                raise TimeoutError("no noise vector became ready")
            return self._pop(key)

    def close(self) -> None:
        """Stop the refill threads (a batch being sampled finishes first)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for th in self._threads:
            th.join(timeout=5)
