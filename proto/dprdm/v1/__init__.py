"""Generated code for the ``dprdm.v1`` package of ``proto/dprdm/v1/*.proto`` (do not edit)."""
