"""dprdm: differentially private retrieval-augmented diffusion (DP-RDM) as a service.

Sub-packages, layered top to bottom (``tests/test_layers.py``): ``cli`` (the ``dprdm`` command
line); ``clients`` (client library), ``server`` (the gRPC service), ``baselines`` (DP fine-tuning
methods); ``ledger`` (the privacy ledger), ``index`` (corpus -> private index, subsampled k-NN),
``models`` (encoders and generators); ``privacy`` (pure maths). ``proto``: the wire types;
``benchmarks``: benchmark scripts and the load harness; ``extras``: which optional extra a
command needs.
"""

__version__ = "0.1.0"
