"""Encoders, generators and named model bundles (SPEC §8). See ``models/README.md``.

Importing this package is cheap (no torch): import :mod:`dprdm.models.registry` to load models::

    from dprdm.models.registry import load_bundle, load_encoder
    bundle = load_bundle()                      # the embedded default, "dprdm-mini"
    u = bundle.encoder.encode_texts(["a picture of a red circle"])[0]
    images = bundle.generator.generate(u, "a picture of a red circle", n=4, steps=25, seed=0)
"""

from .base import Encoder, EncoderIdentity, Generator, ProgressCallback

__all__ = ["Encoder", "EncoderIdentity", "Generator", "ProgressCallback"]
