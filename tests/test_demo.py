"""`dprdm demo` end to end on a small corpus: index build, real server, client, images, report."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dprdm.cli.demo import PROMPTS, DemoSettings, run_demo


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    report = run_demo(DemoSettings(out=out, corpus_size=120, public_size=1000, images=1, steps=2))
    assert (out / "contact-sheet.png").exists() and (out / "report.md").exists()
    assert json.loads((out / "report.json").read_text())["budget"] == report["budget"]
    assert len(list((out / "images").glob("*.png"))) == 2 * len(PROMPTS)
    assert Image.open(out / "images" / "00-private-0.png").size == (24, 24)
    charges = [q["private"]["epsilon_charged"] for q in report["queries"]]
    assert all(c > 0 for c in charges)
    assert all(q["public"]["epsilon_charged"] == 0 for q in report["queries"])  # lambda = 0 costs nothing
    spent = [q["private"]["epsilon_spent"] for q in report["queries"]]
    assert spent == sorted(spent) and report["budget"]["epsilon_spent"] <= report["budget"]["epsilon"]
    assert set(report["queries"][0]["private"]) == {  # receipts carry no per-query private statistic
        "spend_id", "profile", "epsilon_charged", "epsilon_spent", "epsilon_left", "delta"
    }
    # sigma is calibrated under the accountant the server uses for the demo's one retrieving profile
    # (PLD, discrete noise at the index's dimension): the budget admits budget_queries, not many more
    from dprdm.privacy import Profile
    from dprdm.privacy.pld import max_queries_pld

    p = report["private_profile"]
    prof = Profile(k=p["k"], q=p["q"], sigma=p["sigma"], lam=p["lambda"])
    admitted = max_queries_pld(epsilon=report["budget"]["epsilon"], delta=p["delta"], profile=prof, hardened_dimension=32)
    assert 1000 <= admitted <= 1010, admitted
