"""Fixtures shared by several test files. Imports are lazy: a privacy test loads no torch or grpc.

* ``one_thread``: torch single-threaded for a module (use with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``).
* ``server``: a :class:`~dprdm.server.testing.ServerThread` over ``make_config()`` and a
  ``MemoryLedger``, one per module; a module that needs another server defines its own ``server``.
* ``channel``: an insecure gRPC channel to the module's ``server``.
* ``pg_server``: one REAL PostgreSQL server for the session (:mod:`pgserver`; ``new_url()`` gives
  each ledger a fresh schema); skipped with one line when none can start, failed under
  ``DPRDM_REQUIRE_POSTGRES=1``.
* ``ray_cluster``: one REAL local Ray (2 CPUs, no dashboard) for the session, started on first
  use (~5 s); Ray is in the ``build`` extra, so a missing Ray fails the test, never skips it.
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """Every test skipped for want of PostgreSQL reports one location, so ``-ra`` folds them into
    ONE summary line saying how to install it (instead of one line per test)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        import inspect

        import pgserver

        if pgserver.SKIP_PREFIX in str(report.longrepr[2]):
            line = inspect.getsourcelines(pgserver.start_or_skip)[1]
            report.longrepr = (pgserver.__file__, line, report.longrepr[2])


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    from pgserver import start_or_skip

    srv = start_or_skip()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    import os

    import ray

    # Ray's memory monitor kills workers (and retries them forever) when the MACHINE is near full,
    # whoever uses the memory; on a shared test machine that hangs a test. The kernel's OOM killer stays.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
             configure_logging=False)
    yield ray
    ray.shutdown()
