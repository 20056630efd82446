"""DP randomness: subsampling coins and Gaussian noise come from a CSPRNG (SPEC §3).

Production generators are ChaCha20 (20 rounds, ``randomgen.ChaCha``) keyed per query with 256
fresh bits from ``os.urandom``: a new key per release means no state is shared between
queries, and nobody (client, operator, configuration) can choose or replay the key. Statistical
generators (PCG64, Philox, MT19937, SFC64) are predictable from their output and are refused in
production mode, and so is any configured seed.

Tests inject a seeded generator explicitly through the ``rng`` parameter of the mechanism and
search functions (``np.random.default_rng(seed)``), and call :func:`check_dp_generator` with
``production=False``. Only the server's wiring creates production generators.

Caveat (documented, hardened in a later module): the Gaussian sampler here is numpy's
floating-point ziggurat; textbook float noise leaks through its low-order bits (Mironov 2012).
"""

from __future__ import annotations

import os

import numpy as np
import randomgen

__all__ = ["new_dp_generator", "check_dp_generator", "make_dp_generator", "SECURE_BIT_GENERATORS"]

SECURE_BIT_GENERATORS: tuple[type, ...] = (randomgen.ChaCha,)
_INSECURE_NAMES = ("PCG64", "PCG64DXSM", "Philox", "MT19937", "SFC64")


class _OsKeyedGenerator(np.random.Generator):
    """The type of :func:`new_dp_generator`'s generators: how production mode tells a ChaCha20
    keyed from ``os.urandom`` from one built by anyone else (with a seed, a chosen key or fewer
    rounds), which the bit generator's state alone cannot show."""


def new_dp_generator() -> np.random.Generator:
    """A fresh ChaCha20 generator keyed with 256 bits from ``os.urandom`` (one per query)."""
    key = int.from_bytes(os.urandom(32), "little")
    return _OsKeyedGenerator(randomgen.ChaCha(key=key, counter=0, rounds=20))


def _chacha_rounds(bg: object) -> int | None:
    """The round count in a randomgen ChaCha's state (``state["state"]["rounds"]``), or None."""
    state = getattr(bg, "state", None)
    inner = state.get("state") if isinstance(state, dict) else None
    rounds = inner.get("rounds") if isinstance(inner, dict) else None
    return int(rounds) if isinstance(rounds, (int, np.integer)) else None


def check_dp_generator(rng: np.random.Generator, *, production: bool) -> None:
    """Refuse a non-cryptographic generator in production mode.

    Args:
        rng: the generator that will draw DP coins or noise.
        production: True on the serving path; tests pass False to use a seeded generator.

    Raises:
        TypeError: if ``rng`` is not a ``numpy.random.Generator``.
        ValueError: in production mode, if its bit generator is not ChaCha with 20 rounds, or the
            generator was not made by :func:`new_dp_generator` (a ChaCha with a fixed seed or a
            chosen key is as predictable as its seed).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; found {type(rng).__name__}")
    if not production:
        return
    bg = rng.bit_generator
    if not isinstance(bg, SECURE_BIT_GENERATORS):
        raise ValueError(
            f"bit generator {type(bg).__name__} is refused for DP randomness in production mode; "
            f"use dprdm.privacy.rng.new_dp_generator() (ChaCha20 keyed from os.urandom)"
        )
    rounds = _chacha_rounds(bg)
    if rounds != 20:
        raise ValueError(f"ChaCha with {rounds} rounds is refused in production mode; 20 are required")
    if not isinstance(rng, _OsKeyedGenerator):
        raise ValueError(
            "a ChaCha generator not keyed from os.urandom by dprdm.privacy.rng.new_dp_generator() "
            "(e.g. one built from a seed) is refused in production mode"
        )


def make_dp_generator(*, production: bool = True, seed: int | None = None) -> np.random.Generator:
    """The generator factory used by configuration entry points.

    Args:
        production: serving mode; a seed is then refused.
        seed: only for tests and non-private demos (``production=False``).

    Raises:
        ValueError: a seed configured in production mode.
    """
    if seed is not None:
        if production:
            raise ValueError(f"a DP seed is refused in production mode; found seed={seed!r}")
        return np.random.default_rng(seed)
    return new_dp_generator()
