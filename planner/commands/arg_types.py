"""argparse value types shared by the sub-commands: a bad value is a usage error (exit 2) naming it."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _checked(text: str, convert: Callable[[str], T], kind: str, ok: Callable[[T], bool], rule: str) -> T:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    if not ok(value):  # written as "not ok" so that nan fails every rule
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _checked(text, int, "an integer", lambda v: v >= 1, ">= 1")


def non_negative_float(text: str) -> float:
    return _checked(text, float, "a number", lambda v: v >= 0, ">= 0")


def probability(text: str) -> float:
    """A mass in (0, 1], for --top-p."""
    return _checked(text, float, "a number", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
