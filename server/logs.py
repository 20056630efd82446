"""Server logging: plain text or JSON lines, the startup summary, access lines, the shutdown, and
quiet model loading.

Every dprdm record may carry structured fields (``extra={"fields": {...}}``, see :func:`event`);
the text format appends them as ``key=value`` (values JSON-quoted when they hold spaces, quotes or
control characters, so one call is one line); the JSON format writes one object per line
(``ts``, ``level``, ``logger``, ``msg`` and the fields).

What the logs hold (SPEC §3: no private-derived value): the startup summary (bind address, data
directory, metrics address, served indexes with their PUBLIC facts, budgets, ledger kind), one
access line per call (logger ``dprdm.access``: method, status code, error class, tenant, index,
profile, domain, request id, spend id, replayed/reused, epsilon charged), refusals and
authentication failures (WARNING), the shutdown. Never the prompt, never an exact count or any
per-query statistic of the private data, and no duration for ``Retrieve`` or ``Generate``: their
duration contains the per-query retrieval time, which SPEC §3 keeps out of metrics and which we
keep out of logs by the same argument (``duration_ms`` appears only for the methods in
:data:`TIMED_METHODS`, which never touch an index).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

__all__ = [
    "LOG_FORMATS",
    "TIMED_METHODS",
    "ACCESS_LOGGER",
    "setup_logging",
    "event",
    "quiet_progress",
    "JsonFormatter",
    "TextFormatter",
]

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "dprdm.access"
TIMED_METHODS = frozenset(
    {"GetBudget", "ListIndexes", "CreateBudget", "GetAuditTrail", "GetCounts", "ListQuotas"}
)
"""Methods whose access line carries ``duration_ms``: none of them runs a retrieval."""
_HANDLER_TAG = "_dprdm_handler"
_PROGRESS_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` (None values are dropped)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    if isinstance(value, str) and (not text or any(c in text for c in ' "=\\') or not text.isprintable()):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` (one line per record, tracebacks aside)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # keep any traceback after the fields
        return head + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items()) + sep + tail


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


def setup_logging(level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Install the server's log handler on the root logger (replacing one installed earlier).

    Also silences model-loading progress bars (:func:`quiet_progress`) and keeps grpc's own
    debug chatter at INFO or above.

    Args:
        level: a logging level name or number.
        fmt: ``"text"`` or ``"json"``.
        stream: where to write (default ``sys.stderr``).

    Returns:
        The installed handler.

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}; found {fmt!r}")
    quiet_progress()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_TAG, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("grpc").setLevel(max(logging.INFO, root.level))
    return handler


def quiet_progress() -> None:
    """Keep model-loading progress bars (tqdm, Hugging Face) out of the server's logs.

    Sets ``TQDM_DISABLE`` and ``HF_HUB_DISABLE_PROGRESS_BARS`` (read when those libraries are
    imported, i.e. while bundles load) and turns the bars off in the libraries already imported.
    Used by ``dprdm serve`` and ``dprdm index build --no-progress``.
    """
    for key, value in _PROGRESS_ENV.items():
        os.environ.setdefault(key, value)
    for module, function in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("diffusers.utils.logging", "disable_progress_bar"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None and callable(getattr(loaded, function, None)):
            getattr(loaded, function)()


def startup_fields(config: Any, catalog: Any, ledger: Any, port: int, metrics_port: int | None) -> dict[str, Any]:
    """The startup summary's fields: PUBLIC facts only (no exact counts)."""
    host = config.listen.rsplit(":", 1)[0]
    indexes = [
        {
            "name": s.name,
            "domain": s.domain,
            "private": bool(s.config.private),
            "public_size": int(s.index.public_size),
            "bundle": s.bundle.name,
            "generation": s.bundle.generator is not None,
            "profiles": sorted(s.profiles),
        }
        for s in catalog.indexes.values()
    ]
    budgets = {
        domain: {"epsilon": float(b.epsilon), "delta": float(b.delta),
                 "rule": "single_profile" if b.profile is not None else "renyi_filter"}
        for domain, b in sorted(catalog.budgets.items())
    }  # fmt: skip
    wrapped = getattr(ledger, "wrapped", ledger)
    return {
        "listen": f"{host}:{port}",
        "tls": "mtls" if config.tls and config.tls.client_ca else "tls" if config.tls else "off",
        "data_dir": str(config.data_dir),
        "metrics": None if metrics_port is None else f"{config.metrics_host}:{metrics_port}",
        "ledger": type(wrapped).__name__,
        "tokens": len(config.tokens),
        "indexes": indexes,
        "budgets": budgets,
    }
