"""Fixtures shared by several test files. Imports are lazy: a privacy test loads no torch or grpc.

* ``one_thread``: torch single-threaded for a module (use with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``).
* ``server``: a :class:`~dprdm.server.testing.ServerThread` over ``make_config()`` and a
  ``MemoryLedger``, one per module; a module that needs another server defines its own ``server``.
* ``channel``: an insecure gRPC channel to the module's ``server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared CPU) single-threaded; restored after the
    module, also when a test (a CLI's ``--threads``) changed the count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    from dprdm.ledger import MemoryLedger
    from dprdm.server.testing import ServerThread, make_config

    with ServerThread(make_config(), ledger=MemoryLedger()) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[Any]:
    import grpc

    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()
