"""Shared pieces of every ``dprdm`` sub-command: the user-error type and argparse value types.

Each type's error names the flag and the bad text, so argparse prints one line (exit status 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["CliError", "int_at_least", "positive_int", "non_negative_float"]


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def int_at_least(name: str, low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, with an error naming the flag ``name``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}; found {text!r}")
        return value

    return parse


def positive_int(name: str) -> Callable[[str], int]:
    """An argparse type: an integer >= 1 (error names the flag ``name``)."""
    return int_at_least(name, 1)


def non_negative_float(name: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 (error names the flag ``name``); range checks beyond
    that (q <= 1, delta < 1, ...) are the privacy core's, whose ValueError names the value."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number; found {text!r}") from None
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0; found {text!r}")
        return value

    return parse
