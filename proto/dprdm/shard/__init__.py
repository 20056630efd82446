"""Generated wire types of the INTERNAL shard service (``dprdm.shard.v1``): regenerate with ``make proto``."""
