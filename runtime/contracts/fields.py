"""Checkers for the fields of a document read from YAML or JSON (a plan, a profile, a trace), written once.

Each raises the document's own error (a `UserError`, so the CLI prints one line and exits 1) with the
field path first: `cache.slots[3]: must be >= 0, got -1`. A value's repr is cut short, so a megabyte
string in a file never becomes a megabyte error message.
"""
from __future__ import annotations

import math
from typing import Any

REPR_LIMIT = 200  # characters of a bad value shown in a message


class FieldChecker:
    """The checkers of one kind of document: `error` is its exception class, `name` what a top-level
    value is called in messages ("plan", "profile"), `mapping_word` what a dict is called there
    ("a mapping" in YAML, "an object" in JSON), `top_unknown` what an unknown top-level key is."""

    def __init__(self, error: type[Exception], name: str, mapping_word: str = "a mapping",
                 top_unknown: str = "unknown key") -> None:
        self.error = error
        self.name = name
        self.mapping_word = mapping_word
        self.top_unknown = top_unknown

    def kind(self, value: Any) -> str:
        if value is None:
            return "null"
        return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: self.mapping_word}.get(type(value), type(value).__name__)

    def fail(self, path: str, what: str, value: Any) -> Exception:
        """The error for a value of the wrong kind: `path: must be WHAT, got KIND VALUE`."""
        return self.error(f"{path}: must be {what}, got {self.kind(value)} {value!r}"[:REPR_LIMIT])

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...] | dict[str, Any],
                required: bool = False) -> dict[str, Any]:
        """A mapping whose keys are all in `allowed`; None is an empty one unless `required`."""
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"{path or self.name}: must be {self.mapping_word}, got {self.kind(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                what = "unknown key" if path else self.top_unknown
                raise self.error(f"{join(path, key)}: {what} (allowed: {', '.join(allowed)})"[:4 * REPR_LIMIT])
        return value

    def require(self, m: dict[str, Any], path: str, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key not in m or m[key] is None:
                raise self.error(f"{join(path, key)}: missing (required)")

    def integer(self, value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "an integer", value)
        if lo is not None and value < lo:
            raise self.error(f"{path}: must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(f"{path}: must be <= {hi}, got {value}")
        return value

    def positive_integer(self, value: Any, path: str) -> int:
        if self.integer(value, path) < 1:
            raise self.error(f"{path}: must be a positive integer, got {value}")
        return value

    def number(self, value: Any, path: str, what: str = "a number") -> float:
        """A finite int or float (not a boolean)."""
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value))):
            raise self.fail(path, what, value)
        return float(value)

    def positive_number(self, value: Any, path: str) -> float:
        x = self.number(value, path, "a positive number")
        if x <= 0:
            raise self.error(f"{path}: must be a positive number, got {value}")
        return x

    def non_negative_number(self, value: Any, path: str) -> float:
        x = self.number(value, path, "a number >= 0")
        if x < 0:
            raise self.error(f"{path}: must be a number >= 0, got {value}")
        return x

    def string(self, value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str):
            raise self.fail(path, "a string", value)
        if choices is not None and value not in choices:
            raise self.error(f"{path}: must be one of {', '.join(choices)}, got {value!r}"[:4 * REPR_LIMIT])
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "true or false", value)
        return value


def join(path: str, key: Any) -> str:
    """The path of `key` inside the mapping at `path` (dots between keys)."""
    return f"{path}.{key}" if path else str(key)
