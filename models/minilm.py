"""A pure-torch BERT encoder for all-MiniLM-L6-v2, without ``transformers``.

Importing ``transformers`` costs ~2.6 s of every server start (issue 13 item 11); the locked text
tower of ``dprdm-mini`` only needs a 6-layer BERT forward pass and a WordPiece tokenizer. This
module provides both:

- :class:`BertTokenizer`: the package's ``tokenizer.json`` through the Rust ``tokenizers`` library,
  called like a Hugging Face tokenizer (``padding=True`` pads to the longest row,
  ``truncation=True`` + ``max_length`` truncates, ``[CLS] ... [SEP]`` added by default);
- :class:`BertModel`: embeddings (word + position + token type, LayerNorm) and post-LayerNorm
  transformer layers (self-attention, exact-erf GELU MLP), with the Hugging Face parameter names
  so the checkpoint's ``model.safetensors`` loads unchanged. No dropout: the tower is locked and
  always evaluated.

Outputs match ``transformers.BertModel`` in eval mode to float32 rounding
(``tests/test_models_minilm_torch.py``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertConfig", "BertModel", "BertOutput", "BertTokenizer", "BatchEncoding"]


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the forward pass uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read ``config.json``; rejects what this implementation does not support.

        Raises:
            ValueError: for a non-BERT model, a non-GELU activation or relative position embeddings.
        """
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw.get('position_embedding_type')!r} unsupported")
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: raw[k] for k in names if k in raw})


class BatchEncoding(dict[str, Any]):
    """Tokenizer output: a dict (``input_ids``, ``token_type_ids``, ``attention_mask``) with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BertTokenizer:
    """A ``tokenizer.json`` WordPiece tokenizer with the Hugging Face call convention used here."""

    def __init__(self, path: str | Path, model_max_length: int = 512) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # tokenizer.json may carry fixed padding/truncation; padding is done per call, truncation is
        # set per call (under a lock: it is tokenizer state) so special tokens are kept.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._lock = threading.Lock()
        self.model_max_length = model_max_length
        pad = self._tok.token_to_id("[PAD]")
        self.pad_token_id = 0 if pad is None else int(pad)

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Tokenize one text (lists of ints) or a batch (lists of rows, or ``"pt"`` tensors).

        Raises:
            ValueError: for ``return_tensors`` other than ``None``/``"pt"``, or ragged rows as tensors.
        """
        single = isinstance(text, str)
        batch = [text] if isinstance(text, str) else list(text)
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt'; found {return_tensors!r}")
        with self._lock:
            if truncation:
                self._tok.enable_truncation(max_length or self.model_max_length)
            else:
                self._tok.no_truncation()
            encs = self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        rows: dict[str, list[list[int]]] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for enc in encs:
            rows["input_ids"].append(list(enc.ids))
            rows["token_type_ids"].append(list(enc.type_ids))
            rows["attention_mask"].append(list(enc.attention_mask))
        if padding and rows["input_ids"]:
            width = max(len(r) for r in rows["input_ids"])
            fill = {"input_ids": self.pad_token_id, "token_type_ids": 0, "attention_mask": 0}
            for key, value in fill.items():
                rows[key] = [r + [value] * (width - len(r)) for r in rows[key]]
        if return_tensors == "pt":
            if len({len(r) for r in rows["input_ids"]}) > 1:
                raise ValueError("rows have different lengths; pass padding=True to return tensors")
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long).reshape(len(batch), -1) for k, v in rows.items()})
        if single:
            return BatchEncoding({k: v[0] for k, v in rows.items()})
        return BatchEncoding(rows)


@dataclass
class BertOutput:
    """``last_hidden_state``: ``(n, seq, hidden)``."""

    last_hidden_state: torch.Tensor


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        out: torch.Tensor = self.LayerNorm(h + self.position_embeddings(positions)[None])
        return out


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, s, d = h.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(n, s, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)), bias)
        return out.transpose(1, 2).reshape(n, s, d)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BERT's ``SelfOutput``/``Output``)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(h, bias), h)
        return out


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(h))


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, bias)
        out: torch.Tensor = self.output(self.intermediate(a), a)
        return out


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """BERT without pooler or dropout; parameter names follow ``transformers.BertModel``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    @classmethod
    def from_dir(cls, path: str | Path) -> BertModel:
        """Load ``config.json`` and ``model.safetensors`` from a Hugging Face model directory.

        Raises:
            FileNotFoundError: naming a missing file.
            ValueError: if the checkpoint's tensors do not match the config.
        """
        from safetensors.torch import load_file

        d = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"BERT file missing: {d / name}")
        model = cls(BertConfig.from_json(d / "config.json"))
        model.load_hf_state_dict(load_file(str(d / "model.safetensors")))
        return model.eval()

    def load_hf_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a ``BertModel`` checkpoint (``bert.`` prefix, pooler and ``position_ids`` ignored).

        Raises:
            ValueError: on missing or unexpected tensors, or shape mismatches.
        """
        cleaned = {
            k.removeprefix("bert."): v
            for k, v in state.items()
            if not k.removeprefix("bert.").startswith("pooler.") and not k.endswith("position_ids")
        }
        try:
            self.load_state_dict(cleaned, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"BERT checkpoint does not match its config: {exc}") from None

    def get_input_embeddings(self) -> nn.Embedding:
        """The word-embedding table (textual inversion hooks it)."""
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BertOutput:
        """``input_ids``: ``(n, seq)``; the mask is 1 for real tokens, 0 for padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)
        # Additive key mask, as transformers builds it: 0 for real tokens, dtype-min for padding.
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return BertOutput(last_hidden_state=h)
