"""``dprdm train-default`` (registered in :mod:`dprdm.cli.train_default`): reproduce the embedded ``dprdm-mini`` bundle from scratch on a CPU.

Generates the public data (``models/mini_data.py``), trains the encoder then the decoder
(``models/mini_train.py``), and writes into ``--out`` (default: the package's ``weights/``):
``mini_encoder.{json,safetensors}``, ``mini_decoder.{json,safetensors}`` and ``mini_train.json``
(config, seed, command, timings, measurements). Nothing is downloaded; the private demo corpus is
never touched. Run ``benchmarks/utility.py`` afterwards for the quality report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

__all__ = ["run", "WEIGHTS_DIR", "PUBLIC_SEED"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PUBLIC_SEED = 1


def _log(msg: str) -> None:
    print(f"[train-default {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Train and write the bundle. Returns 0 on success.

    Raises:
        ValueError: on a non-positive size, step count or dimension.
    """
    import torch

    from . import mini_data as md
    from .mini_encoder import MiniEncoder, MiniEncoderConfig, MiniLMTextTower
    from .mini_train import (
        DecoderTrainConfig,
        EncoderTrainConfig,
        RetrievalSimulator,
        train_decoder,
        train_encoder,
    )
    from .rdm import RDMConfig, RDMGenerator

    for name in ("public_size", "encoder_steps", "decoder_steps", "dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; found {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    _log(f"generating {args.public_size} public images (seed {PUBLIC_SEED})")
    public = md.make_split(args.public_size, md.PUBLIC_STYLES, seed=PUBLIC_SEED)
    text_tower = MiniLMTextTower()
    ecfg = MiniEncoderConfig(dim=args.dim)
    etcfg = EncoderTrainConfig(steps=args.encoder_steps, seconds=args.encoder_seconds)
    enc_model, report = train_encoder(public, text_tower, ecfg, etcfg, args.seed, _log)
    MiniEncoder.save(enc_model, out)
    encoder = MiniEncoder.load(out, text_tower=text_tower)
    report.update(_encoder_accuracy(encoder, md))
    _log(f"encoder: {report}")

    img_emb = encoder.encode_pixels(public.images)
    cap_emb = encoder.encode_texts(public.captions)
    content = [md.content_prompt(md.SHAPES[s], list(md.COLOURS)[c]) for s, c in public.labels[:, :2]]
    content_emb = encoder.encode_texts(content)
    dtcfg = DecoderTrainConfig(steps=args.decoder_steps, seconds=args.decoder_seconds)
    rcfg = RDMConfig(
        dim=args.dim,
        k=4,
        token_scale=4.0,
        normalize_tokens=True,
        guidance_scale=2.0,
        pooled_class_embedding=True,
    )
    sim = RetrievalSimulator(public.labels, img_emb, cap_emb, content_emb, dtcfg)
    unet, sched, dec_report = train_decoder(public, sim, rcfg, dtcfg, args.seed, _log)
    report.update(dec_report)
    gen = RDMGenerator(unet, sched, rcfg, expected_encoder=encoder.identity, device=torch.device("cpu"))
    gen.save_packed(out / "mini_decoder.json")
    record = {
        "command": _command(args),
        "reproduce_exactly": _command(
            args, decoder_steps=report["decoder_steps"], encoder_steps=report["encoder_steps"]
        ),
        "seed": args.seed,
        "public_seed": PUBLIC_SEED,
        "public_size": args.public_size,
        "encoder_config": asdict(ecfg),
        "encoder_train": asdict(etcfg),
        "decoder_train": asdict(dtcfg),
        "rdm_config": asdict(rcfg),
        "encoder_identity": encoder.identity.to_dict(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_seconds": time.time() - t_start,
        "measurements": report,
    }
    (out / "mini_train.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    _log(f"done in {record['total_seconds']:.0f}s; wrote {out}")
    return 0


def _command(args: argparse.Namespace, **override: int) -> str:
    """The command line that reproduces this run (``override`` fixes step counts; time caps lifted)."""
    opts = {
        k: getattr(args, k)
        for k in (
            "seed",
            "public_size",
            "encoder_steps",
            "encoder_seconds",
            "decoder_steps",
            "decoder_seconds",
            "dim",
        )
    }
    if override:
        opts.update(override, encoder_seconds=1e9, decoder_seconds=1e9)
    flags = " ".join(
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in opts.items()
    )
    return f"dprdm train-default {flags}" + (
        f" --out {shlex.quote(str(args.out))}" if args.out != WEIGHTS_DIR else ""
    )


def _encoder_accuracy(encoder: object, md: object) -> dict[str, float]:
    """Image-to-caption top-1 on fresh public and private-style images (all four attributes must match)."""
    out = {}
    for name, styles, seed in (("public", md.PUBLIC_STYLES, 11), ("private_style", (md.PRIVATE_STYLE,), 12)):
        split = md.make_split(400, styles, seed=seed)
        img = encoder.encode_pixels(split.images)
        combos = sorted({tuple(r) for r in split.labels.tolist()})
        caps = [md.caption(md.Attributes(*c)) for c in combos]
        txt = encoder.encode_texts(caps)
        best = np.argmax(img @ txt.T, axis=1)
        pred = np.array([combos[b] for b in best])
        out[f"i2t_top1_{name}"] = float(np.mean(np.all(pred == split.labels, axis=1)))
    return out
