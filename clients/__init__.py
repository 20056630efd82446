"""Python client library and the ``dprdm`` command line.

``from dprdm.clients import Client, AsyncClient`` imports grpc lazily, so ``dprdm privacy ...``
never imports it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "AsyncClient", "DprdmError", "BudgetExhaustedError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'dprdm.clients' has no attribute {name!r}")
