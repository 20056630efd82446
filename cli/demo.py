"""``dprdm demo``: the whole product on the embedded default bundle, on a CPU, with no downloads.

1. Writes the PRIVATE demo corpus (procedurally generated images in the private style, see
   ``models/DATA_CARD.md``) as PNG files, as an operator's folder would be.
2. Builds the private index with the default encoder (``dprdm-mini``) through the real index
   builder.
3. Starts the gRPC server on loopback (port 0) with a privacy budget (epsilon, delta = 1/(10 N̄))
   and two profiles: ``private`` (DP retrieval, Poisson-subsampled, calibrated so the budget
   admits ``--budget-queries`` queries) and ``public`` (lambda = 0: text only, charged 0).
4. Sends a handful of content-only prompts through the gRPC client, for both profiles, and writes
   the images, a contact sheet and a JSON + Markdown report of receipts and the budget.
5. Shuts the server down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .args import CliError

__all__ = ["DemoSettings", "run_demo", "register"]

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow cross", "a blue circle", "a red cross")
CORPUS_ID = "dprdm-demo-private"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds and asks.

    Attributes:
        out: output directory (created; an existing demo output is replaced).
        corpus_size: private images generated.
        public_size: declared public size N̄ (>= corpus_size); delta = 1/(10 N̄).
        epsilon: the domain's budget.
        budget_queries: queries of the private profile the budget must admit (calibrates sigma).
        k, q, lam: the private profile (sigma is calibrated). The defaults are the profile chosen on
            a PUBLIC proxy domain in ``models/weights/QUALITY.md`` (small q with large k keeps sigma
            small: 0.034 at epsilon 10 over 1,000 queries).
        images: images per prompt and profile.
        steps: denoising steps (0: the bundle's default).
        seed: diffusion sampler seed (never DP randomness).
    """

    out: Path
    corpus_size: int = 2000
    public_size: int = 10000
    epsilon: float = 10.0
    budget_queries: int = 1000
    k: int = 64
    q: float = 0.05
    lam: float = 0.5
    images: int = 2
    steps: int = 0
    seed: int = 1


class _BackgroundServer:
    """The real gRPC server (``dprdm.server.app.start_server``) on its own event loop thread."""

    def __init__(self, config: Any) -> None:
        from dprdm.server.app import start_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dprdm-demo-server", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_server(config), self.loop)
        try:
            self.running = fut.result(timeout=300)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.address = f"127.0.0.1:{self.running.port}"
        for served in self.running.catalog.indexes.values():  # generators load after SERVING
            wait = getattr(served.bundle.generator, "wait", None)
            if wait is not None and not wait(300):
                raise RuntimeError(f"the generator of bundle {served.bundle.name!r} did not load in 300 s")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(1.0), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _write_corpus(folder: Path, n: int) -> None:
    from dprdm.models import mini_data as md

    split = md.make_split(n, (md.PRIVATE_STYLE,), seed=20261123)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        split.pil(i).save(folder / f"img{i:05d}.png")


def _build_index(settings: DemoSettings, corpus: Path, index_dir: Path) -> None:
    from dprdm.index.build import BuildConfig, build_index
    from dprdm.index.readers import open_reader
    from dprdm.models.registry import load_encoder

    config = BuildConfig(
        output=index_dir, corpus_id=CORPUS_ID, public_size=settings.public_size, existing="overwrite",
        progress=True, batch_size=256,
    )
    build_index(open_reader([str(corpus)]), load_encoder("dprdm-mini"), config)


def _server_config(settings: DemoSettings, index_dir: Path, data_dir: Path, token: str) -> tuple[Any, dict[str, float]]:
    from dprdm.privacy import calibrate_sigma, default_delta
    from dprdm.server.config import parse_config

    delta = default_delta(settings.public_size)
    # the private index is served with the exact discrete Gaussian at its dimension, and its one
    # retrieving profile makes a single-profile budget accounted by PLD: calibrate exactly that
    dimension = int(json.loads((index_dir / "manifest.json").read_text())["dimension"])
    sigma = calibrate_sigma(
        epsilon=settings.epsilon,
        delta=delta,
        queries=settings.budget_queries,
        k=settings.k,
        q=settings.q,
        hardened_dimension=dimension,
        accountant="pld",
    )
    private = {"k": settings.k, "q": settings.q, "sigma": sigma, "lambda": settings.lam}
    doc = {
        "server": {"listen": "127.0.0.1:0", "data_dir": str(data_dir), "generation_workers": 1},
        "tokens": [{"tenant": "demo", "role": "tenant", "token": token}],
        "indexes": {
            "demo": {
                "path": str(index_dir),
                "bundle": "dprdm-mini",
                "profiles": {"private": private, "public": {**private, "lambda": 0.0}},
            }
        },
        "budgets": {CORPUS_ID: {"epsilon": settings.epsilon, "delta": delta, "rule": "auto"}},
    }
    return parse_config(doc), {**private, "delta": delta}


def _contact_sheet(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], path: Path, scale: int = 4) -> None:
    """Rows: prompt, public-only images, DP-retrieval images (upscaled, labelled)."""
    cell = rows[0][1][0].width * scale
    n_pub, n_dp = len(rows[0][1]), len(rows[0][2])
    label_w, head_h, gap = 170, 22, 8
    width = label_w + (n_pub + n_dp) * (cell + 2) + gap
    sheet = Image.new("RGB", (width, head_h + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w, 4), "public only (lambda = 0)", fill="black")
    draw.text((label_w + n_pub * (cell + 2) + gap, 4), "DP retrieval (private style)", fill="black")
    for r, (prompt, pub, dp) in enumerate(rows):
        y = head_h + r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), prompt, fill="black")
        for c, im in enumerate(pub):
            sheet.paste(im.resize((cell, cell), Image.NEAREST), (label_w + c * (cell + 2), y))
        for c, im in enumerate(dp):
            sheet.paste(im.resize((cell, cell), Image.NEAREST), (label_w + gap + (n_pub + c) * (cell + 2), y))
    sheet.save(path)


def _receipt(rec: Any) -> dict[str, Any]:
    return {
        "spend_id": rec.spend_id,
        "profile": rec.profile,
        "epsilon_charged": rec.epsilon_charged,
        "epsilon_spent": rec.epsilon_spent,
        "epsilon_left": rec.epsilon_left,
        "delta": rec.delta,
    }


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the demo end to end; returns the report (also written to ``out/report.json``).

    Raises:
        CliError: if the output directory is not a previous demo output.
    """
    import io

    from dprdm.clients.client import Client

    out = settings.out
    if out.exists() and any(out.iterdir()) and not (out / "report.json").exists():
        raise CliError(f"--out {str(out)!r} exists and is not a previous demo output; choose another folder")
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    t0 = time.perf_counter()
    _say(f"writing the private demo corpus ({settings.corpus_size} images) to {out / 'private-corpus'}")
    _write_corpus(out / "private-corpus", settings.corpus_size)
    _say("building the private index with the dprdm-mini encoder")
    _build_index(settings, out / "private-corpus", out / "index")
    token = secrets.token_urlsafe(24)
    config, profile = _server_config(settings, out / "index", out / "server-data", token)
    _say(f"starting the server (profile private: k={settings.k}, q={settings.q}, sigma={profile['sigma']:.4f})")
    server = _BackgroundServer(config)
    rows, report_rows = [], []
    try:
        _say(f"server listening on {server.address}")
        with Client(server.address, token, timeout=600) as client:
            for i, prompt in enumerate(PROMPTS):
                row: list[list[Image.Image]] = []
                entry: dict[str, Any] = {"prompt": prompt}
                for prof in ("public", "private"):
                    res = client.generate(
                        "demo", prompt, profile=prof, num_images=settings.images, steps=settings.steps,
                        seed=settings.seed + i, request_id=f"demo-{prof}-{i}",
                    )
                    ims = [Image.open(io.BytesIO(png)).convert("RGB") for png in res.images]
                    for j, im in enumerate(ims):
                        im.save(out / "images" / f"{i:02d}-{prof}-{j}.png")
                    row.append(ims)
                    entry[prof] = _receipt(res.receipt) if res.receipt is not None else None
                _say(f"{prompt!r}: epsilon spent {entry['private']['epsilon_spent']:.4f} of {settings.epsilon}")
                rows.append((prompt, row[0], row[1]))
                report_rows.append(entry)
            budget = client.budget("demo")
            budget_doc = {"epsilon": budget.epsilon, "delta": budget.delta, "epsilon_spent": budget.epsilon_spent,
                          "epsilon_left": budget.epsilon_left}
    finally:
        server.stop()
    _contact_sheet(rows, out / "contact-sheet.png")
    report = {
        "corpus_id": CORPUS_ID,
        "public_size": settings.public_size,
        "private_profile": profile,
        "budget": budget_doc,
        "queries": report_rows,
        "seconds": time.perf_counter() - t0,
        "neighbouring": "add/remove one record (one image)",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    _say(f"done in {report['seconds']:.0f} s: {out / 'contact-sheet.png'}, {out / 'report.md'}")
    return report


def _markdown(report: dict[str, Any]) -> str:
    p, b = report["private_profile"], report["budget"]
    lines = [
        "# dprdm demo report",
        "",
        f"Private domain `{report['corpus_id']}`, public size N̄ = {report['public_size']}, "
        f"neighbouring relation: {report['neighbouring']}.",
        f"Private profile: k = {p['k']}, q = {p['q']}, sigma = {p['sigma']:.4f}, lambda = {p['lambda']}; "
        f"budget epsilon = {b['epsilon']}, delta = {b['delta']:.2e}.",
        "",
        "DP charge: the epsilon of that query on its own (at delta); spent: the epsilon of all queries so",
        "far, composed in Rényi DP, which grows far more slowly than the sum of the charges.",
        "",
        "| prompt | public-only charge | DP charge (epsilon) | spent after | left after |",
        "|---|---:|---:|---:|---:|",
    ]
    for q in report["queries"]:
        pub, dp = q["public"], q["private"]
        lines.append(
            f"| {q['prompt']} | {pub['epsilon_charged'] if pub else 0:.4f} | {dp['epsilon_charged']:.4f} | "
            f"{dp['epsilon_spent']:.4f} | {dp['epsilon_left']:.4f} |"
        )
    lines += ["", f"Budget now: spent {b['epsilon_spent']:.4f}, left {b['epsilon_left']:.4f} of {b['epsilon']}.",
              "", "![contact sheet](contact-sheet.png)", ""]
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    settings = DemoSettings(out=Path(args.out), images=args.images, steps=args.steps)
    run_demo(settings)
    return 0


def register(subparsers: Any) -> None:
    """Add ``dprdm demo``."""
    p = subparsers.add_parser("demo", help="run the end-to-end demo on the embedded default bundle")
    p.add_argument("--out", default="dprdm-demo", help="output directory (default: ./dprdm-demo)")
    p.add_argument("--images", type=int, default=2, help="images per prompt and profile")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0: the bundle's default)")
    p.set_defaults(func=_cmd)
