"""Generated code for the ``dprdm.shard.v1`` package of ``proto/dprdm/shard/v1/*.proto`` (do not edit)."""
