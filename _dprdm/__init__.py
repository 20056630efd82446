"""dprdm: differentially private retrieval-augmented diffusion (DP-RDM) as a service.

Sub-packages: ``privacy`` (pure maths), ``index`` (corpus -> private index, subsampled k-NN),
``models`` (encoders and generators), ``server`` (ledger and gRPC service), ``clients``
(client library and the ``dprdm`` command line), ``baselines`` (DP fine-tuning methods).
"""

__version__ = "0.1.0"
