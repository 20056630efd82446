"""The Python client library of a dprdm server (gRPC; needs only ``dprdm.proto`` and grpc).

``Client`` (blocking) and ``AsyncClient`` (asyncio); every RPC error is a :class:`DprdmError`,
a refused budget a :class:`BudgetExhaustedError`.
"""

from .client import AsyncClient, BudgetExhaustedError, Client, DprdmError

__all__ = ["Client", "AsyncClient", "DprdmError", "BudgetExhaustedError"]
