"""Errors raised by :mod:`dprdm.index`. Every message names the offending value or file."""

from __future__ import annotations

__all__ = ["IndexFormatError", "IndexBuildError", "PrivacyPolicyError"]


class IndexFormatError(ValueError):
    """An index directory is missing, truncated, corrupt, or of an unknown format version."""


class IndexBuildError(RuntimeError):
    """A build cannot proceed (bad input, existing output, capacity overflow, ...)."""


class PrivacyPolicyError(ValueError):
    """A requested configuration would void the privacy argument (SPEC §3, §5); the message says why."""
