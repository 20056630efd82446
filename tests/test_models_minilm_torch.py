"""The pure-torch MiniLM tower (``dprdm.models.minilm``) against ``transformers`` as the oracle.

Issue 13 item 11: the ``dprdm-mini`` text tower no longer imports ``transformers`` (~2.6 s of each
server start). These tests pin that it still computes the same sentence embeddings and tokens, keeps
the encoder's identity (existing indexes pair), and keeps ``transformers`` out of ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")

_LONG = " ".join(f"word{i} with some filler text, numbers {i * 7} and punctuation!" for i in range(60))

TEXTS = [
    "",
    " ",
    "a",
    "a red circle",
    "A RED CIRCLE",
    "a red circle on a brick wall",
    "a blue square on a striped background",
    "a green triangle, slightly rotated",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "photo of *",
    "* in the style of a watercolor",
    "1234567890",
    "3.14159 2.71828 1.41421",
    "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e",
    "tabs\tand\nnewlines\r\nmixed",
    "    leading and trailing spaces    ",
    "punctuation!!! ??? ... ;;; ::: ---",
    "<html><body>markup &amp; entities</body></html>",
    "C'est déjà l'été à Montréal",
    "Ünïcödé äccénts: naïve café résumé",
    "Straße und Größe",
    "Ελληνικά γράμματα",
    "Русский текст о кошках",
    "中文字符测试",
    "日本語のテキスト、ひらがなとカタカナ",
    "한국어 문장입니다",
    "عربي نص",
    "עברית",
    "हिन्दी पाठ",
    "emoji 😀🎉🚀 and symbols ©®™ ∑∫√",
    "zero\u200bwidth\u200bspaces and \u00a0nbsp",
    "control \x00\x01\x07 chars",
    "combining e\u0301 vs é",
    "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a" * 300,
    "word " * 100,
    _LONG,
    _LONG.upper(),
    "🙂" * 80,
    "中" * 100,
    "[CLS] [SEP] [PAD] [MASK] [UNK] literal special tokens",
    "a red circle [MASK]",
    "new\n\n\nparagraphs\n\nhere",
    "CamelCaseWordsAndsnake_case_words",
    "it's a dog's life; isn't it?",
    "#hashtag @mention $dollar %percent ^caret",
    "a cat",
    "a dog",
    "two cats and a dog playing in the garden at sunset",
    "minimalist line drawing of a mountain",
    "x",
]


@pytest.fixture(scope="module")
def towers():
    """(new tower, transformers model, transformers tokenizer)."""
    from dprdm.models.mini_encoder import MiniLMTextTower, minilm_path

    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return MiniLMTextTower(path), model, tok


def _oracle(model, tok, texts):
    """The previous (transformers-based) ``MiniLMTextTower.embed`` computation."""
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1), enc, out


def test_enough_varied_texts():
    assert len(TEXTS) >= 50 and len(set(TEXTS)) == len(TEXTS)


def test_tokens_match_transformers(towers):
    tower, _, tok = towers
    ref = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    got = tower.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(got[key], ref[key]), key
    assert ref["input_ids"].shape[1] == 64  # long texts were truncated, [SEP] kept
    assert int(got.input_ids[TEXTS.index(_LONG), -1]) == 102
    for text in ("*", "a red circle", "", "Straße"):
        assert tower.tokenizer(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    one = tower.tokenizer(["a b c", "a"], padding=False)
    assert one["input_ids"] == tok(["a b c", "a"], padding=False)["input_ids"]
    with pytest.raises(ValueError, match="padding=True"):
        tower.tokenizer(["a b c", "a"], return_tensors="pt")


def test_embeddings_match_transformers(towers):
    tower, model, tok = towers
    ref, enc, hidden = _oracle(model, tok, TEXTS)
    got = tower.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 1e-5
    assert float((got * ref).sum(1).min()) >= 0.99999
    with torch.no_grad():
        mine = tower.model(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert float((mine - hidden)[mask].abs().max()) <= 1e-4  # token states too, not only pooled
    # one text at a time (no padding) agrees with the batched result
    for i in (0, 3, TEXTS.index(_LONG), len(TEXTS) - 1):
        alone, _, _ = _oracle(model, tok, [TEXTS[i]])
        assert float((got[i] - alone[0]).abs().max()) <= 1e-5


def test_gradients_flow_through_input_embeddings(towers):
    """The baselines' textual inversion hooks ``get_input_embeddings`` and backpropagates."""
    tower, _, _ = towers
    emb = tower.model.get_input_embeddings()
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape == (30522, 384)
    vec = torch.zeros(384, requires_grad=True)
    star = tower.tokenizer("*", add_special_tokens=False)["input_ids"][0]

    def hook(module, inputs, output):
        return torch.where((inputs[0] == star).unsqueeze(-1), vec.expand_as(output), output)

    handle = emb.register_forward_hook(hook)
    try:
        tok = tower.tokenizer(["photo of *"], padding=True, truncation=True, max_length=64, return_tensors="pt")
        tower.model(**tok).last_hidden_state.sum().backward()
    finally:
        handle.remove()
    assert vec.grad is not None and float(vec.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in tower.model.parameters())


def test_identity_unchanged():
    """The combined hash is (trainable weights, MiniLM file hash): the same as before the rewrite."""
    from pathlib import Path

    import dprdm.models
    from dprdm.models._torch import sha256_file
    from dprdm.models.mini_encoder import minilm_path
    from dprdm.models.registry import load_encoder

    enc = load_encoder("dprdm-mini")
    assert enc.text_tower.weights_sha256 == sha256_file(minilm_path() / "model.safetensors")
    recorded = json.loads((Path(dprdm.models.__file__).parent / "weights" / "mini_train.json").read_text())
    assert enc.identity.name == recorded["encoder_identity"]["name"] == "dprdm-mini"
    assert enc.identity.weights_sha256 == recorded["encoder_identity"]["weights_sha256"]


def test_loading_default_encoder_does_not_import_transformers():
    code = (
        "import json, sys\n"
        "from dprdm.models.registry import load_encoder\n"
        "enc = load_encoder('dprdm-mini')\n"
        "row = enc.encode_texts(['a red circle on a brick wall'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers'))\n"
        "print(json.dumps({'heavy': heavy, 'shape': list(row.shape), 'id': enc.identity.weights_sha256}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["shape"][0] == 1
