"""Generated gRPC wire types (``dprdm.v1``): regenerate with ``make proto``."""
