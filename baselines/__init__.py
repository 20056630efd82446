"""DP fine-tuning baselines that DP-RDM replaces (SPEC §9), compared at equal (epsilon, delta).

* ``accounting``: noise-multiplier calibration and the privacy report, on ``dprdm.privacy``.
* ``dpsgd``: the one DP-SGD core (Opacus per-sample gradients, Poisson sampling, clipping,
  BatchMemoryManager, ChaCha20 noise, noise multiplicity folded before clipping).
* ``backbone``: the frozen text-conditioned diffusion model (diffusers directory or bundle).
* ``data``: private image folders with captions.
* ``dp_ldm``: DP-LDM (attention modules only). ``dp_lora``: DP-LoRA (peft adapters).
* ``dpagg_ti``: DPAgg-TI (noisy aggregate of per-image textual inversions).
* ``artifacts``: the output directory. ``cli``: ``dprdm baseline train|sample``.
* ``tiny``: tiny random backbones for tests.

Importing this package imports nothing heavy; the submodules import torch, diffusers and opacus.
"""
