"""How the benchmarks hand over their Markdown tables: printed, and written whole to --out if given."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.atomic import write_atomic  # noqa: E402


def emit(lines: list[str], out: str | None) -> int:
    """Print the report and write it to `out` (through a temporary file: never half-written); returns 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_atomic(out, text)
    return 0
